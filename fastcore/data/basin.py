"""Forecast windows over a basin network's daily series, normalised on the training split.

A :class:`BasinSeries` holds what a forecaster sees per fine basin and day — observed
forcings ``[T, N, 3]`` (precipitation, temperature, PET) and observed discharge ``[T, N]``,
either possibly NaN where missing — plus static attributes ``[N, S]`` and the day of year.

Splits are by time (train, then validation, then test, never shuffled across). All
statistics are fit on the training days only:

* forcings: z-score per (basin, variable) with NaN ignored and the std clamped
  (:func:`fastcore.losses.safe_standardize`);
* discharge: :class:`DischargeScaler`, ``q / q_max`` per basin with ``q_max`` = ``headroom``
  times the basin's largest training discharge, so targets live in [0, 1 / headroom] and a
  sigmoid head can reach every plausible value; its inverse is exact.

A window at forecast origin t has inputs ``x [L, N, 5]`` over days t-L+1 .. t (the three
normalised forcings, the normalised discharge with missing days set to 0, and a 0/1
"discharge observed" flag), the horizon's forcings ``future [S, N, 3]`` (days t+1 .. t+S,
known: a hindcast set-up) and targets ``y [S, N]`` (normalised, NaN where missing: the
loss and the metrics mask them). Missing inputs are replaced by 0 and counted
(:attr:`BasinWindows.missing`), never passed on as NaN.

:func:`prepare` caches the normalised series to a ``.pt`` file (plain tensors and a dict
of numbers: loads with ``torch.load(weights_only=True)``) so repeated runs skip the
simulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastcore.losses import safe_standardize

FORCINGS = ("precip", "temp", "pet")
INPUTS = (*FORCINGS, "discharge", "discharge_observed")


@dataclass
class BasinSeries:
    """Raw daily observations of N basins over T days (float32; NaN = missing)."""

    forcings: torch.Tensor  # [T, N, 3]
    discharge: torch.Tensor  # [T, N] m3/s
    static: torch.Tensor  # [N, S]
    doy: torch.Tensor  # [T] int64

    def __post_init__(self) -> None:
        t, n = self.discharge.shape
        if self.forcings.shape != (t, n, len(FORCINGS)):
            raise ValueError(
                f"forcings must be [T={t}, N={n}, {len(FORCINGS)}], got {tuple(self.forcings.shape)}"
            )
        if self.static.dim() != 2 or self.static.shape[0] != n:
            raise ValueError(f"static must be [N={n}, S], got {tuple(self.static.shape)}")
        if self.doy.shape != (t,):
            raise ValueError(f"doy must be [T={t}], got {tuple(self.doy.shape)}")


class DischargeScaler:
    """``q -> q / q_max`` per basin and its exact inverse (``q_max [N]`` > 0)."""

    def __init__(self, q_max: torch.Tensor) -> None:
        if not bool((q_max > 0).all()):
            raise ValueError("q_max must be > 0 for every basin")
        self.q_max = q_max

    @classmethod
    def fit(cls, discharge: torch.Tensor, headroom: float = 1.5) -> DischargeScaler:
        """From training discharge ``[T, N]`` (NaN ignored); a basin with no valid value or
        a zero maximum gets 1."""
        peak = torch.where(torch.isnan(discharge), -torch.inf, discharge).amax(0)
        usable = torch.isfinite(peak) & (peak > 0)
        return cls(torch.where(usable, peak * headroom, torch.ones_like(peak)))

    def transform(self, q: torch.Tensor) -> torch.Tensor:
        return q / self.q_max.to(q.device, q.dtype)

    def inverse(self, q01: torch.Tensor) -> torch.Tensor:
        return q01 * self.q_max.to(q01.device, q01.dtype)


@dataclass
class Prepared:
    """The normalised series and the statistics that made it (see the module docstring)."""

    inputs: torch.Tensor  # [T, N, 5] float32, no NaN
    future: torch.Tensor  # [T, N, 3] float32 normalised forcings, no NaN
    target: torch.Tensor  # [T, N] float32 normalised discharge, NaN = missing
    static: torch.Tensor  # [N, S] float32, z-scored
    doy: torch.Tensor  # [T]
    forcing_mean: torch.Tensor  # [N, 3]
    forcing_std: torch.Tensor  # [N, 3]
    q_max: torch.Tensor  # [N]
    splits: dict[str, tuple[int, int]]  # name -> [start, stop) days
    missing: dict[str, int]

    @property
    def scaler(self) -> DischargeScaler:
        return DischargeScaler(self.q_max)

    def save(self, path: str | Path) -> None:
        blob = {k: getattr(self, k) for k in self.__dataclass_fields__}
        blob["splits"] = {k: list(v) for k, v in self.splits.items()}
        torch.save(blob, path)

    @classmethod
    def load(cls, path: str | Path) -> Prepared:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        blob["splits"] = {k: tuple(v) for k, v in blob["splits"].items()}
        return cls(**blob)


def split_days(days: int, fractions: tuple[float, float, float]) -> dict[str, tuple[int, int]]:
    """Consecutive ``train``, ``val``, ``test`` day ranges in the given proportions."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise ValueError(f"split fractions must be three positive numbers, got {fractions}")
    total = sum(fractions)
    a = round(days * fractions[0] / total)
    b = a + round(days * fractions[1] / total)
    return {"train": (0, a), "val": (a, b), "test": (b, days)}


