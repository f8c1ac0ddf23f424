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

The second half of the module scores panel forecasts (any shape, nodes on ``node_dim``)
and probabilistic ones: :func:`point_scores` (MAE, RMSE overall and per node), the CRPS of
the distribution heads' predictive distributions (:func:`crps`: closed form for the
Gaussian, an exact sum over the integers for Poisson / NB / ZINB), the sample CRPS
(:func:`crps_samples`), prediction-interval coverage and width (:func:`interval_coverage`,
:func:`interval_scores`) and the mean NLL (:func:`mean_nll`); its conventions are stated
above :data:`DISTRIBUTIONS`.
"""

from __future__ import annotations

import math
import warnings

import torch

from fastcore import losses

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


# ---------------------------------------------------------------------------------------
# Panel forecasts: point errors per node and overall, probabilistic scores of the
# distribution heads (fastcore.nn.heads), interval coverage
# ---------------------------------------------------------------------------------------
#
# Conventions of the functions below (they differ from the basin metrics above in one
# respect: a non-finite *prediction* at a valid entry is not masked, it propagates, so a
# broken model shows as NaN instead of a flattering score):
#
# * ``obs`` has any shape ``S``; NaN (or inf) in ``obs`` and False in ``mask`` (bool,
#   broadcastable to ``S``) remove an entry; nothing is imputed.
# * ``node_dim=None`` aggregates over every valid entry (a 0-d tensor); an int aggregates
#   per index of that dim (an ``[N]`` tensor; NaN for a node without a valid entry).
# * Everything is computed in float64, detached.
# * A distribution is named by ``dist`` (see :data:`DISTRIBUTIONS`) and given as a dict of
#   parameter tensors that broadcast to ``S``, the output format of the heads.

DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "gaussian": ("loc", "scale"),
    "poisson": ("log_rate",),
    "nb": ("log_mu", "log_theta"),
    "zinb": ("log_mu", "log_theta", "pi_logits"),
}
"""Distribution name -> the names of its parameters (the keys of a head's output dict).

``gaussian``: mean ``loc`` and standard deviation ``scale`` (> 0). ``poisson``: log of the
rate. ``nb``: log of the mean ``mu`` and log of the inverse dispersion ``theta`` (size;
Var = mu + mu^2 / theta). ``zinb``: the ``nb`` parameters plus the logit of the
zero-inflation probability pi (P(0) = pi + (1 - pi) NB(0))."""

COUNT_DISTRIBUTIONS = ("poisson", "nb", "zinb")

DEFAULT_MAX_COUNT = 1 << 20
"""Largest count the exact integer scans (count quantiles, count CRPS) visit by default."""

# The integer scans evaluate the pmf on chunks [A active elements, W counts]: W starts at
# _SCAN_WIDTH and doubles each pass (so a quantile k costs O(log k) passes and at most 2k
# pmf evaluations), capped so that A * W stays under _SCAN_BUDGET float64 values (32 MiB).
_SCAN_WIDTH = 64
_SCAN_BUDGET = 1 << 22
# A count quantile is the smallest k with F(k) >= q - _CDF_TOL (float64 sums of the pmf
# carry rounding of this order).
_CDF_TOL = 1e-12
# The count CRPS stops summing once k >= y and 1 - F(k) <= _CRPS_TAIL: the omitted tail
# sum_{j > k} (1 - F(j))^2 <= (1 - F(k)) E[Y], so its absolute error is <= 1e-10 E[Y].
_CRPS_TAIL = 1e-10


def _valid_entries(obs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = torch.isfinite(obs)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = valid), got {mask.dtype}")
        try:
            mask = mask.expand(obs.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} must broadcast to obs {tuple(obs.shape)}"
            ) from None
        valid = valid & mask
    return valid


def _aggregate(
    values: torch.Tensor, valid: torch.Tensor, node_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over valid entries, count)``, overall or per index of ``node_dim``."""
    values = values.double()
    w = valid.to(torch.float64)
    v = torch.where(valid, values, torch.zeros((), dtype=torch.float64, device=values.device))
    if node_dim is None:
        count = w.sum()
        total = v.sum()
    else:
        if not -values.dim() <= node_dim < values.dim():
            raise ValueError(
                f"node_dim {node_dim} is out of range for a {values.dim()}-D input of shape "
                f"{tuple(values.shape)}"
            )
        nd = node_dim % values.dim()
        v, w = v.movedim(nd, -1), w.movedim(nd, -1)
        n = v.shape[-1]
        total, count = v.reshape(-1, n).sum(0), w.reshape(-1, n).sum(0)
    mean = total / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, math.nan)), count


