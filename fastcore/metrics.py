"""Forecast metrics hydrologists use, per basin and aggregated, with missing values masked.

Every function takes ``pred`` and ``obs`` of the same shape ``(..., T, N)``: time on
``time_dim`` (default -2) and basins on the last dim; every other leading dim (batch,
horizon, ...) is folded into time. NaN in ``obs`` (a missing observation) or a False in
``mask`` removes that entry from every sum; nothing is imputed. Metrics are computed in
float64 on the de-normalised values the caller passes.

Definitions (per basin, over its valid entries; ``o`` observed, ``p`` predicted):

* ``rmse = sqrt(mean((p - o)^2))``, ``mae = mean(|p - o|)``;
* ``nse = 1 - sum((p - o)^2) / sum((o - mean(o))^2)`` (Nash & Sutcliffe 1970; 1 is perfect,
  0 is as good as the basin's observed mean);
* ``r2``: the squared Pearson correlation of p and o (coefficient of determination of the
  linear fit);
* ``kge = 1 - sqrt((r - 1)^2 + (alpha - 1)^2 + (beta - 1)^2)`` with ``r`` the Pearson
  correlation, ``alpha = std(p) / std(o)`` and ``beta = mean(p) / mean(o)`` (Gupta et al.
  2009, J. Hydrol. 377, the original definition, not the 2012 variability ratio).

A basin with fewer than 2 valid entries, or a constant observed series (zero variance), has
NaN for the metrics that divide by that variance (nse, r2, kge) and is left out of the
aggregates, which are the median and the mean over the basins where the metric is finite
(``count`` says how many). A constant prediction has no linear relation to the
observations: its correlation counts as 0 (not NaN), so r2 is 0 and kge stays finite.
"""

from __future__ import annotations

import math

import torch

METRICS = ("rmse", "mae", "r2", "nse", "kge")