def prepare(
    series: BasinSeries,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    headroom: float = 1.5,
    cache: str | Path | None = None,
) -> Prepared:
    """Normalise ``series`` with statistics of its training split; with ``cache``, save
    the result there (the caller decides when a cache is still valid)."""
    t = series.discharge.shape[0]
    splits = split_days(t, fractions)
    a, b = splits["train"]
    forc = series.forcings.float()
    _, f_mean, f_std = safe_standardize(forc[a:b], dim=0)
    z = (forc - f_mean) / f_std
    missing_forcings = int(torch.isnan(z).sum())
    z = torch.nan_to_num(z, nan=0.0)
    scaler = DischargeScaler.fit(series.discharge[a:b].float(), headroom)
    q01 = scaler.transform(series.discharge.float())
    observed = torch.isfinite(q01)
    inputs = torch.cat(
        [z, torch.nan_to_num(q01, nan=0.0)[..., None], observed[..., None].float()], -1
    )
    static, _, _ = safe_standardize(series.static.float(), dim=0)
    prepared = Prepared(
        inputs=inputs.contiguous(),
        future=z.contiguous(),
        target=q01.contiguous(),
        static=static,
        doy=series.doy.long(),
        forcing_mean=f_mean.squeeze(0),
        forcing_std=f_std.squeeze(0),
        q_max=scaler.q_max,
        splits=splits,
        missing={"forcings": missing_forcings, "discharge": int((~observed).sum())},
    )
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        prepared.save(cache)
    return prepared


class BasinWindows(Dataset):
    """Forecast windows whose targets lie inside one split.

    Item ``i`` -> ``(x [L, N, 5], future [S, N, 3], y [S, N])`` at origin ``origins[i]``
    (every ``stride``-th day)
    (the inputs of the first val/test windows reach back into the previous split: past
    observations only, never the split's own future).
    """

    def __init__(
        self, data: Prepared, split: str, lookback: int, horizon: int, stride: int = 1
    ) -> None:
        if split not in data.splits:
            raise ValueError(f"split must be one of {', '.join(data.splits)}, got {split!r}")
        if lookback < 1 or horizon < 1:
            raise ValueError(f"lookback and horizon must be >= 1, got {lookback}, {horizon}")
        start, stop = data.splits[split]
        # Targets t+1 .. t+S inside the split; inputs from day 0 on (earlier splits are
        # the past, so validation windows may read training days as their history).
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        first, end = max(start - 1, lookback - 1), stop - horizon
        self.origins = torch.arange(first, max(first, end), stride)
        if self.origins.numel() == 0:
            raise ValueError(
                f"split {split!r} ({stop - start} days) is too short for lookback {lookback} "
                f"+ horizon {horizon}"
            )
        self.data, self.lookback, self.horizon = data, lookback, horizon

    def __len__(self) -> int:
        return int(self.origins.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = int(self.origins[i])
        d = self.data
        return (
            d.inputs[t - self.lookback + 1 : t + 1],
            d.future[t + 1 : t + 1 + self.horizon],
            d.target[t + 1 : t + 1 + self.horizon],
        )

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items ``indices`` stacked, gathered in one indexing step each:
        ``(x [W, L, N, 5], future [W, S, N, 3], y [W, S, N])``."""
        t = self.origins[torch.as_tensor(indices, dtype=torch.long)][:, None]
        past = t + torch.arange(1 - self.lookback, 1)[None, :]
        ahead = t + torch.arange(1, self.horizon + 1)[None, :]
        d = self.data
        return d.inputs[past], d.future[ahead], d.target[ahead]

    def targets(self) -> torch.Tensor:
        """``[W, S, N]``: every window's normalised targets (NaN where missing)."""
        ahead = self.origins[:, None] + torch.arange(1, self.horizon + 1)[None, :]
        return self.data.target[ahead]


def climatology(data: Prepared) -> torch.Tensor:
    """``[366, N]`` mean normalised discharge per day of year over the training split
    (NaN ignored; a day never observed falls back to the basin's training mean)."""
    a, b = data.splits["train"]
    q = data.target[a:b]
    doy = data.doy[a:b] - 1
    valid = torch.isfinite(q)
    sums = torch.zeros(366, q.shape[1]).index_add_(0, doy, torch.where(valid, q, 0.0))
    counts = torch.zeros(366, q.shape[1]).index_add_(0, doy, valid.float())
    overall = sums.sum(0) / counts.sum(0).clamp_min(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), overall)


def static_attributes(level) -> torch.Tensor:
    """``[N, 4]``: log area, elevation, log upstream area, outlet latitude of a BasinLevel."""
    return torch.as_tensor(
        np.stack(
            [
                np.log1p(level.area_km2),
                level.elevation_m,
                np.log1p(level.upstream_area_km2),
                level.lat,
            ],
            1,
        ),
        dtype=torch.float32,
    )