def point_scores(
    pred: torch.Tensor,
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    node_dim: int = -2,
) -> dict[str, torch.Tensor]:
    """MAE and RMSE of a point forecast, overall and per node, NaN-masked.

    Shapes: ``pred`` and ``obs`` the same shape ``S`` (e.g. ``[B, H, N, C]`` panel windows,
    nodes on ``node_dim``, default -2); ``mask`` bool broadcastable to ``S``. Returns float64
    tensors: ``mae`` and ``rmse`` (0-d, over every valid entry), ``mae_node`` and
    ``rmse_node`` (``[N]``, NaN for a node without a valid entry), ``count`` (0-d) and
    ``count_node`` (``[N]``). The overall RMSE is over entries, not the mean of the nodes'
    RMSEs. A non-finite prediction at a valid entry is not masked: it makes the scores NaN.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([[[1.0], [0.0]], [[3.0], [float("nan")]]])  # [H=2, N=2, C=1]
        >>> pred = torch.tensor([[[2.0], [0.0]], [[1.0], [5.0]]])
        >>> s = metrics.point_scores(pred, obs)
        >>> s["mae"].item(), s["mae_node"].tolist(), s["count_node"].tolist()
        (1.0, [1.5, 0.0], [2.0, 1.0])
        >>> round(s["rmse"].item(), 4), s["rmse_node"].tolist()[1]
        (1.291, 0.0)
    """
    if pred.shape != obs.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and obs {tuple(obs.shape)} must match")
    valid = _valid_entries(obs, mask)
    err = pred.detach().double() - obs.detach().double()
    mae, count = _aggregate(err.abs(), valid, None)
    mse, _ = _aggregate(err.square(), valid, None)
    mae_node, count_node = _aggregate(err.abs(), valid, node_dim)
    mse_node, _ = _aggregate(err.square(), valid, node_dim)
    return {
        "mae": mae,
        "rmse": mse.sqrt(),
        "mae_node": mae_node,
        "rmse_node": mse_node.sqrt(),
        "count": count,
        "count_node": count_node,
    }


def _check_dist(dist: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of ``dist`` from ``params`` (float64, detached), validated."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {', '.join(map(repr, DISTRIBUTIONS))}, got {dist!r}")
    names = DISTRIBUTIONS[dist]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"{dist!r} needs parameters {', '.join(names)}; params has {', '.join(params) or 'none'}"
        )
    out = {}
    for n in names:
        t = params[n]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params[{n!r}] must be a torch.Tensor, got {type(t).__name__}")
        out[n] = t.detach().double()
    return out


def _broadcast(params: dict[str, torch.Tensor], *others: torch.Tensor) -> tuple:
    """Every tensor broadcast to the common shape (views)."""
    tensors = torch.broadcast_tensors(*params.values(), *others)
    k = len(params)
    return dict(zip(params, tensors[:k], strict=True)), tensors[k:]