def _prepare(
    pred: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor | None, time_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, o, valid)`` as float64 ``[T', N]`` with masked entries zeroed."""
    if pred.shape != obs.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and obs {tuple(obs.shape)} must match")
    if pred.dim() < 2:
        raise ValueError(f"pred/obs must be (..., T, N), got {tuple(pred.shape)}")
    td = time_dim % pred.dim()
    if td == pred.dim() - 1:
        raise ValueError("time_dim must not be the basin (last) dim")
    p, o = pred.detach().double(), obs.detach().double()
    valid = torch.isfinite(o) & torch.isfinite(p)
    if mask is not None:
        if mask.shape != pred.shape:
            mask = mask.expand(pred.shape)
        valid = valid & mask.bool()
    n = pred.shape[-1]
    p = p.movedim(td, -2).reshape(-1, n)
    o = o.movedim(td, -2).reshape(-1, n)
    valid = valid.movedim(td, -2).reshape(-1, n)
    zero = torch.zeros((), dtype=torch.float64, device=p.device)
    return torch.where(valid, p, zero), torch.where(valid, o, zero), valid


def per_basin(
    pred: torch.Tensor,
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    time_dim: int = -2,
) -> dict[str, torch.Tensor]:
    """Each metric of :data:`METRICS` per basin (``[N]`` float64) plus ``count`` (valid
    entries per basin).

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, float("nan")], [4.0, 2.0]])  # (T, N)
        >>> pred = torch.tensor([[1.1, 1.0], [1.9, 3.0], [3.2, 0.0], [3.8, 2.0]])
        >>> scores = metrics.per_basin(pred, obs)
        >>> scores["count"].tolist()  # basin 1's NaN observation is left out
        [4.0, 3.0]
        >>> [round(v, 4) for v in scores["rmse"].tolist()]
        [0.1581, 0.8165]
    """
    p, o, valid = _prepare(pred, obs, mask, time_dim)
    w = valid.double()
    count = w.sum(0)
    safe = count.clamp_min(1)
    err = p - o
    rmse = (err.square().sum(0) / safe).sqrt()
    mae = err.abs().sum(0) / safe
    mean_o, mean_p = o.sum(0) / safe, p.sum(0) / safe
    do, dp = (o - mean_o) * w, (p - mean_p) * w
    var_o, var_p = do.square().sum(0), dp.square().sum(0)
    cov = (do * dp).sum(0)
    nan = torch.tensor(math.nan, dtype=torch.float64, device=p.device)
    enough = (count >= 2) & (var_o > 0)
    nse = torch.where(enough, 1 - err.square().sum(0) / var_o.where(enough, 1), nan)
    r = cov / (var_o * var_p).sqrt().where(enough & (var_p > 0), 1)
    r = torch.where(enough & (var_p > 0), r, torch.where(enough, 0.0, nan))
    r2 = r.square()
    alpha = (var_p / var_o.where(enough, 1)).sqrt()
    beta = mean_p / mean_o.where(mean_o != 0, 1)
    kge = 1 - ((r - 1).square() + (alpha - 1).square() + (beta - 1).square()).sqrt()
    kge = torch.where(enough & (mean_o != 0), kge, nan)
    none = count == 0
    rmse, mae = rmse.where(~none, nan), mae.where(~none, nan)
    return {"rmse": rmse, "mae": mae, "r2": r2, "nse": nse, "kge": kge, "count": count}


def summarize(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{metric}_median``, ``{metric}_mean`` and ``{metric}_basins`` over the basins where
    the metric is finite (NaN when none is)."""
    out: dict[str, float] = {}
    for name in METRICS:
        v = values[name]
        finite = v[torch.isfinite(v)]
        out[f"{name}_median"] = float(finite.median()) if finite.numel() else math.nan
        out[f"{name}_mean"] = float(finite.mean()) if finite.numel() else math.nan
        out[f"{name}_basins"] = int(finite.numel())
    return out


def evaluate(
    pred: torch.Tensor,
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    time_dim: int = -2,
) -> dict[str, float]:
    """The aggregated metrics of :func:`per_basin` (see :func:`summarize`) plus the
    number of valid and missing entries.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, float("nan")], [4.0, 2.0]])
        >>> pred = torch.tensor([[1.1, 1.0], [1.9, 3.0], [3.2, 0.0], [3.8, 2.0]])
        >>> out = metrics.evaluate(pred, obs)
        >>> round(out["nse_median"], 4), out["nse_basins"], out["valid"], out["missing"]
        (0.98, 1, 7, 1)
    """
    basins = per_basin(pred, obs, mask, time_dim)
    out = summarize(basins)
    out["valid"] = int(basins["count"].sum())
    out["missing"] = int(pred.numel() - out["valid"])
    return out


def rmse(pred, obs, mask=None, time_dim=-2) -> torch.Tensor:
    """Root-mean-square error per basin ``[N]``."""
    return per_basin(pred, obs, mask, time_dim)["rmse"]


def mae(pred, obs, mask=None, time_dim=-2) -> torch.Tensor:
    """Mean absolute error per basin ``[N]``."""
    return per_basin(pred, obs, mask, time_dim)["mae"]


def nse(pred, obs, mask=None, time_dim=-2) -> torch.Tensor:
    """Nash-Sutcliffe efficiency per basin ``[N]``.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0], [4.0, 2.0]])  # (T, N)
        >>> pred = torch.tensor([[1.1, 1.0], [1.9, 3.0], [3.2, 0.0], [3.8, 2.0]])
        >>> [round(v, 4) for v in metrics.nse(pred, obs).tolist()]  # basin 1 is constant
        [0.98, nan]
    """
    return per_basin(pred, obs, mask, time_dim)["nse"]


def r2(pred, obs, mask=None, time_dim=-2) -> torch.Tensor:
    """Squared Pearson correlation per basin ``[N]``."""
    return per_basin(pred, obs, mask, time_dim)["r2"]


def kge(pred, obs, mask=None, time_dim=-2) -> torch.Tensor:
    """Kling-Gupta efficiency (Gupta et al. 2009) per basin ``[N]``.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # (T, N=1)
        >>> metrics.kge(obs, obs).tolist()  # a perfect forecast
        [1.0]
        >>> [round(v, 4) for v in metrics.kge(obs * 0.5, obs).tolist()]  # r = 1, alpha = beta = 0.5
        [0.2929]
    """
    return per_basin(pred, obs, mask, time_dim)["kge"]
