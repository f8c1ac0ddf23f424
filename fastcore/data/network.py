"""A nested river-basin network: the levels (fine -> coarse) of sub-basins, their parent
links and river edges with attributes. The Rhine network derived by
``scripts/derive_rhine.py`` and the synthetic networks of :mod:`fastcore.data.synthetic`
are both a :class:`BasinNetwork`; the hydrological simulation and the basin model read it.

Stored as one ``.npz`` (plain arrays, no pickle): ``name``, ``levels`` (the level names) and
per level ``<level>/<field>`` for every field of :class:`BasinLevel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcore.graph import Hierarchy

LEVEL_FIELDS = (
    "basin_id",
    "area_km2",
    "elevation_m",
    "lat",
    "lon",
    "upstream_area_km2",
    "parent",
    "river_edges",
    "edge_length_km",
    "edge_slope",
    "edge_upstream_area_km2",
)


@dataclass
class BasinLevel:
    """One scale of sub-basins (N basins, E river edges), NumPy arrays.

    basin_id: int64 ``[N]`` stable ids (e.g. the outlet cell's flat index in the grid).
    area_km2: float64 ``[N]`` the sub-basin's own (incremental) area.
    elevation_m: float64 ``[N]`` mean elevation of its cells.
    lat / lon: float64 ``[N]`` its outlet's coordinates (degrees).
    upstream_area_km2: float64 ``[N]`` the area draining through its outlet.
    parent: int64 ``[N]`` index of the containing basin in the next coarser level; all -1
        at the coarsest level.
    river_edges: int64 ``[2, E]``, upstream basin -> the basin its outlet drains into
        (within this level; the network's outlet basin has no outgoing edge).
    edge_length_km: float64 ``[E]`` river length from the upstream outlet to the downstream
        outlet; edge_slope: float64 ``[E]`` elevation drop / length in m per m (>= 0);
    edge_upstream_area_km2: float64 ``[E]`` upstream area at the edge's source outlet.
    """

    name: str
    basin_id: np.ndarray
    area_km2: np.ndarray
    elevation_m: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    upstream_area_km2: np.ndarray
    parent: np.ndarray
    river_edges: np.ndarray
    edge_length_km: np.ndarray
    edge_slope: np.ndarray
    edge_upstream_area_km2: np.ndarray

    @property
    def num_basins(self) -> int:
        return int(self.basin_id.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.river_edges.shape[1])

    def validate(self, coarser: BasinLevel | None) -> None:
        """Shapes, index bounds and nesting; a ValueError naming the level and the value."""
        n, e = self.num_basins, self.num_edges
        for f in ("area_km2", "elevation_m", "lat", "lon", "upstream_area_km2", "parent"):
            if getattr(self, f).shape != (n,):
                raise ValueError(
                    f"level {self.name!r}: {f} has shape {getattr(self, f).shape}, expected ({n},)"
                )
        if self.river_edges.shape != (2, e):
            raise ValueError(
                f"level {self.name!r}: river_edges must be [2, E], got {self.river_edges.shape}"
            )
        for f in ("edge_length_km", "edge_slope", "edge_upstream_area_km2"):
            if getattr(self, f).shape != (e,):
                raise ValueError(
                    f"level {self.name!r}: {f} has shape {getattr(self, f).shape}, expected ({e},)"
                )
        if e and (self.river_edges.min() < 0 or self.river_edges.max() >= n):
            raise ValueError(
                f"level {self.name!r}: river edge index {int(self.river_edges.max())} outside [0, {n})"
            )
        if coarser is None:
            if n and (self.parent != -1).any():
                raise ValueError(f"level {self.name!r} is the coarsest: parent must be all -1")
        elif n and (self.parent.min() < 0 or self.parent.max() >= coarser.num_basins):
            raise ValueError(
                f"level {self.name!r}: parent index outside [0, {coarser.num_basins}) of "
                f"level {coarser.name!r}"
            )


@dataclass
class BasinNetwork:
    """Levels fine -> coarse, validated at construction."""

    name: str
    levels: list[BasinLevel]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a BasinNetwork needs at least one level")
        for i, level in enumerate(self.levels):
            level.validate(self.levels[i + 1] if i + 1 < len(self.levels) else None)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    def level(self, name: str) -> BasinLevel:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(f"no level {name!r}; levels: {', '.join(self.level_names)}")

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "name": np.array(self.name),
            "levels": np.array(self.level_names),
        }
        for lv in self.levels:
            for f in LEVEL_FIELDS:
                arrays[f"{lv.name}/{f}"] = np.asarray(getattr(lv, f))
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> BasinNetwork:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"basin network file {str(p)!r} does not exist")
        with np.load(p, allow_pickle=False) as z:
            names = [str(x) for x in z["levels"]]
            levels = []
            for name in names:
                missing = [f for f in LEVEL_FIELDS if f"{name}/{f}" not in z]
                if missing:
                    raise ValueError(f"{str(p)!r}: level {name!r} lacks {', '.join(missing)}")
                levels.append(BasinLevel(name=name, **{f: z[f"{name}/{f}"] for f in LEVEL_FIELDS}))
            return cls(name=str(z["name"]), levels=levels)

    def to_hierarchy(
        self,
        num_features: int = 1,
        causal_edges: list[np.ndarray] | None = None,
        device: torch.device | str | None = None,
    ) -> Hierarchy:
        """A :class:`fastcore.Hierarchy` with river edge attributes ``[E, 3]`` = (log1p
        length km, slope in m per km, log1p upstream area km2 / 10) and the given causal graphs (one
        ``[2, C]`` array per level over node * num_features + feature, or none)."""
        rivers = []
        for lv in self.levels:
            attr = np.stack(
                [
                    np.log1p(lv.edge_length_km),
                    1e3 * lv.edge_slope,
                    np.log1p(lv.edge_upstream_area_km2) / 10,
                ],
                axis=1,
            )
            rivers.append(
                (torch.as_tensor(lv.river_edges), torch.as_tensor(attr, dtype=torch.float32))
            )
        return Hierarchy(
            num_nodes=[lv.num_basins for lv in self.levels],
            parent_index=[torch.as_tensor(lv.parent) for lv in self.levels[:-1]],
            river_graphs=rivers,
            causal_graphs=None
            if causal_edges is None
            else [torch.as_tensor(c) for c in causal_edges],
            num_features=num_features,
            level_names=self.level_names,
            valid_basin_ids=[torch.as_tensor(lv.basin_id) for lv in self.levels],
            device=device,
        )