def _finite_params(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool, True where every (broadcast) parameter is finite."""
    return torch.stack([torch.isfinite(t) for t in p.values()]).all(0)


def log_prob(dist: str, params: dict[str, torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """Elementwise log density (``gaussian``) or log pmf (count distributions), float64.

    Shapes: ``value`` and the parameters broadcast to ``S``; returns ``S``. Evaluated by the
    likelihoods of :mod:`fastcore.losses` (``-nll``, ``reduction="none"``), the same
    functions the heads train with.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> p = {"log_rate": torch.tensor([0.0])}  # rate 1
        >>> round(metrics.log_prob("poisson", p, torch.tensor([0.0])).exp().item(), 6)  # e^-1
        0.367879
    """
    p = _check_dist(dist, params)
    y = value.detach().double()
    if dist == "gaussian":
        return -losses.gaussian_nll(y, p["loc"], p["scale"], reduction="none")
    if dist == "poisson":
        return -losses.poisson_nll_logits(y, p["log_rate"], reduction="none")
    if dist == "nb":
        return -losses.negative_binomial_nll_logits(
            y, p["log_mu"], p["log_theta"], reduction="none"
        )
    return -losses.zero_inflated_negative_binomial_nll_logits(
        y, p["log_mu"], p["log_theta"], p["pi_logits"], reduction="none"
    )


def _count_scan(
    dist: str,
    flat: dict[str, torch.Tensor],
    max_count: int,
    step,
) -> torch.Tensor:
    """Walk k = 0, 1, ..., max_count in chunks for every element of ``flat`` (``[M]``
    float64 parameters), calling ``step(active, k [1, W], cdf [A, W]) -> done [A]`` with
    the CDF at each k of the chunk; returns the indices never marked done."""
    m = next(iter(flat.values())).numel()
    device = next(iter(flat.values())).device
    active = torch.arange(m, device=device)
    cdf = torch.zeros(m, dtype=torch.float64, device=device)
    base, width = 0, _SCAN_WIDTH
    while active.numel() and base <= max_count:
        w = max(1, min(width, _SCAN_BUDGET // active.numel(), max_count + 1 - base))
        k = torch.arange(base, base + w, dtype=torch.float64, device=device)[None, :]
        sub = {name: t[active, None] for name, t in flat.items()}
        pmf = log_prob(dist, sub, k).exp()
        cdf_k = cdf[active, None] + pmf.cumsum(1)
        done = step(active, k, cdf_k)
        cdf[active] = cdf_k[:, -1]
        active = active[~done]
        base, width = base + w, width * 2
    return active


def _check_max_count(max_count: int) -> int:
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"max_count must be an int >= 1, got {max_count!r}")
    return max_count


def distribution_quantile(
    dist: str,
    params: dict[str, torch.Tensor],
    q: float | torch.Tensor,
    max_count: int = DEFAULT_MAX_COUNT,
) -> torch.Tensor:
    """The ``q``-quantile of each element's distribution, float64.

    Shapes: ``q`` a float or a tensor; it and the parameters broadcast to ``S``; returns
    ``S``. ``q`` must lie strictly inside (0, 1).

    * ``gaussian``: exact, ``loc + scale sqrt(2) erfinv(2q - 1)``.
    * count distributions: the smallest integer k with F(k) >= q (the generalised inverse
      of the CDF), found exactly by summing the pmf upwards from 0 in float64 (k with
      F(k) within 1e-12 below q count as reaching it, the order of the rounding of the
      sum). Vectorised: every element walks the same chunk of counts, resolved elements
      drop out, the chunk width doubles each pass (a quantile k costs O(log k) passes and
      at most 2k pmf evaluations per element), and a chunk holds at most 2^22 values.
      Bounded by ``max_count``: an element whose quantile lies above it gets
      ``max_count`` and a ``RuntimeWarning`` says how many did.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> p = {"log_mu": torch.tensor([0.0, 2.0]), "log_theta": torch.tensor([0.0, 5.0])}
        >>> metrics.distribution_quantile("nb", p, 0.5).tolist()  # medians of NB(1, 1), NB(7.39, 148)
        [0.0, 7.0]
        >>> g = {"loc": torch.tensor([1.0]), "scale": torch.tensor([2.0])}
        >>> round(metrics.distribution_quantile("gaussian", g, 0.975).item(), 4)
        4.9199
    """
    p = _check_dist(dist, params)
    max_count = _check_max_count(max_count)
    qt = torch.as_tensor(q, dtype=torch.float64, device=next(iter(p.values())).device)
    if qt.numel() and not bool(((qt > 0) & (qt < 1)).all()):
        raise ValueError(f"q must lie strictly between 0 and 1, got {q!r}")
    p, (qt,) = _broadcast(p, qt)
    if dist == "gaussian":
        return p["loc"] + p["scale"] * math.sqrt(2.0) * torch.erfinv(2.0 * qt - 1.0)
    shape = qt.shape
    # Elements with a non-finite parameter get NaN and stay out of the scan.
    keep = _finite_params(p).reshape(-1).nonzero().squeeze(1)
    flat = {n: t.reshape(-1)[keep] for n, t in p.items()}
    target = qt.reshape(-1)[keep] - _CDF_TOL
    found_at = torch.full(target.shape, float(max_count), dtype=torch.float64, device=qt.device)

    def step(active, k, cdf_k):
        hit = cdf_k >= target[active, None]
        found = hit.any(1)
        first = hit.to(torch.int8).argmax(1)
        found_at[active[found]] = k[0, first[found]]
        return found

    left = _count_scan(dist, flat, max_count, step) if keep.numel() else keep
    if left.numel():
        warnings.warn(
            f"distribution_quantile: {left.numel()} of {keep.numel()} {dist} quantiles lie "
            f"above max_count={max_count} and were returned as max_count",
            RuntimeWarning,
            stacklevel=2,
        )
    out = torch.full((qt.numel(),), math.nan, dtype=torch.float64, device=qt.device)
    out[keep] = found_at
    return out.reshape(shape)


def crps_gaussian(loc: torch.Tensor, scale: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Elementwise CRPS of N(loc, scale^2) at ``obs``, closed form (float64)::

        CRPS = scale [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)],   z = (obs - loc) / scale

    (Gneiting & Raftery 2007). Shapes broadcast; lower is better; in the units of ``obs``.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> one = torch.ones(1)
        >>> round(metrics.crps_gaussian(0 * one, one, 0 * one).item(), 6)  # (sqrt(2) - 1) / sqrt(pi)
        0.233695
    """
    loc, scale, obs = (t.detach().double() for t in (loc, scale, obs))
    z = (obs - loc) / scale
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    cdf = torch.special.ndtr(z)
    return scale * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))


