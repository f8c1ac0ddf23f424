"""Forecast windows over a generic panel: a ``[T, N]`` or ``[T, N, C]`` series on a graph.

A *panel* is T time steps of C channels at N nodes (districts x weeks, stations x days),
with a graph ``edge_index [2, E]`` over the nodes. :class:`PanelData` takes it as a torch
tensor or a NumPy array, NaN marking a missing value, plus what a forecaster knows besides:

* ``edge_attr [E, D]`` (or ``[E]``): edge attributes (distances, weights), validated and
  carried, not normalised;
* ``static [N, S]``: static node attributes (population, area), carried as given and as
  ``static_normalized`` (z-scored across nodes);
* ``covariates [T, N, K]`` or ``[T, K]``: covariates *known in advance* (holidays, a
  temperature forecast, a vaccination schedule): windows get them for the inputs *and* the
  horizon, so they must have no missing value;
* ``calendar`` (:class:`Calendar`): timestamps, or a start date and a frequency, and/or a
  period length in steps (52 for weekly data with a yearly season, 7 for daily data with
  a weekly one), from which the windows get seasonal features ``sin, cos(2 pi k phase)``.

**Splits** are chronological (:meth:`PanelData.split_bounds`): ``train``, then ``val``,
then ``test`` (``val`` optional), by fractions ``(0.7, 0.15, 0.15)``, by boundaries (the
first step of ``val`` and of ``test``), or as explicit ``{name: (start, stop)}`` ranges
(steps, or timestamps when the calendar has them). No leakage: a window belongs to a split
when all its *targets* lie inside that split; its *inputs* may reach back into earlier
splits (that is the past, known at the forecast origin), never forward.

**Normalisation** (:class:`PanelScaler`) is fitted on the training split's steps only
and applied to the whole series: ``"none"``, ``"standard"`` (per node and channel mean and
standard deviation, or per channel with ``per_node=False``), ``"log1p"`` (``log(1 + x)``,
for counts) or ``"log1p_standard"`` (log1p, then standardised). Missing values are ignored
by the statistics; a node whose training values are constant (a district with no case in
the training years) is only centred (its std would be 0), so a later outbreak does not
blow up to 1e6 standard deviations. :meth:`PanelData.inverse` maps predictions back
(exactly: ``expm1`` after undoing the standardisation). The inverse of a *mean* in log1p
space is not the mean of the counts (Jensen); quantiles map exactly through any increasing
transform, so invert quantiles (or use a count head on raw counts, see
:mod:`fastcore.nn.heads`).

**Windows.** A window at forecast origin t (the last observed step) has inputs at steps
``t-L+1 .. t`` and targets at ``t+1 .. t+H``. A :class:`PanelBatch` holds, for B windows:

* ``x [B, L, N, C']``: normalised inputs, missing values replaced by ``fill_value``
  (in normalised units); with ``missing_indicator=True`` the C 0/1 "observed" flags are
  appended, so C' = 2C; ``x_mask [B, L, N, C]`` (True = observed) either way;
* ``y [B, H, N, C]`` normalised targets and ``y_raw`` the same targets in raw units, both
  NaN where missing, and ``y_mask`` (True = observed): missing targets are masked, never
  dropped and never filled (a loss that ignores the mask gives NaN, not a silent 0);
* ``cov_x [B, L, N, K]``, ``cov_y [B, H, N, K]``: the covariates (normalised on the
  training split unless ``covariate_normalize="none"``; ``[T, K]`` covariates are
  broadcast over the nodes: a stride-0 view, do not write into it);
* ``season_x [B, L, 2h]``, ``season_y [B, H, 2h]``: ``sin(2 pi k phase), cos(2 pi k
  phase)`` for k = 1..h harmonics;
* ``origin [B]``, ``time_x [B, L]``, ``time_y [B, H]``: step indices (map them to dates
  with :meth:`PanelData.timestamps`).

**Cache** (:class:`PanelWindows`): ``"eager"`` gathers every window of the split once at
construction into contiguous tensors (a batch is then one index per field), costing about
``L / stride`` copies of the series; ``"lazy"`` stores nothing beyond the panel's own
float32 series (raw and normalised, one copy when ``normalize="none"``) and gathers each
batch on request (one advanced index per field, memory O(batch)); ``"auto"``
(default) is eager when the cache would take at most ``max_cache_bytes`` (256 MiB) and
lazy otherwise. :meth:`PanelWindows.cache_bytes` gives the eager size.

**Rolling origin** (:meth:`PanelData.rolling_origin`): for evaluation over a test period,
yields the forecast origins in it (every step, or every k steps), each with the inputs up
to the origin and the targets after it; with ``partial=True`` also the last origins whose
horizon runs past the period's end, their out-of-period targets masked (never read).

Errors name the value and the expectation: bad shapes, ``edge_index`` out of range,
non-finite covariates, attributes or infinite series values, negative values under log1p,
splits too short for a window of L + H steps, unknown options.

Examples:
    >>> import torch
    >>> from fastcore.data.panel import Calendar, PanelData
    >>> series = torch.arange(40.0).reshape(20, 2)  # T=20 steps, N=2 nodes
    >>> edge_index = torch.tensor([[0, 1], [1, 0]])
    >>> panel = PanelData(series, edge_index, splits=(0.6, 0.2, 0.2), normalize="none",
    ...                   calendar=Calendar(period=4))
    >>> panel.split_bounds("train"), panel.split_bounds("test")
    ((0, 12), (16, 20))
    >>> train = panel.windows("train", lookback=3, horizon=2)
    >>> train.origins.tolist()  # targets t+1, t+2 inside [0, 12)
    [2, 3, 4, 5, 6, 7, 8, 9]
    >>> batch = train.batch([0, 7])
    >>> tuple(batch.x.shape), tuple(batch.y.shape), tuple(batch.season_x.shape)
    ((2, 3, 2, 1), (2, 2, 2, 1), (2, 3, 2))
    >>> batch.x[1, :, 0, 0].tolist(), batch.y[1, :, 0, 0].tolist()  # node 0: 2 t
    ([14.0, 16.0, 18.0], [20.0, 22.0])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

NORMALIZATIONS = ("none", "standard", "log1p", "log1p_standard")
COVARIATE_NORMALIZATIONS = ("none", "standard")
CACHE_MODES = ("auto", "eager", "lazy")
FREQUENCIES = ("h", "D", "W", "M")
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_CACHE_BYTES = 256 << 20
"""``max_cache_bytes`` default of :class:`PanelWindows` (256 MiB)."""

_STEP = {
    "h": np.timedelta64(1, "h"),
    "D": np.timedelta64(1, "D"),
    "W": np.timedelta64(7, "D"),
}


# ---------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------


def _as_tensor(name: str, value: object) -> torch.Tensor:
    """A CPU tensor from a tensor, a NumPy array or nested sequences."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}"
        ) from err
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise TypeError(f"{name} must hold numbers, got a NumPy array of dtype {array.dtype}")
    return torch.from_numpy(np.array(array, copy=True))


