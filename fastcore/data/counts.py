"""Real weekly disease counts per district with the district adjacency graph.

Source: the ``sts`` data sets of the R package surveillance (Meyer, Held & Höhle 2017,
Journal of Statistical Software 77(11)), as shipped in Debian's ``r-cran-surveillance``;
the counts are notifications to the Robert Koch Institute (SurvStat).
``scripts/fetch_counts.py --dataset NAME`` downloads the package and writes
``data/counts/NAME.npz``; the data is not part of the repository. Data sets:

* ``measlesWeserEms``: measles, the 17 districts of the Weser-Ems region (Lower Saxony),
  2001/W1..2002/W52: T = 104 weeks, N = 17, 31 adjacent pairs, 1283 cases, 86% zeros;
* ``fluBYBW``: influenza A & B, the 140 districts of Bavaria and Baden-Wuerttemberg,
  2001/W1..2008/W52 (52 weeks a year: the source has no ISO week 2004/W53): T = 416,
  N = 140, 336 adjacent pairs, 21921 cases, 91% zeros.

The graph is the source's first-order neighbourhood (districts sharing a border), both
directions of each pair, no self loop; every district has at least one neighbour.
:meth:`CountPanel.to_panel` turns a panel into a :class:`~fastcore.data.panel.PanelData`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastcore.data.panel import Calendar, PanelData

COUNT_DATASETS = ("measlesWeserEms", "fluBYBW")
"""The data sets ``scripts/fetch_counts.py`` can fetch (``--dataset``)."""

COUNTS_ENV = "FASTCORE_COUNTS"
"""Environment variable overriding the directory of the ``<dataset>.npz`` files."""

_REQUIRED = ("counts", "year", "week", "week_start", "district", "district_id", "edge_index")


def _default_counts_dir() -> Path:
    root = Path(__file__).resolve().parents[2]
    if (root / "scripts" / "fetch_counts.py").is_file():  # a source checkout
        return root / "data" / "counts"
    return Path.cwd() / "data" / "counts"  # an installed package


DEFAULT_COUNTS_DIR = _default_counts_dir()
"""Where ``scripts/fetch_counts.py`` writes by default: ``data/counts/`` under the
repository root in a source checkout, under the working directory for an installed
package."""


@dataclass
class CountPanel:
    """Weekly counts of T weeks x N districts on the district adjacency graph.

    counts: float32 ``[T, N]``, whole numbers (NaN where the source has no value).
    edge_index: int64 ``[2, E]``, both directions of each adjacent pair, row 0 source.
    names / ids: the district names (``"LK Leer"``) and official keys (``"03457"``).
    dates: ``datetime64[D]`` ``[T]``, the Monday of ISO week (year, week).
    year / week: int64 ``[T]``, the source's week labels (52 weeks a year).
    population: int64 ``[N]`` inhabitants (at ``population_date``), or None.
    period: steps per year (52).
    district_data: the source's other numeric district attributes, name -> float64 ``[N]``
        (area, population by year, vaccination coverage).
    """

    counts: torch.Tensor
    edge_index: torch.Tensor
    names: tuple[str, ...]
    ids: tuple[str, ...]
    dates: np.ndarray
    year: np.ndarray
    week: np.ndarray
    population: np.ndarray | None = None
    population_date: str | None = None
    period: int = 52
    dataset: str = ""
    source: str = ""
    district_data: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_weeks(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_districts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def zero_fraction(self) -> float:
        """Share of the observed (district, week) counts that are 0."""
        observed = self.counts[~torch.isnan(self.counts)]
        return float((observed == 0).double().mean()) if observed.numel() else float("nan")

    def calendar(self, harmonics: int = 1) -> Calendar:
        """The weekly dates with a season of :attr:`period` steps."""
        return Calendar(timestamps=self.dates, period=self.period, harmonics=harmonics)

    def to_panel(self, **kwargs: object) -> PanelData:
        """A :class:`PanelData` of the counts on the graph with :meth:`calendar`.

        ``kwargs`` go to :class:`PanelData` (``normalize="log1p"`` suits counts; pass
        ``static=np.log(panel.population)[:, None]`` for the population, ``calendar=`` to
        replace the default one).
        """
        kwargs.setdefault("calendar", self.calendar())
        return PanelData(self.counts, self.edge_index, **kwargs)


def count_panel_path(path_or_name: str | os.PathLike[str] = "measlesWeserEms") -> Path:
    """The ``.npz`` to read: a data set name (one of :data:`COUNT_DATASETS`) is looked up in
    ``$FASTCORE_COUNTS`` if set, else :data:`DEFAULT_COUNTS_DIR`; anything else is a path.
    """
    if isinstance(path_or_name, str) and path_or_name in COUNT_DATASETS:
        env = os.environ.get(COUNTS_ENV)
        folder = Path(env) if env else DEFAULT_COUNTS_DIR
        return folder / f"{path_or_name}.npz"
    path = Path(path_or_name)
    if path.suffix != ".npz":
        raise ValueError(
            f"{str(path_or_name)!r} is neither a data set ({', '.join(COUNT_DATASETS)}) nor "
            "an .npz path"
        )
    return path


def _fetch_command(path: Path) -> str:
    dataset = path.stem if path.stem in COUNT_DATASETS else COUNT_DATASETS[0]
    command = f"python scripts/fetch_counts.py --dataset {dataset}"
    if path.resolve() != (DEFAULT_COUNTS_DIR / f"{dataset}.npz").resolve():
        command += f" --out {path}"
    return command


def _check_edges(edge_index: np.ndarray, n: int, file: Path) -> None:
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{file}: edge_index must be [2, E], got shape {edge_index.shape}")
    if not np.issubdtype(edge_index.dtype, np.integer):
        raise ValueError(f"{file}: edge_index must be integers, got {edge_index.dtype}")
    outside = (edge_index < 0) | (edge_index >= n)
    if outside.any():
        at = int(np.nonzero(outside.any(0))[0][0])
        raise ValueError(
            f"{file}: edge_index must lie in [0, {n}) for N = {n} districts, edge {at} is "
            f"{edge_index[:, at].tolist()}"
        )
    loops = edge_index[0] == edge_index[1]
    if loops.any():
        raise ValueError(f"{file}: edge_index has self loops at nodes {edge_index[0, loops][:5]}")
    pairs = set(map(tuple, edge_index.T.tolist()))
    if len(pairs) != edge_index.shape[1]:
        raise ValueError(f"{file}: edge_index has {edge_index.shape[1] - len(pairs)} duplicates")
    one_way = sorted(p for p in pairs if (p[1], p[0]) not in pairs)
    if one_way:
        raise ValueError(
            f"{file}: edge_index must hold both directions of each pair; {len(one_way)} "
            f"edges lack their reverse, e.g. {list(one_way[0])}"
        )


def load_count_panel(path_or_name: str | os.PathLike[str] = "measlesWeserEms") -> CountPanel:
    """A count panel from a data set name or an ``.npz`` (see :func:`count_panel_path`).

    Raises:
        FileNotFoundError: the file is missing (the message gives the fetch command).
        ValueError: an unknown name, a missing array, shapes that disagree, counts that are
            negative or not whole, or an edge_index out of range, with self loops,
            duplicates or a missing reverse edge.
    """
    file = count_panel_path(path_or_name)
    if not file.is_file():
        raise FileNotFoundError(
            f"count data {str(file)!r} not found; fetch it with `{_fetch_command(file)}` "
            f"from the repository root (or point ${COUNTS_ENV} at its folder)"
        )
    with np.load(file, allow_pickle=False) as npz:
        missing = [key for key in _REQUIRED if key not in npz.files]
        if missing:
            raise ValueError(f"{file}: missing arrays {missing}, has {sorted(npz.files)}")
        arrays = {key: npz[key] for key in npz.files}

    counts = arrays["counts"].astype(np.float64)
    if counts.ndim != 2:
        raise ValueError(f"{file}: counts must be [T, N], got shape {counts.shape}")
    t, n = counts.shape
    finite = counts[~np.isnan(counts)]
    bad = finite[(finite < 0) | (finite != np.floor(finite))]
    if bad.size:
        raise ValueError(
            f"{file}: counts must be non-negative whole numbers (NaN = missing), got "
            f"{bad[:5].tolist()}"
        )
    sizes = {"year": t, "week": t, "week_start": t, "district": n, "district_id": n}
    if "population" in arrays:
        sizes["population"] = n
    for key, size in sizes.items():
        if arrays[key].shape != (size,):
            raise ValueError(
                f"{file}: {key} must have shape ({size},) to match counts {counts.shape}, "
                f"got {arrays[key].shape}"
            )
    _check_edges(arrays["edge_index"], n, file)
    data = arrays.get("district_data", np.zeros((n, 0)))
    data_names = [str(s) for s in arrays.get("district_data_names", np.zeros(0, str))]
    if data.shape != (n, len(data_names)):
        raise ValueError(
            f"{file}: district_data must be [{n}, {len(data_names)}], got {data.shape}"
        )
    source = " ".join(str(arrays[k]) for k in ("source_deb", "source_member") if k in arrays)
    return CountPanel(
        counts=torch.from_numpy(counts.astype(np.float32)),
        edge_index=torch.from_numpy(arrays["edge_index"].astype(np.int64)),
        names=tuple(str(s) for s in arrays["district"]),
        ids=tuple(str(s) for s in arrays["district_id"]),
        dates=arrays["week_start"].astype("datetime64[D]"),
        year=arrays["year"].astype(np.int64),
        week=arrays["week"].astype(np.int64),
        population=arrays["population"].astype(np.int64) if "population" in arrays else None,
        population_date=str(arrays["population_date"]) if "population_date" in arrays else None,
        period=int(arrays["period"]) if "period" in arrays else 52,
        dataset=str(arrays["dataset"]) if "dataset" in arrays else file.stem,
        source=source,
        district_data={name: data[:, i].astype(np.float64) for i, name in enumerate(data_names)},
    )