def _crps_count(
    dist: str, p: dict[str, torch.Tensor], y: torch.Tensor, valid: torch.Tensor, max_count: int
) -> torch.Tensor:
    """Elementwise count CRPS, NaN where not valid (see :func:`crps`)."""
    shape = y.shape
    keep = (valid & _finite_params(p)).reshape(-1).nonzero().squeeze(1)
    flat = {n: t.reshape(-1)[keep] for n, t in p.items()}
    yk = y.reshape(-1)[keep]
    acc = torch.zeros(yk.shape, dtype=torch.float64, device=y.device)

    def step(active, k, cdf_k):
        ya = yk[active, None]
        acc[active] += (cdf_k - (k >= ya).to(torch.float64)).square().sum(1)
        return (k[0, -1] >= ya[:, 0]) & (1.0 - cdf_k[:, -1] <= _CRPS_TAIL)

    left = _count_scan(dist, flat, max_count, step) if keep.numel() else keep
    if left.numel():
        warnings.warn(
            f"crps: the sums of {left.numel()} of {keep.numel()} {dist} entries were cut at "
            f"max_count={max_count} before their tail fell below {_CRPS_TAIL:g}; their CRPS "
            "is a lower bound",
            RuntimeWarning,
            stacklevel=3,
        )
    out = torch.full((valid.numel(),), math.nan, dtype=torch.float64, device=y.device)
    out[keep] = acc
    return out.reshape(shape)