def _as_float(name: str, value: object) -> torch.Tensor:
    t = _as_tensor(name, value)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers, got dtype {t.dtype}")
    return t.to(torch.float32)


def _first_index(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _require_finite(name: str, t: torch.Tensor, what: str = "") -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be finite{what}: {int(bad.sum())} of {t.numel()} values are NaN or "
            f"inf, the first at index {_first_index(bad)} ({float(t[bad][0])})"
        )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Calendar
# ---------------------------------------------------------------------------------------


class Calendar:
    """When each step is, and the season the seasonal features follow.

    Give ``timestamps`` (anything ``numpy.asarray(..., "datetime64[s]")`` reads: strings,
    ``datetime`` objects, a pandas ``DatetimeIndex``; strictly increasing, one per step),
    or ``start`` and ``freq`` (``"h"``, ``"D"``, ``"W"`` = 7 days, ``"M"`` = month starts),
    and/or ``period`` (steps per season, > 1; may be fractional, e.g. 52.1775 weeks or
    365.25 days per year).

    The phase of step t, in [0, 1): ``(t / period) mod 1`` when ``period`` is given (step 0
    is phase 0); otherwise the fraction of the calendar year elapsed at the timestamp (an
    annual season). The seasonal features are ``sin(2 pi k phase), cos(2 pi k phase)`` for
    k = 1..``harmonics`` (sin before cos, k ascending): ``2 * harmonics`` columns.

    Examples:
        >>> from fastcore.data.panel import Calendar
        >>> Calendar(period=4).phase(6).tolist()
        [0.0, 0.25, 0.5, 0.75, 0.0, 0.25]
        >>> weekly = Calendar(start="2021-01-04", freq="W")
        >>> [str(t) for t in weekly.timestamps(2)]
        ['2021-01-04T00:00:00', '2021-01-11T00:00:00']
        >>> round(float(Calendar(timestamps=["2021-07-02T12:00"]).phase(1)[0]), 4)  # mid-year
        0.5
    """

    def __init__(
        self,
        timestamps: object = None,
        start: object = None,
        freq: str | None = None,
        period: float | None = None,
        harmonics: int = 1,
    ) -> None:
        if timestamps is not None and (start is not None or freq is not None):
            raise ValueError("Calendar: give timestamps, or start and freq, not both")
        if (start is None) != (freq is None):
            raise ValueError(
                f"Calendar: start and freq go together, got start={start!r}, freq={freq!r}"
            )
        if freq is not None:
            _check_choice("Calendar: freq", freq, FREQUENCIES)
        if period is not None:
            if isinstance(period, bool) or not isinstance(period, (int, float)):
                raise TypeError(f"Calendar: period must be a number, got {type(period).__name__}")
            if not (math.isfinite(period) and period > 1):
                raise ValueError(f"Calendar: period must be a finite number > 1, got {period!r}")
            period = float(period)
        if timestamps is None and start is None and period is None:
            raise ValueError("Calendar needs timestamps, start and freq, or a period")
        harmonics = _check_int("Calendar: harmonics", harmonics, 1)
        stamps = None
        if timestamps is not None:
            try:
                stamps = np.asarray(timestamps, dtype="datetime64[s]")
            except (TypeError, ValueError) as err:
                raise ValueError(f"Calendar: timestamps are not dates/times: {err}") from None
            if stamps.ndim != 1:
                raise ValueError(f"Calendar: timestamps must be 1-D, got shape {stamps.shape}")
            if np.isnat(stamps).any():
                raise ValueError("Calendar: timestamps contain NaT")
            step = np.diff(stamps).astype(np.int64)
            if (step <= 0).any():
                at = int(np.nonzero(step <= 0)[0][0])
                raise ValueError(
                    f"Calendar: timestamps must be strictly increasing, got {stamps[at]} then "
                    f"{stamps[at + 1]} at steps {at}, {at + 1}"
                )
        if start is not None:
            try:
                start = np.datetime64(start, "s")
            except (TypeError, ValueError) as err:
                raise ValueError(f"Calendar: start {start!r} is not a date/time: {err}") from None
        self.timestamps_: np.ndarray | None = stamps
        self.start: np.datetime64 | None = start
        self.freq, self.period, self.harmonics = freq, period, harmonics

    def __repr__(self) -> str:
        if self.timestamps_ is not None:
            n = len(self.timestamps_)
            dates = f"timestamps=[{self.timestamps_[0]} .. {self.timestamps_[-1]}] ({n})"
        elif self.start is not None:
            dates = f"start={self.start}, freq={self.freq!r}"
        else:
            dates = "no dates"
        return f"Calendar({dates}, period={self.period}, harmonics={self.harmonics})"

    @property
    def has_dates(self) -> bool:
        """Whether steps map to timestamps."""
        return self.timestamps_ is not None or self.start is not None

    def timestamps(self, steps: int) -> np.ndarray | None:
        """``datetime64[s] [steps]``, or None without dates."""
        if self.timestamps_ is not None:
            if len(self.timestamps_) != steps:
                raise ValueError(
                    f"Calendar has {len(self.timestamps_)} timestamps, the series {steps} steps"
                )
            return self.timestamps_
        if self.start is None:
            return None
        if self.freq == "M":
            months = np.datetime64(self.start, "M") + np.arange(steps)
            return months.astype("datetime64[s]")
        return self.start + _STEP[self.freq] * np.arange(steps)

    def phase(self, steps: int) -> np.ndarray:
        """``float64 [steps]`` in [0, 1): the position of each step within its season."""
        if self.period is not None:
            return np.mod(np.arange(steps, dtype=np.float64) / self.period, 1.0)
        stamps = self.timestamps(steps)
        assert stamps is not None  # the constructor requires dates or a period
        year = stamps.astype("datetime64[Y]")
        begin = year.astype("datetime64[s]")
        length = ((year + 1).astype("datetime64[s]") - begin).astype(np.float64)
        return (stamps - begin).astype(np.float64) / length

    def features(self, steps: int) -> torch.Tensor:
        """``float32 [steps, 2 * harmonics]``: sin and cos of ``2 pi k phase``, k = 1..h."""
        angle = 2.0 * np.pi * self.phase(steps)[:, None] * np.arange(1, self.harmonics + 1)
        feats = np.stack([np.sin(angle), np.cos(angle)], -1).reshape(steps, -1)
        return torch.as_tensor(feats, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


@dataclass
class PanelScaler:
    """Normalisation of ``[..., N, C]`` values with statistics of a training split.

    ``mode``: ``"none"``, ``"standard"``, ``"log1p"`` or ``"log1p_standard"``. ``mean`` and
    ``std`` are float64 ``[N, C]`` (per node) or ``[1, C]`` (per channel), in the space after
    log1p for the log1p modes (0 and 1 where the mode does not standardise)::

        transform(x) = (g(x) - mean) / std       g = log1p for the log1p modes, else identity
        inverse(z)   = g^-1(z std + mean)        g^-1 = expm1

    NaN stays NaN both ways. The log1p modes require values >= 0 (counts): a negative
    value is a ``ValueError`` (log1p of a value <= -1 is NaN or -inf).

    Examples:
        >>> import torch
        >>> from fastcore.data.panel import PanelScaler
        >>> train = torch.tensor([[[0.0]], [[3.0]], [[float("nan")]], [[7.0]]])  # [T, N=1, C=1]
        >>> scaler = PanelScaler.fit(train, "log1p")
        >>> z = scaler.transform(torch.tensor([[0.0], [3.0]]))
        >>> [round(v, 4) for v in z.flatten().tolist()]
        [0.0, 1.3863]
        >>> scaler.inverse(z).flatten().tolist()
        [0.0, 3.0]
    """

    mode: str
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(
        cls,
        train: torch.Tensor,
        mode: str = "standard",
        per_node: bool = True,
        min_std: float = 1e-6,
    ) -> PanelScaler:
        """Statistics of ``train [T', N, C]`` (NaN ignored). A slice with no observed value
        gets mean 0, std 1; a slice whose std is below ``min_std`` gets std 1 (centred only)."""
        _check_choice("normalize", mode, NORMALIZATIONS)
        if train.dim() != 3:
            raise ValueError(f"PanelScaler.fit: train must be [T, N, C], got {tuple(train.shape)}")
        n, c = (train.shape[1] if per_node else 1), train.shape[2]
        mean = torch.zeros(n, c, dtype=torch.float64)
        std = torch.ones(n, c, dtype=torch.float64)
        if mode.endswith("standard"):
            x = train.double()
            if mode == "log1p_standard":
                cls._check_counts("train", x)
                x = torch.log1p(x)
            if not per_node:
                x = x.reshape(-1, 1, c)
            valid = ~torch.isnan(x)
            count = valid.sum(0)
            safe = torch.where(valid, x, 0.0)
            m = safe.sum(0) / count.clamp_min(1)
            var = torch.where(valid, (x - m).square(), 0.0).sum(0) / count.clamp_min(1)
            s = var.sqrt()
            mean = torch.where(count > 0, m, 0.0)
            std = torch.where((count > 0) & (s >= min_std), s, 1.0)
        return cls(mode, mean, std)

    @staticmethod
    def _check_counts(name: str, x: torch.Tensor) -> None:
        negative = x < 0
        if bool(negative.any()):
            raise ValueError(
                f"log1p normalisation is for non-negative values (counts), but {name} has "
                f"{int(negative.sum())} negative values, the first {float(x[negative][0])} at "
                f"index {_first_index(negative)}"
            )

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N, C]`` (N may be 1 for per-channel statistics) to normalised values, in
        ``x``'s floating dtype (float32 for integer ``x``)."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        v = x.double()
        if self.mode.startswith("log1p"):
            self._check_counts("x", v)
            v = torch.log1p(v)
        v = (v - self.mean.to(v.device)) / self.std.to(v.device)
        return v.to(dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised ``[..., N, C]`` values back to raw units, in ``z``'s dtype."""
        dtype = z.dtype if z.is_floating_point() else torch.float32
        v = z.double() * self.std.to(z.device) + self.mean.to(z.device)
        if self.mode.startswith("log1p"):
            v = torch.expm1(v)
        return v.to(dtype)


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


@dataclass
class PanelBatch:
    """B forecast windows (see the module docstring for every field)."""

    x: torch.Tensor  # [B, L, N, C'] normalised inputs, no NaN
    x_mask: torch.Tensor  # [B, L, N, C] bool, True = observed
    y: torch.Tensor  # [B, H, N, C] normalised targets, NaN = missing
    y_raw: torch.Tensor  # [B, H, N, C] raw targets, NaN = missing
    y_mask: torch.Tensor  # [B, H, N, C] bool, True = observed
    origin: torch.Tensor  # [B] int64, the last input step
    time_x: torch.Tensor  # [B, L] int64
    time_y: torch.Tensor  # [B, H] int64
    cov_x: torch.Tensor | None = None  # [B, L, N, K]
    cov_y: torch.Tensor | None = None  # [B, H, N, K]
    season_x: torch.Tensor | None = None  # [B, L, 2h]
    season_y: torch.Tensor | None = None  # [B, H, 2h]

    def __len__(self) -> int:
        return int(self.origin.shape[0])

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every field that is not None."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                yield f.name, value

    def select(self, index) -> PanelBatch:
        """The windows ``index`` (anything that indexes dim 0) as a new batch."""
        return PanelBatch(**{name: value[index] for name, value in self.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PanelBatch:
        """Every tensor moved to ``device``."""
        return PanelBatch(
            **{name: v.to(device, non_blocking=non_blocking) for name, v in self.items()}
        )

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> PanelBatch:
        """Stack single windows (:meth:`PanelWindows.__getitem__` dicts) into a batch: the
        ``collate_fn`` for a ``torch.utils.data.DataLoader``."""
        if not items:
            raise ValueError("PanelBatch.collate needs at least one window")
        return PanelBatch(**{k: torch.stack([item[k] for item in items]) for k in items[0]})


# ---------------------------------------------------------------------------------------
# The panel
# ---------------------------------------------------------------------------------------


class PanelData:
    """A validated, normalised panel with its graph, splits and calendar.

    Args:
        series: ``[T, N]`` or ``[T, N, C]`` values (tensor or NumPy array; NaN = missing;
            stored as float32). A ``[T, N]`` series has C = 1 channel in every batch.
        edge_index: ``[2, E]`` integer node indices in [0, N) (row 0 source, row 1 target).
        edge_attr: ``[E, D]`` or ``[E]`` finite edge attributes.
        static: ``[N, S]`` finite static node attributes.
        covariates: ``[T, N, K]`` or ``[T, K]`` finite covariates known in advance.
        calendar: a :class:`Calendar` (seasonal features and timestamps), or None.
        splits: fractions ``(train, val, test)`` or ``(train, test)`` (positive, summing to
            1); boundaries ``(val_start, test_start)`` or ``(test_start,)`` as ints (or
            timestamps); or ``{name: (start, stop)}`` with names among train, val, test
            (steps, or timestamps when the calendar has dates; ``stop`` exclusive).
        normalize: ``"none"``, ``"standard"``, ``"log1p"`` or ``"log1p_standard"``
            (:class:`PanelScaler`, fitted on the training split).
        per_node: standardise per node and channel (True) or per channel over all nodes.
        covariate_normalize: ``"standard"`` (per node and covariate, or per covariate for
            ``[T, K]``, on the training steps) or ``"none"``.
        fill_value: what missing inputs become in ``x`` (normalised units).
        missing_indicator: append the C "observed" flags to ``x``.
        min_std: a standard deviation below this counts as 0 (see :class:`PanelScaler`).
    """

    def __init__(
        self,
        series: object,
        edge_index: object,
        *,
        edge_attr: object = None,
        static: object = None,
        covariates: object = None,
        calendar: Calendar | None = None,
        splits: object = (0.7, 0.15, 0.15),
        normalize: str = "standard",
        per_node: bool = True,
        covariate_normalize: str = "standard",
        fill_value: float = 0.0,
        missing_indicator: bool = False,
        min_std: float = 1e-6,
    ) -> None:
        _check_choice("normalize", normalize, NORMALIZATIONS)
        _check_choice("covariate_normalize", covariate_normalize, COVARIATE_NORMALIZATIONS)
        if not math.isfinite(fill_value):
            raise ValueError(f"fill_value must be finite, got {fill_value!r}")
        raw = _as_float("series", series)
        if raw.dim() not in (2, 3):
            raise ValueError(f"series must be [T, N] or [T, N, C], got shape {tuple(raw.shape)}")
        if raw.dim() == 2:
            raw = raw[..., None]
        t, n, c = raw.shape
        if t < 2 or n < 1 or c < 1:
            raise ValueError(
                f"series must have T >= 2 steps, N >= 1 nodes and C >= 1 channels, got "
                f"shape {tuple(raw.shape)}"
            )
        infinite = torch.isinf(raw)
        if bool(infinite.any()):
            raise ValueError(
                f"series has {int(infinite.sum())} infinite values, the first at index "
                f"{_first_index(infinite)}; mark missing values with NaN"
            )
        self.raw = raw.contiguous()
        self.edge_index = self._edge_index(edge_index, n)
        self.edge_attr = self._edge_attr(edge_attr, self.edge_index.shape[1])
        self.static, self.static_normalized = self._static(static, n)
        if calendar is not None and not isinstance(calendar, Calendar):
            raise TypeError(f"calendar must be a Calendar, got {type(calendar).__name__}")
        self.calendar = calendar
        self._timestamps = calendar.timestamps(t) if calendar is not None else None
        self.season = calendar.features(t) if calendar is not None else None
        self.splits = self._resolve_splits(splits, t)
        train_start, train_stop = self.splits["train"]

        if normalize.startswith("log1p"):
            PanelScaler._check_counts("series", self.raw)
        self.scaler = PanelScaler.fit(
            self.raw[train_start:train_stop], normalize, per_node=per_node, min_std=min_std
        )
        self.values = self.raw if normalize == "none" else self.scaler.transform(self.raw)
        self.covariates, self.covariate_scaler = self._covariates(
            covariates, t, n, covariate_normalize, train_start, train_stop, min_std
        )
        self.fill_value = float(fill_value)
        self.missing_indicator = bool(missing_indicator)

    # --- validation -------------------------------------------------------------------

    @staticmethod
    def _edge_index(edge_index: object, n: int) -> torch.Tensor:
        ei = _as_tensor("edge_index", edge_index)
        if ei.is_floating_point() or ei.is_complex() or ei.dtype == torch.bool:
            raise TypeError(f"edge_index must hold integers, got dtype {ei.dtype}")
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must be [2, E], got shape {tuple(ei.shape)}")
        ei = ei.long()
        if ei.numel():
            bad = (ei < 0) | (ei >= n)
            if bool(bad.any()):
                row, edge = _first_index(bad)
                raise ValueError(
                    f"edge_index values must lie in [0, N={n}), got {int(ei[row, edge])} at "
                    f"edge {edge} (row {row}); range of edge_index: [{int(ei.min())}, "
                    f"{int(ei.max())}]"
                )
        return ei.contiguous()

    @staticmethod
    def _edge_attr(edge_attr: object, e: int) -> torch.Tensor | None:
        if edge_attr is None:
            return None
        attr = _as_float("edge_attr", edge_attr)
        if attr.dim() == 1:
            attr = attr[:, None]
        if attr.dim() != 2 or attr.shape[0] != e:
            raise ValueError(
                f"edge_attr must be [E={e}, D] or [E={e}], got shape {tuple(attr.shape)}"
            )
        _require_finite("edge_attr", attr)
        return attr.contiguous()

    @staticmethod
    def _static(static: object, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if static is None:
            return None, None
        s = _as_float("static", static)
        if s.dim() != 2 or s.shape[0] != n:
            raise ValueError(f"static must be [N={n}, S], got shape {tuple(s.shape)}")
        _require_finite("static", s)
        mean = s.double().mean(0)
        std = s.double().std(0, unbiased=False)
        z = (s.double() - mean) / torch.where(std > 0, std, 1.0)
        return s.contiguous(), z.float()

    def _covariates(
        self,
        covariates: object,
        t: int,
        n: int,
        mode: str,
        train_start: int,
        train_stop: int,
        min_std: float,
    ) -> tuple[torch.Tensor | None, PanelScaler | None]:
        if covariates is None:
            return None, None
        cov = _as_float("covariates", covariates)
        if not (
            (cov.dim() == 2 and cov.shape[0] == t)
            or (cov.dim() == 3 and cov.shape[0] == t and cov.shape[1] == n)
        ):
            raise ValueError(
                f"covariates must be [T={t}, N={n}, K] or [T={t}, K], got shape {tuple(cov.shape)}"
            )
        _require_finite("covariates", cov, " (they are known in advance: no missing values)")
        if cov.dim() == 2:
            cov = cov[:, None, :]
        scaler = PanelScaler.fit(cov[train_start:train_stop], mode, min_std=min_std)
        return (cov if mode == "none" else scaler.transform(cov)).contiguous(), scaler

    def _to_step(self, value: object, what: str) -> int:
        """A split boundary as a step index (an int, or a timestamp when there are dates)."""
        t = self.steps
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            step = int(value)
        else:
            if self._timestamps is None:
                raise ValueError(
                    f"split boundary {what}={value!r} must be an int step (the calendar has "
                    "no dates to look a timestamp up in)"
                )
            try:
                stamp = np.datetime64(value, "s")
            except (TypeError, ValueError):
                raise ValueError(
                    f"split boundary {what}={value!r} is neither an int step nor a timestamp"
                ) from None
            step = int(np.searchsorted(self._timestamps, stamp, side="left"))
        if not 0 <= step <= t:
            raise ValueError(f"split boundary {what}={value!r} must lie in [0, T={t}], got {step}")
        return step

    def _resolve_splits(self, splits: object, t: int) -> dict[str, tuple[int, int]]:
        if isinstance(splits, Mapping):
            out = {}
            for name, bounds in splits.items():
                _check_choice("split name", name, SPLIT_NAMES)
                if not isinstance(bounds, Sequence) or len(bounds) != 2:
                    raise ValueError(f"split {name!r} must be (start, stop), got {bounds!r}")
                out[name] = (
                    self._to_step(bounds[0], f"{name}.start"),
                    self._to_step(bounds[1], f"{name}.stop"),
                )
        elif isinstance(splits, Sequence) and not isinstance(splits, str) and splits:
            values = list(splits)
            if all(isinstance(v, float) for v in values):
                if len(values) not in (2, 3):
                    raise ValueError(
                        f"split fractions must be (train, val, test) or (train, test), got {splits!r}"
                    )
                if any(not (math.isfinite(v) and v > 0) for v in values) or not math.isclose(
                    sum(values), 1.0, abs_tol=1e-6
                ):
                    raise ValueError(
                        f"split fractions must be positive and sum to 1, got {splits!r} "
                        f"(sum {sum(values)!r})"
                    )
                names = SPLIT_NAMES if len(values) == 3 else ("train", "test")
                cuts = [0]
                for f in values[:-1]:
                    cuts.append(cuts[-1] + round(t * f))
                cuts.append(t)
                out = {name: (cuts[i], cuts[i + 1]) for i, name in enumerate(names)}
            else:
                if len(values) not in (1, 2):
                    raise ValueError(
                        "split boundaries must be (val_start, test_start) or (test_start,), "
                        f"got {splits!r}"
                    )
                cuts = [0, *(self._to_step(v, "boundary") for v in values), t]
                names = SPLIT_NAMES if len(values) == 2 else ("train", "test")
                out = {name: (cuts[i], cuts[i + 1]) for i, name in enumerate(names)}
        else:
            raise TypeError(
                "splits must be fractions (0.7, 0.15, 0.15), boundaries (val_start, "
                f"test_start) or {{name: (start, stop)}}, got {splits!r}"
            )
        if "train" not in out:
            raise ValueError(
                f"splits must include 'train' (normalisation is fitted there), got {list(out)}"
            )
        for name, (start, stop) in out.items():
            if start >= stop:
                raise ValueError(
                    f"split {name!r} must have start < stop, got [{start}, {stop}) (T={t})"
                )
        ordered = [name for name in SPLIT_NAMES if name in out]
        for earlier, later in itertools.pairwise(ordered):
            if out[later][0] < out[earlier][1]:
                raise ValueError(
                    f"splits must be chronological and disjoint: {earlier!r} is "
                    f"[{out[earlier][0]}, {out[earlier][1]}) but {later!r} starts at "
                    f"{out[later][0]}"
                )
        return {name: out[name] for name in ordered}

    # --- shape and bookkeeping ------------------------------------------------------------

    @property
    def steps(self) -> int:
        """T."""
        return int(self.raw.shape[0])

    @property
    def nodes(self) -> int:
        """N."""
        return int(self.raw.shape[1])

    @property
    def channels(self) -> int:
        """C, the target channels."""
        return int(self.raw.shape[2])

    @property
    def input_channels(self) -> int:
        """C' of ``x``: C, or 2C with the missing indicator."""
        return self.channels * (2 if self.missing_indicator else 1)

    @property
    def covariate_count(self) -> int:
        """K (0 without covariates)."""
        return 0 if self.covariates is None else int(self.covariates.shape[2])

    @property
    def season_features(self) -> int:
        """The width of ``season_x`` / ``season_y`` (0 without a calendar)."""
        return 0 if self.season is None else int(self.season.shape[1])

    def timestamps(self, index: object = None) -> np.ndarray | None:
        """The ``datetime64[s]`` of steps ``index`` (all steps for None; any int array, e.g.
        ``batch.time_y``), or None when the calendar has no dates."""
        if self._timestamps is None:
            return None
        if index is None:
            return self._timestamps
        return self._timestamps[np.asarray(index, dtype=np.int64)]

    def split_bounds(self, split: str) -> tuple[int, int]:
        """``(start, stop)`` steps of a split (stop exclusive)."""
        if split not in self.splits:
            raise ValueError(
                f"split must be one of {', '.join(map(repr, self.splits))}, got {split!r}"
            )
        return self.splits[split]

    def summary(self) -> dict[str, object]:
        """Plain numbers describing the panel (for logs)."""
        observed = ~torch.isnan(self.raw)
        return {
            "steps": self.steps,
            "nodes": self.nodes,
            "channels": self.channels,
            "edges": int(self.edge_index.shape[1]),
            "covariates": self.covariate_count,
            "season_features": self.season_features,
            "splits": {k: list(v) for k, v in self.splits.items()},
            "normalize": self.scaler.mode,
            "missing": int((~observed).sum()),
            "zero_fraction": float((self.raw[observed] == 0).double().mean())
            if bool(observed.any())
            else math.nan,
        }

    # --- normalisation ----------------------------------------------------------------------

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``[..., N, C]`` values to the normalised space of ``x``/``y``."""
        return self.scaler.transform(x)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised ``[..., N, C]`` values (a prediction of ``y``) back to raw units."""
        return self.scaler.inverse(z)

    # --- windows ----------------------------------------------------------------------------

    def _bounds(self, split: str | tuple[int, int]) -> tuple[int, int]:
        if isinstance(split, str):
            return self.split_bounds(split)
        if isinstance(split, Sequence) and len(split) == 2:
            start, stop = self._to_step(split[0], "start"), self._to_step(split[1], "stop")
            if start >= stop:
                raise ValueError(f"period must have start < stop, got [{start}, {stop})")
            return start, stop
        raise TypeError(f"split must be a split name or (start, stop), got {split!r}")

    def split_origins(
        self,
        split: str | tuple[int, int],
        lookback: int,
        horizon: int,
        stride: int = 1,
        partial: bool = False,
    ) -> torch.Tensor:
        """The forecast origins of a split (int64): every ``stride``-th t from the first
        with all L inputs at steps >= 0 and the first target inside the split, to the last
        with all H targets inside it (with ``partial=True``: with at least one)."""
        lookback = _check_int("lookback", lookback, 1)
        horizon = _check_int("horizon", horizon, 1)
        stride = _check_int("stride", stride, 1)
        start, stop = self._bounds(split)
        first = max(start - 1, lookback - 1)
        last = stop - 2 if partial else stop - horizon - 1
        if last < first:
            name = split if isinstance(split, str) else "period"
            raise ValueError(
                f"split {name!r} covers steps [{start}, {stop}) ({stop - start} steps): too short "
                f"for lookback={lookback} + horizon={horizon}. A window needs its {horizon} "
                f"targets inside the split and its {lookback} inputs at steps >= 0, so origins "
                f"would run from {first} to {last}"
            )
        return torch.arange(first, last + 1, stride, dtype=torch.int64)

    def window_batch(
        self,
        origins: torch.Tensor | Sequence[int],
        lookback: int,
        horizon: int,
        limit: int | None = None,
    ) -> PanelBatch:
        """The windows at ``origins`` (one advanced index per field).

        ``limit`` (default T): targets at steps >= limit are masked (NaN, ``y_mask``
        False) and never read; covariates and seasonal features of steps beyond the
        series repeat its last step (those steps have no target)."""
        lookback = _check_int("lookback", lookback, 1)
        horizon = _check_int("horizon", horizon, 1)
        o = torch.as_tensor(origins, dtype=torch.int64).reshape(-1)
        t = self.steps
        stop = t if limit is None else min(int(limit), t)
        if o.numel() and (int(o.min()) < lookback - 1 or int(o.max()) > stop - 2):
            raise ValueError(
                f"origins must lie in [lookback - 1 = {lookback - 1}, {stop - 2}] (inputs from "
                f"step 0, at least one target before step {stop}), got [{int(o.min())}, "
                f"{int(o.max())}]"
            )
        past = o[:, None] + torch.arange(1 - lookback, 1)[None, :]
        ahead = o[:, None] + torch.arange(1, horizon + 1)[None, :]
        outside = ahead >= stop
        read = ahead.clamp(max=stop - 1)

        xv = self.values[past]
        x_mask = ~torch.isnan(xv)
        x = torch.where(x_mask, xv, torch.full_like(xv, self.fill_value))
        if self.missing_indicator:
            x = torch.cat([x, x_mask.to(x.dtype)], -1)
        y, y_raw = self.values[read], self.raw[read]  # fresh tensors (advanced indexing)
        if bool(outside.any()):
            y[outside] = math.nan
            y_raw[outside] = math.nan
        y_mask = ~torch.isnan(y_raw)

        known = ahead.clamp(max=t - 1)
        cov_x = cov_y = season_x = season_y = None
        if self.covariates is not None:
            shape = (-1, -1, self.nodes, -1)
            cov_x = self.covariates[past].expand(shape)
            cov_y = self.covariates[known].expand(shape)
        if self.season is not None:
            season_x, season_y = self.season[past], self.season[known]
        return PanelBatch(
            x=x,
            x_mask=x_mask,
            y=y,
            y_raw=y_raw,
            y_mask=y_mask,
            origin=o,
            time_x=past,
            time_y=ahead,
            cov_x=cov_x,
            cov_y=cov_y,
            season_x=season_x,
            season_y=season_y,
        )

    def windows(
        self,
        split: str,
        lookback: int,
        horizon: int,
        stride: int = 1,
        cache: str = "auto",
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> PanelWindows:
        """The windows of a split as a :class:`PanelWindows` dataset."""
        return PanelWindows(self, split, lookback, horizon, stride, cache, max_cache_bytes)

    def rolling_origin(
        self,
        lookback: int,
        horizon: int,
        split: str | tuple[int, int] = "test",
        every: int = 1,
        partial: bool = False,
        batch_size: int = 1,
    ) -> Iterator[PanelBatch]:
        """Rolling-origin evaluation over a period: a split name or ``(start, stop)`` steps
        (or timestamps).

        Yields :class:`PanelBatch` es of ``batch_size`` consecutive origins (``every`` steps
        apart), from the origin whose first target is the period's first step to the last
        whose H targets all lie in the period; ``partial=True`` goes on to the origin just
        before the period's last step, masking targets past the period (they are not read).
        Each window's inputs are the L steps up to its origin, which may precede the
        period.

        Examples:
            >>> import torch
            >>> from fastcore.data.panel import PanelData
            >>> panel = PanelData(torch.rand(30, 3), torch.zeros(2, 0, dtype=torch.long),
            ...                   splits=(24,), normalize="none")
            >>> [b.origin.tolist() for b in panel.rolling_origin(4, 2, every=2)]
            [[23], [25], [27]]
            >>> last = list(panel.rolling_origin(4, 2, partial=True))[-1]
            >>> last.origin.tolist(), last.y_mask[0, :, 0, 0].tolist()
            ([28], [True, False])
        """
        every = _check_int("every", every, 1)
        batch_size = _check_int("batch_size", batch_size, 1)
        _, stop = self._bounds(split)
        # Validated here, not on the first next(): a bad period fails at the call.
        origins = self.split_origins(split, lookback, horizon, every, partial)
        return (
            self.window_batch(chunk, lookback, horizon, limit=stop)
            for chunk in origins.split(batch_size)
        )


class PanelWindows(Dataset):
    """The forecast windows of one split: a ``torch.utils.data.Dataset``.

    ``len`` is the number of origins (:meth:`PanelData.split_origins`); ``windows[i]`` is a
    dict of one window's tensors (the :class:`PanelBatch` fields without the batch dim,
    None fields left out; ``PanelBatch.collate`` stacks them, use it as a DataLoader's
    ``collate_fn``); :meth:`batch` gathers several windows in one step and
    :meth:`batches` iterates over the split in batches. ``cache`` as in the module
    docstring; ``mode`` is the one chosen.

    Examples:
        >>> import torch
        >>> from fastcore.data.panel import PanelData
        >>> panel = PanelData(torch.rand(50, 4, 2), torch.tensor([[0, 1, 2], [1, 2, 3]]))
        >>> val = panel.windows("val", lookback=8, horizon=3, cache="lazy")
        >>> len(val), val.mode, tuple(val[0]["x"].shape)
        (6, 'lazy', (8, 4, 2))
        >>> [len(b) for b in val.batches(4)]
        [4, 2]
    """

    def __init__(
        self,
        panel: PanelData,
        split: str,
        lookback: int,
        horizon: int,
        stride: int = 1,
        cache: str = "auto",
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        _check_choice("cache", cache, CACHE_MODES)
        self.panel, self.split = panel, split
        self.origins = panel.split_origins(split, lookback, horizon, stride)
        self.lookback, self.horizon, self.stride = int(lookback), int(horizon), int(stride)
        if cache == "auto":
            cache = "eager" if self.cache_bytes() <= max_cache_bytes else "lazy"
        self.mode = cache
        self._cache = (
            panel.window_batch(self.origins, self.lookback, self.horizon)
            if cache == "eager"
            else None
        )

    def cache_bytes(self) -> int:
        """Bytes an eager cache of this split's windows takes (or would take)."""
        p, L, H = self.panel, self.lookback, self.horizon
        n, c = p.nodes, p.channels
        per = L * n * (4 * p.input_channels + c) + H * n * c * (4 + 4 + 1) + 8 * (L + H + 1)
        if p.covariates is not None:
            per += 4 * (L + H) * int(p.covariates.shape[1]) * p.covariate_count
        per += 4 * (L + H) * p.season_features
        return per * len(self)

    def __len__(self) -> int:
        return int(self.origins.numel())

    def _index(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(
                f"window index out of range for {n} windows, got [{int(idx.min())}, {int(idx.max())}]"
            )
        return idx % max(n, 1)

    def batch(self, indices) -> PanelBatch:
        """Windows ``indices`` (ints in [-len, len)) stacked into one :class:`PanelBatch`."""
        idx = self._index(indices)
        if self._cache is not None:
            return self._cache.select(idx)
        return self.panel.window_batch(self.origins[idx], self.lookback, self.horizon)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.batch([i]).items()}

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[PanelBatch]:
        """Every window once, in batches of ``batch_size`` (chronological, or shuffled with
        ``generator``); ``drop_last`` skips a last, smaller batch."""
        batch_size = _check_int("batch_size", batch_size, 1)
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for chunk in order.split(batch_size):
            if drop_last and chunk.numel() < batch_size:
                return
            yield self.batch(chunk)