def crps(
    dist: str,
    params: dict[str, torch.Tensor],
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    node_dim: int | None = None,
    reduction: str = "mean",
    max_count: int = DEFAULT_MAX_COUNT,
) -> torch.Tensor:
    """Continuous ranked probability score of a predictive distribution, NaN-masked.

    CRPS(F, y) = integral of (F(x) - 1{y <= x})^2 dx: in the units of ``obs``, lower is
    better, equal to the absolute error for a point mass.

    * ``gaussian``: the closed form of :func:`crps_gaussian`.
    * count distributions (``obs`` non-negative integers): F is a step function with unit
      steps, so the integral is exactly the sum over integers
      ``sum_{k >= 0} (F(k) - 1{y <= k})^2``, summed (vectorised, float64) until k >= y and
      1 - F(k) <= 1e-10, which bounds the omitted tail by 1e-10 E[Y]. Bounded by
      ``max_count`` (a ``RuntimeWarning`` names the entries cut there).

    Shapes: the parameters and ``obs`` broadcast to ``S``; ``mask`` bool broadcastable to
    ``S``. ``reduction="none"`` returns ``S`` (NaN at invalid entries); ``"mean"`` the mean
    over valid entries, overall (``node_dim=None``, 0-d) or per node (``[N]``).

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([0.0, 3.0, float("nan")])
        >>> p = {"log_rate": torch.zeros(3)}  # Poisson(1) everywhere
        >>> [round(v, 4) for v in metrics.crps("poisson", p, obs, reduction="none").tolist()]
        [0.4762, 1.5229, nan]
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    max_count = _check_max_count(max_count)
    p = _check_dist(dist, params)
    p, (y,) = _broadcast(p, obs.detach().double())
    valid = _valid_entries(y, mask)
    if dist == "gaussian":
        values = crps_gaussian(p["loc"], p["scale"], y)
        values = torch.where(valid, values, torch.full_like(values, math.nan))
    else:
        values = _crps_count(dist, p, y, valid, max_count)
    if reduction == "none":
        return values
    return _aggregate(values, valid, node_dim)[0]


def crps_samples(
    samples: torch.Tensor,
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    node_dim: int | None = None,
    reduction: str = "mean",
    fair: bool = True,
) -> torch.Tensor:
    """CRPS estimated from ``m`` forecast samples per entry (any predictive distribution).

    Shapes: ``samples`` ``[m, *S]`` (samples on dim 0), ``obs`` ``S``; ``mask``, ``node_dim``
    and ``reduction`` as in :func:`crps`. The estimator is the energy form
    CRPS = E|X - y| - E|X - X'| / 2 with

    * ``fair=True`` (default): ``mean_i |x_i - y| - sum_{i<j} |x_i - x_j| / (m (m - 1))``,
      unbiased for the CRPS of the distribution the samples come from (Ferro 2014);
    * ``fair=False``: ``mean_i |x_i - y| - sum_{i<j} |x_i - x_j| / m^2``, the CRPS of the
      empirical distribution of the samples.

    ``sum_{i<j} |x_i - x_j|`` is computed from the sorted samples as
    ``sum_j x_(j) (2j - m - 1)``: O(m log m), not O(m^2). ``fair=True`` needs m >= 2.

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> samples = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # m = 4 samples of one entry
        >>> metrics.crps_samples(samples, torch.tensor([1.0]), fair=False).item()  # 1 - 10/16
        0.375
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if samples.dim() != obs.dim() + 1 or samples.shape[1:] != obs.shape:
        raise ValueError(
            f"samples must be [m, *obs.shape] = [m, {', '.join(map(str, obs.shape))}], got "
            f"{tuple(samples.shape)}"
        )
    m = samples.shape[0]
    if m < (2 if fair else 1):
        raise ValueError(f"crps_samples needs m >= {2 if fair else 1} samples, got {m}")
    x = samples.detach().double().sort(0).values
    y = obs.detach().double()
    valid = _valid_entries(y, mask)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    spread_shape = (m,) + (1,) * obs.dim()
    rank = torch.arange(1, m + 1, dtype=torch.float64, device=x.device).reshape(spread_shape)
    pair_sum = (x * (2.0 * rank - m - 1.0)).sum(0)
    denom = m * (m - 1) if fair else m * m
    values = (x - y_safe).abs().mean(0) - pair_sum / denom
    values = torch.where(valid, values, torch.full_like(values, math.nan))
    if reduction == "none":
        return values
    return _aggregate(values, valid, node_dim)[0]


def mean_nll(
    dist: str,
    params: dict[str, torch.Tensor],
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    node_dim: int | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood (nats per valid entry) of ``obs`` under the predictive
    distribution, overall (0-d) or per node (``[N]``), float64, NaN-masked.

    The likelihoods are those of :mod:`fastcore.losses` (see :func:`log_prob`): for count
    distributions a log pmf, for ``gaussian`` a log density (so its NLL depends on the units
    of ``obs`` and is not comparable with a count NLL).

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> p = {"loc": torch.zeros(2), "scale": torch.ones(2)}
        >>> round(metrics.mean_nll("gaussian", p, torch.tensor([0.0, float("nan")])).item(), 4)
        0.9189
    """
    p = _check_dist(dist, params)
    p, (y,) = _broadcast(p, obs.detach().double())
    valid = _valid_entries(y, mask)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    return _aggregate(-log_prob(dist, p, y_safe), valid, node_dim)[0]


def interval_coverage(
    lower: torch.Tensor,
    upper: torch.Tensor,
    obs: torch.Tensor,
    mask: torch.Tensor | None = None,
    node_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """Coverage and width of prediction intervals ``[lower, upper]`` (both ends included).

    Shapes: ``lower``, ``upper``, ``obs`` broadcast to ``S``; ``mask`` bool broadcastable
    to ``S``. Returns float64 ``coverage`` (fraction of valid entries with
    lower <= obs <= upper), ``width`` (mean of upper - lower over the same entries) and
    ``count``, overall (0-d) or per node (``[N]``).

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> obs = torch.tensor([0.0, 2.0, 5.0, float("nan")])
        >>> out = metrics.interval_coverage(torch.zeros(4), torch.full((4,), 3.0), obs)
        >>> out["coverage"].item(), out["width"].item(), out["count"].item()
        (0.6666666666666666, 3.0, 3.0)
    """
    lo, hi, y = torch.broadcast_tensors(
        lower.detach().double(), upper.detach().double(), obs.detach().double()
    )
    valid = _valid_entries(y, mask)
    inside = ((lo <= y) & (y <= hi)).to(torch.float64)
    coverage, count = _aggregate(inside, valid, node_dim)
    width, _ = _aggregate(hi - lo, valid, node_dim)
    return {"coverage": coverage, "width": width, "count": count}


def interval_scores(
    dist: str,
    params: dict[str, torch.Tensor],
    obs: torch.Tensor,
    levels: tuple[float, ...] = (0.5, 0.8, 0.95),
    mask: torch.Tensor | None = None,
    node_dim: int | None = None,
    max_count: int = DEFAULT_MAX_COUNT,
) -> dict[float, dict[str, torch.Tensor]]:
    """Coverage and width of the central prediction intervals of a predictive distribution.

    For each level l in ``levels`` (each in (0, 1)) the interval is
    ``[quantile((1 - l) / 2), quantile((1 + l) / 2)]`` (:func:`distribution_quantile`);
    returns ``{l: interval_coverage(...)}``. A well-calibrated forecast covers about l of
    the observations; for count distributions the interval's integer ends make the
    coverage at least l by construction (a discrete distribution has no exact l interval).

    Examples:
        >>> import torch
        >>> from fastcore import metrics
        >>> p = {"log_rate": torch.full((4,), 1.0986)}  # Poisson(3)
        >>> out = metrics.interval_scores("poisson", p, torch.tensor([0.0, 2.0, 3.0, 9.0]), levels=(0.8,))
        >>> out[0.8]["coverage"].item(), out[0.8]["width"].item()  # the 80% interval is [1, 5]
        (0.5, 4.0)
    """
    out: dict[float, dict[str, torch.Tensor]] = {}
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"interval levels must lie strictly between 0 and 1, got {level!r}")
        lo = distribution_quantile(dist, params, (1 - level) / 2, max_count)
        hi = distribution_quantile(dist, params, (1 + level) / 2, max_count)
        out[level] = interval_coverage(lo, hi, obs, mask, node_dim)
    return out
