"""Numerically safe losses and penalties.

Count likelihoods (negative binomial, zero-inflated negative binomial), Gaussian KL with a
beta warm-up schedule, NaN-aware standardization, masked regression losses and soft
physical-constraint penalties. Every function is written for the edges where the textbook
formula overflows, cancels or returns NaN, and each documents what it does there.

Conventions shared by every function in this module:

* **Compute dtype.** float64 if any floating input is float64, else float32: float16 and
  bfloat16 inputs are upcast before any arithmetic, and losses are returned in the compute
  dtype (a half-precision input gives a float32 loss; :func:`safe_standardize` returns ``z``
  in the input dtype, see there). Under ``torch.autocast`` nothing changes: the inputs are
  upcast explicitly and no op used here is on an autocast lower-precision list.
* **reduction** is ``"mean"``, ``"sum"`` or ``"none"``; anything else is a ``ValueError``.
* **mask** is bool (True = valid) or float weights (>= 0, not checked), broadcastable to the
  loss shape without enlarging it. Inputs at masked-out positions are replaced by harmless
  values with ``torch.where`` *before* any arithmetic, so NaN/inf stored there reach neither
  the loss nor its gradient (``NaN * 0`` would be NaN). With a mask, ``"mean"`` is the
  weighted mean ``sum(w * loss) / sum(w)`` and is 0 (still attached to the autograd graph,
  with zero gradient) when no element is valid; ``"sum"`` is ``sum(w * loss)``; ``"none"``
  returns ``w * loss`` (0 at masked-out positions).
* **No device syncs, no value-dependent Python branches.** Only shapes, dtypes and Python
  arguments are validated; tensor values are never read on the host, so every function is
  ``torch.compile(fullgraph=True)``-clean. Values outside a documented domain (negative
  counts, negative weights) are not detected.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "gaussian_kl",
    "gaussian_kl_two",
    "gaussian_nll",
    "inverse_standardize",
    "kl_beta",
    "masked_mae",
    "masked_mse",
    "mass_balance_penalty",
    "negative_binomial_nll",
    "negative_binomial_nll_logits",
    "nonnegativity_penalty",
    "poisson_nll_logits",
    "safe_standardize",
    "zero_inflated_negative_binomial_nll",
    "zero_inflated_negative_binomial_nll_logits",
]

REDUCTIONS = ("mean", "sum", "none")
KL_SCHEDULES = ("linear", "cosine", "cyclical")

# log(theta) is clamped to this range inside the NB likelihood: theta in about
# [1.8e-35, 5.5e34], finite in float32. Above it the NB equals its Poisson limit to float
# precision; below it the distribution is a point mass at 0 to float precision.
LOG_THETA_MIN = -80.0
LOG_THETA_MAX = 80.0
# lgamma(y + theta) - lgamma(theta) switches from lgamma to Stirling's series at this theta.
_STIRLING_MIN_THETA = 10.0
_LOG_STIRLING_MIN_THETA = math.log(_STIRLING_MIN_THETA)
# Below this r = mu / theta, log1p(r) / r is evaluated by its Taylor series.
_SERIES_MAX_RATIO = 1e-4


# ---------------------------------------------------------------------------------------
# Argument and shape helpers (host-side only: shapes, dtypes and Python values)
# ---------------------------------------------------------------------------------------


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}"
        )


def _check_tensor(fn: str, name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_positive(fn: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _broadcast_shapes(fn: str, *named: tuple[str, Sequence[int]]) -> tuple[int, ...]:
    """The broadcast of the named shapes, or a ValueError naming every shape."""
    ndim = max(len(shape) for _, shape in named)
    out = [1] * ndim
    for _, shape in named:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size == out[i] or size == 1:
                continue
            if out[i] != 1:
                shapes = ", ".join(f"{name} {tuple(s)}" for name, s in named)
                raise ValueError(f"{fn}: shapes are not broadcastable: {shapes}")
            out[i] = size
    return tuple(out)


def _check_broadcasts_to(
    fn: str, name: str, shape: Sequence[int], target: Sequence[int], target_name: str
) -> None:
    """``shape`` must broadcast to ``target`` without enlarging it."""
    if _broadcast_shapes(fn, (name, shape), (target_name, target)) != tuple(target):
        raise ValueError(
            f"{fn}: {name} of shape {tuple(shape)} must broadcast to the {target_name} shape "
            f"{tuple(target)} without enlarging it"
        )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _mask_weight(
    fn: str, mask: Tensor | None, shape: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """``(valid, weight)`` from a bool / float mask, or ``(None, None)`` without one."""
    if mask is None:
        return None, None
    _check_tensor(fn, "mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"{fn}: mask must be bool (True = valid) or floating-point weights, got {mask.dtype}"
        )
    _check_broadcasts_to(fn, "mask", mask.shape, shape, "loss")
    if mask.dtype == torch.bool:
        return mask, mask.to(dtype)
    weight = mask.to(dtype)
    return weight != 0, weight


def _reduce(loss: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Apply ``reduction`` to ``loss`` with optional weights (0 at masked-out positions)."""
    if weight is None:
        if reduction == "mean":
            return loss.mean()
        return loss.sum() if reduction == "sum" else loss
    weighted = loss * weight
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = weight.expand(loss.shape).sum()
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def _normalize_dims(fn: str, dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """``dim`` as a sorted tuple of non-negative dims; ``None`` is every dim."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{fn}: dim must be an int or a sequence of ints, got {dim!r}")
        if not -ndim <= d < ndim:
            raise ValueError(
                f"{fn}: dim {d} is out of range for a {ndim}-D input (expected -{ndim} <= dim < "
                f"{ndim})"
            )
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: dim {dim!r} names a dimension twice")
    return tuple(sorted(out))


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), exact in both tails and with derivative sigmoid(x) everywhere."""
    return torch.logaddexp(x, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------
# Negative binomial
# ---------------------------------------------------------------------------------------


def _stirling_tail(z: Tensor) -> Tensor:
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2] for z >= 10 (error < 2e-14)."""
    r = z.reciprocal()
    r2 = r * r
    return r * (
        1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0 - r2 / 1188.0)))
    )


def _log_gamma_ratio(y: Tensor, log_theta: Tensor) -> Tensor:
    """A(y, theta) = lgamma(y + theta) - lgamma(theta) - y log(theta).

    theta < 10: ``lgamma(y + theta) - lgamma(1 + theta) + (1 - y) log(theta)``, using
    Gamma(1 + theta) = theta Gamma(theta) so that tiny theta never evaluates lgamma at a pole.
    theta >= 10: Stirling's series for both lgamma terms, the leading terms combined
    analytically (t = y / theta)::

        A = theta (log1p(t) - t) + (y - 1/2) log1p(t) + tail(theta + y) - tail(theta)

    which tends to 0 like y (y - 1) / (2 theta) instead of being the difference of two
    numbers of size theta log(theta) (that difference is exactly 0 in float32 for
    theta = 1e10). The absolute error is a few ulp of ``y * (1 + |log theta|)``.
    A is exactly 0 at y = 0. Each branch sees only the theta range it is valid for, so both
    (and their gradients) stay finite under ``torch.where``.
    """
    lt_small = log_theta.clamp(max=_LOG_STIRLING_MIN_THETA)
    theta_small = lt_small.exp()
    direct = torch.lgamma(y + theta_small) - torch.lgamma(1.0 + theta_small) + (1.0 - y) * lt_small

    theta_large = log_theta.clamp(min=_LOG_STIRLING_MIN_THETA).exp()
    t = y / theta_large
    log1p_t = torch.log1p(t)
    stirling = (
        theta_large * (log1p_t - t)
        + (y - 0.5) * log1p_t
        + (_stirling_tail(theta_large + y) - _stirling_tail(theta_large))
    )
    ratio = torch.where(log_theta < _LOG_STIRLING_MIN_THETA, direct, stirling)
    return torch.where(y == 0, torch.zeros_like(ratio), ratio)


def _theta_log1p_ratio(log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """theta * log(1 + mu / theta) = theta * softplus(log mu - log theta), overflow-free.

    For mu < theta it is evaluated as ``mu * g(mu / theta)`` with g(r) = log1p(r) / r (its
    Taylor series below r = 1e-4), which tends to mu as theta -> inf, where ``theta *
    softplus(d)`` would multiply a huge theta by a softplus that has underflowed to 0; for
    mu >= theta as ``theta * softplus(d)`` with d >= 0.
    """
    d = log_mu - log_theta
    r = d.clamp(max=0.0).exp()
    tiny = r < _SERIES_MAX_RATIO
    r_safe = torch.where(tiny, torch.ones_like(r), r)
    g = torch.where(
        tiny,
        1.0 - r * (0.5 - r * (1.0 / 3.0 - r * 0.25)),
        torch.log1p(r_safe) / r_safe,
    )
    below = torch.minimum(log_mu, log_theta).exp() * g
    above = log_theta.exp() * _softplus(d.clamp(min=0.0))
    return torch.where(d < 0, below, above)


def _nb_log_prob(y: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """log NB(y; mu, theta) in the stable form (see :func:`negative_binomial_nll_logits`)."""
    log_theta = log_theta.clamp(LOG_THETA_MIN, LOG_THETA_MAX)
    return (
        _log_gamma_ratio(y, log_theta)
        + y * log_mu
        - torch.lgamma(y + 1.0)
        - _theta_log1p_ratio(log_mu, log_theta)
        - y * _softplus(log_mu - log_theta)
    )


def _as_param(fn: str, name: str, value: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor or a float, got {type(value).__name__}"
        )
    # A fill on the device (no host-to-device copy, no sync).
    return torch.full((), float(value), device=like.device)


def _prepare_counts(
    fn: str,
    reduction: str,
    mask: Tensor | None,
    **params: Tensor,
) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
    """Validate, broadcast-check and upcast count-model inputs; mask-sanitize is the caller's."""
    _check_reduction(fn, reduction)
    shape = _broadcast_shapes(fn, *((name, t.shape) for name, t in params.items()))
    dtype = _compute_dtype(*params.values())
    valid, weight = _mask_weight(fn, mask, shape, dtype)
    return {name: t.to(dtype) for name, t in params.items()}, valid, weight


def _where_valid(valid: Tensor | None, x: Tensor, fill: float) -> Tensor:
    return x if valid is None else torch.where(valid, x, torch.full_like(x, fill))


def negative_binomial_nll_logits(
    y: Tensor,
    log_mu: Tensor,
    log_theta: Tensor | float,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Negative binomial negative log-likelihood from log-mean and log-inverse-dispersion.

    Shapes: ``y`` (counts), ``log_mu`` and ``log_theta`` broadcast together to the loss shape
    ``S`` (e.g. ``y``: (B, G), ``log_mu``: (B, G), ``log_theta``: (G,) for per-gene
    dispersion); ``mask`` broadcastable to ``S``. Returns a scalar, or ``S`` for
    ``reduction="none"``.

    With mu = exp(log_mu) (mean) and theta = exp(log_theta) (inverse dispersion, "size"),
    Var = mu + mu^2 / theta and::

        log p(y) = lgamma(y + theta) - lgamma(theta) - lgamma(y + 1)
                   + theta log(theta / (theta + mu)) + y log(mu / (theta + mu))

    is evaluated, with d = log mu - log theta, as::

        log p(y) = A(y, theta) + y log mu - lgamma(y + 1)
                   - theta softplus(d) - y softplus(d)

    where A = lgamma(y + theta) - lgamma(theta) - y log theta. ``theta + mu`` is never
    formed, no log of a ratio that can round to 0 or 1 is taken, and A switches to
    Stirling's series for theta >= 10 (see ``_log_gamma_ratio``), so huge theta converges
    to the Poisson NLL ``mu - y log mu + lgamma(y + 1)`` instead of losing every digit to
    cancellation; everything stays in the compute dtype (float32 unless an input is
    float64). ``theta softplus(d)`` is computed as ``mu log1p(mu/theta) / (mu/theta)`` when
    mu < theta, so it tends to mu, not to ``inf * 0``. log_theta is clamped to
    [LOG_THETA_MIN, LOG_THETA_MAX] = [-80, 80] (zero gradient outside). For float32 the
    absolute error is a few ulp of the largest term (``y |log mu|``, ``lgamma(y + 1)``,
    ``mu``); for counts near 1e6 that is ~1, the same as for a float32 Poisson NLL.

    ``y`` is a non-negative count (integer or float tensor; non-integers give the usual
    continuous extension and are not checked). ``log_mu`` must be finite. Gradients w.r.t.
    ``log_mu`` and ``log_theta`` are finite for every finite input.
    """
    fn = "negative_binomial_nll_logits"
    _check_tensor(fn, "y", y)
    _check_tensor(fn, "log_mu", log_mu)
    log_theta = _as_param(fn, "log_theta", log_theta, y)
    p, valid, weight = _prepare_counts(fn, reduction, mask, y=y, log_mu=log_mu, log_theta=log_theta)
    yv = _where_valid(valid, p["y"], 0.0)
    lm = _where_valid(valid, p["log_mu"], 0.0)
    lt = _where_valid(valid, p["log_theta"], 0.0)
    return _reduce(-_nb_log_prob(yv, lm, lt), weight, reduction)


def _nb_logs(
    p: dict[str, Tensor], valid: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y = _where_valid(valid, p["y"], 0.0)
    mu = _where_valid(valid, p["mu"], 1.0)
    theta = _where_valid(valid, p["theta"], 1.0)
    return y, mu.clamp(min=eps).log(), theta.clamp(min=eps).log()


def negative_binomial_nll(
    y: Tensor,
    mu: Tensor,
    theta: Tensor | float,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> Tensor:
    """Negative binomial NLL parameterised by mean ``mu > 0`` and inverse dispersion
    ``theta > 0``: ``negative_binomial_nll_logits(y, log(max(mu, eps)), log(max(theta, eps)))``.

    Shapes: ``y``, ``mu``, ``theta`` broadcast together to the loss shape ``S``; ``mask``
    broadcastable to ``S``. Returns a scalar, or ``S`` for ``reduction="none"``.

    Formula (see :func:`negative_binomial_nll_logits` for how it is evaluated)::

        -log p(y) = -[lgamma(y + theta) - lgamma(theta) - lgamma(y + 1)
                      + theta log(theta / (theta + mu)) + y log(mu / (theta + mu))]

    ``mu`` and ``theta`` are clamped below at ``eps`` before the log (zero gradient below
    it), so mu = 0 gives the finite NLL of mu = eps instead of ``0 * log 0 = NaN``.

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> y, mu = torch.tensor([0.0, 3.0, 10.0]), torch.tensor([1.0, 3.0, 8.0])
        >>> [round(v, 4) for v in losses.negative_binomial_nll(y, mu, 2.0, reduction="none").tolist()]
        [0.8109, 1.9788, 3.0524]
        >>> poisson = -torch.distributions.Poisson(mu).log_prob(y)  # the theta -> inf limit
        >>> torch.allclose(losses.negative_binomial_nll(y, mu, 1e12, reduction="none"), poisson)
        True
        >>> bool(losses.negative_binomial_nll(torch.zeros(1), torch.zeros(1), 1.0).isfinite())
        True
    """
    fn = "negative_binomial_nll"
    _check_tensor(fn, "y", y)
    _check_tensor(fn, "mu", mu)
    eps = _check_positive(fn, "eps", eps)
    theta = _as_param(fn, "theta", theta, y)
    p, valid, weight = _prepare_counts(fn, reduction, mask, y=y, mu=mu, theta=theta)
    yv, lm, lt = _nb_logs(p, valid, eps)
    return _reduce(-_nb_log_prob(yv, lm, lt), weight, reduction)


def zero_inflated_negative_binomial_nll(
    y: Tensor,
    mu: Tensor,
    theta: Tensor | float,
    pi_logits: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> Tensor:
    """Zero-inflated negative binomial NLL, zero-inflation probability pi = sigmoid(pi_logits).

    Shapes: ``y``, ``mu``, ``theta``, ``pi_logits`` broadcast together to the loss shape
    ``S``; ``mask`` broadcastable to ``S``. Returns a scalar, or ``S`` for
    ``reduction="none"``.

    With log pi = -softplus(-l), log(1 - pi) = -softplus(l) (l = pi_logits) and log NB(y)
    from :func:`negative_binomial_nll` (same ``eps`` clamping of mu and theta)::

        y = 0:  -log(pi + (1 - pi) NB(0)) = -logaddexp(log pi, log(1 - pi) + log NB(0))
        y > 0:  -log(1 - pi) - log NB(y)

    Neither pi nor 1 - pi is formed, so pi_logits = +-100 (where sigmoid rounds to exactly
    1 or 0) and NB(0) underflowing (mu huge) stay finite, with finite gradients. Both
    branches are finite everywhere and are selected with ``torch.where``.
    """
    fn = "zero_inflated_negative_binomial_nll"
    _check_tensor(fn, "y", y)
    _check_tensor(fn, "mu", mu)
    _check_tensor(fn, "pi_logits", pi_logits)
    eps = _check_positive(fn, "eps", eps)
    theta = _as_param(fn, "theta", theta, y)
    p, valid, weight = _prepare_counts(
        fn, reduction, mask, y=y, mu=mu, theta=theta, pi_logits=pi_logits
    )
    yv, lm, lt = _nb_logs(p, valid, eps)
    logits = _where_valid(valid, p["pi_logits"], 0.0)
    log_nb = _nb_log_prob(yv, lm, lt)
    log_one_minus_pi = -_softplus(logits)
    log_p_zero = torch.logaddexp(-_softplus(-logits), log_one_minus_pi + log_nb)
    log_p = torch.where(yv == 0, log_p_zero, log_one_minus_pi + log_nb)
    return _reduce(-log_p, weight, reduction)


# ---------------------------------------------------------------------------------------
# Log-space likelihoods of the distribution heads (fastcore.nn.heads)
# ---------------------------------------------------------------------------------------


def zero_inflated_negative_binomial_nll_logits(
    y: Tensor,
    log_mu: Tensor,
    log_theta: Tensor | float,
    pi_logits: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Zero-inflated negative binomial NLL from log-mean, log-inverse-dispersion and the
    zero-inflation logit: the log-space twin of :func:`zero_inflated_negative_binomial_nll`.

    Shapes: ``y``, ``log_mu``, ``log_theta``, ``pi_logits`` broadcast together to the loss
    shape ``S``; ``mask`` broadcastable to ``S``. Returns a scalar, or ``S`` for
    ``reduction="none"``.

    The NB part is :func:`negative_binomial_nll_logits` (``log_theta`` clamped to
    [LOG_THETA_MIN, LOG_THETA_MAX], no eps clamp of mu: any finite ``log_mu`` is valid) and
    the mixture is formed as in :func:`zero_inflated_negative_binomial_nll`, in log space
    (pi = sigmoid(pi_logits) and 1 - pi are never formed)::

        y = 0:  -logaddexp(log pi, log(1 - pi) + log NB(0; mu, theta))
        y > 0:  -log(1 - pi) - log NB(y; mu, theta)

    Finite, with finite gradients, for every finite input.

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> y = torch.tensor([0.0, 0.0, 4.0])
        >>> log_mu, log_theta = torch.full((3,), 0.6931), torch.zeros(3)  # mu = 2, theta = 1
        >>> logits = torch.tensor([0.0, -100.0, 0.0])  # pi = 0.5, ~0, 0.5
        >>> zinb = losses.zero_inflated_negative_binomial_nll_logits(
        ...     y, log_mu, log_theta, logits, reduction="none")
        >>> nb = losses.negative_binomial_nll_logits(y, log_mu, log_theta, reduction="none")
        >>> abs(zinb[1] - nb[1]).item() < 1e-6  # pi -> 0: the plain NB
        True
        >>> round((zinb[2] - nb[2]).item(), 4)  # y > 0 costs -log(1 - pi) = log 2 more
        0.6931
        >>> bool(zinb[0] < nb[0])  # a zero is likelier with zero inflation
        True
    """
    fn = "zero_inflated_negative_binomial_nll_logits"
    _check_tensor(fn, "y", y)
    _check_tensor(fn, "log_mu", log_mu)
    _check_tensor(fn, "pi_logits", pi_logits)
    log_theta = _as_param(fn, "log_theta", log_theta, y)
    p, valid, weight = _prepare_counts(
        fn, reduction, mask, y=y, log_mu=log_mu, log_theta=log_theta, pi_logits=pi_logits
    )
    yv = _where_valid(valid, p["y"], 0.0)
    lm = _where_valid(valid, p["log_mu"], 0.0)
    lt = _where_valid(valid, p["log_theta"], 0.0)
    logits = _where_valid(valid, p["pi_logits"], 0.0)
    log_nb = _nb_log_prob(yv, lm, lt)
    log_one_minus_pi = -_softplus(logits)
    log_p_zero = torch.logaddexp(-_softplus(-logits), log_one_minus_pi + log_nb)
    log_p = torch.where(yv == 0, log_p_zero, log_one_minus_pi + log_nb)
    return _reduce(-log_p, weight, reduction)


def poisson_nll_logits(
    y: Tensor,
    log_rate: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Poisson negative log-likelihood from the log-rate.

    Shapes: ``y`` (counts) and ``log_rate`` broadcast together to the loss shape ``S``;
    ``mask`` broadcastable to ``S``. Returns a scalar, or ``S`` for ``reduction="none"``.

    With rate = exp(log_rate)::

        -log p(y) = exp(log_rate) - y log_rate + lgamma(y + 1)

    the full NLL, equal to ``-torch.distributions.Poisson(rate).log_prob(y)``
    (``torch.nn.functional.poisson_nll_loss`` leaves ``lgamma(y + 1)`` out by default). The
    log-rate is used directly, so a rate near 0 never meets ``0 * log 0``; ``log_rate``
    must be finite, and ``exp(log_rate)`` overflows to inf above the log of the dtype's
    largest value (88.7 in float32), which the Poisson head's softplus link never reaches
    for finite features. ``y`` is a non-negative count (not checked).

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> y, rate = torch.tensor([0.0, 2.0, 7.0]), torch.tensor([0.5, 2.0, 6.0])
        >>> ours = losses.poisson_nll_logits(y, rate.log(), reduction="none")
        >>> torch.allclose(ours, -torch.distributions.Poisson(rate).log_prob(y))
        True
        >>> losses.poisson_nll_logits(torch.zeros(1), torch.tensor([-1000.0])).item()  # p(0) = 1
        0.0
    """
    fn = "poisson_nll_logits"
    _check_tensor(fn, "y", y)
    _check_tensor(fn, "log_rate", log_rate)
    p, valid, weight = _prepare_counts(fn, reduction, mask, y=y, log_rate=log_rate)
    yv = _where_valid(valid, p["y"], 0.0)
    lr = _where_valid(valid, p["log_rate"], 0.0)
    nll = lr.exp() - yv * lr + torch.lgamma(yv + 1.0)
    return _reduce(nll, weight, reduction)


_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_nll(
    y: Tensor,
    loc: Tensor,
    scale: Tensor | float,
    mask: Tensor | None = None,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """Gaussian negative log-likelihood with mean ``loc`` and standard deviation ``scale``.

    Shapes: ``y``, ``loc`` and ``scale`` broadcast together to the loss shape ``S``;
    ``mask`` broadcastable to ``S``. Returns a scalar, or ``S`` for ``reduction="none"``.

    With s = max(scale, eps) (zero gradient below ``eps``)::

        -log p(y) = 0.5 ((y - loc) / s)^2 + log(s) + 0.5 log(2 pi)

    the full NLL, equal to ``-torch.distributions.Normal(loc, scale).log_prob(y)``
    (``torch.nn.functional.gaussian_nll_loss`` takes a variance and leaves the constant out
    by default). As for the count likelihoods, missing targets are removed by ``mask``:
    inputs at masked-out positions are replaced before any arithmetic, so NaN stored there
    reaches neither the loss nor its gradient; a NaN target at a valid position makes the
    loss NaN.

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> y, loc, scale = torch.tensor([0.0, 1.0, 5.0]), torch.zeros(3), torch.tensor([1.0, 2.0, 0.5])
        >>> ours = losses.gaussian_nll(y, loc, scale, reduction="none")
        >>> torch.allclose(ours, -torch.distributions.Normal(loc, scale).log_prob(y))
        True
        >>> y_missing = torch.tensor([0.0, float("nan"), 5.0])
        >>> valid = ~y_missing.isnan()
        >>> losses.gaussian_nll(y_missing, loc, scale, mask=valid).item() == ours[valid].mean().item()
        True
    """
    fn = "gaussian_nll"
    _check_tensor(fn, "y", y)
    _check_tensor(fn, "loc", loc)
    eps = _check_positive(fn, "eps", eps)
    scale = _as_param(fn, "scale", scale, y)
    p, valid, weight = _prepare_counts(fn, reduction, mask, y=y, loc=loc, scale=scale)
    yv = _where_valid(valid, p["y"], 0.0)
    mv = _where_valid(valid, p["loc"], 0.0)
    sv = _where_valid(valid, p["scale"], 1.0).clamp(min=eps)
    z = (yv - mv) / sv
    return _reduce(0.5 * z * z + sv.log() + _HALF_LOG_TWO_PI, weight, reduction)


# ---------------------------------------------------------------------------------------
# Gaussian KL and beta warm-up
# ---------------------------------------------------------------------------------------


def _check_logvar_range(fn: str, logvar_min: float, logvar_max: float) -> None:
    for name, value in (("logvar_min", logvar_min), ("logvar_max", logvar_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be finite, got {value!r}")
    if not logvar_min < logvar_max:
        raise ValueError(
            f"{fn}: logvar_min must be < logvar_max, got logvar_min={logvar_min!r}, "
            f"logvar_max={logvar_max!r}"
        )


def _kl_finish(fn: str, kl: Tensor, dim: int | Sequence[int] | None, reduction: str) -> Tensor:
    dims = () if dim is None else _normalize_dims(fn, dim, kl.dim())
    if dims:
        kl = kl.sum(dim=dims)
    return _reduce(kl, None, reduction)


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    reduction: str = "mean",
    logvar_min: float = -30.0,
    logvar_max: float = 20.0,
    dim: int | Sequence[int] | None = -1,
) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) for diagonal Gaussians.

    Shapes: ``mu`` and ``logvar`` broadcast to ``S`` (e.g. (B, D)); the per-element terms
    are summed over ``dim`` (the latent dims; default -1; ``None`` sums nothing) giving the
    per-distribution KL of shape ``S`` without ``dim`` (e.g. (B,)), to which ``reduction``
    is applied (``"mean"``: mean over the batch).

    Formula, with lv = clamp(logvar, logvar_min, logvar_max)::

        KL = 0.5 * sum_dim(mu^2 + exp(lv) - 1 - lv) = 0.5 * sum_dim(mu^2 + expm1(lv) - lv)

    The clamp is part of the API: it keeps exp finite (logvar = 1000 would overflow) and its
    gradient w.r.t. logvar is zero outside [logvar_min, logvar_max].

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> losses.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).item()  # q = N(0, 1)
        0.0
        >>> losses.gaussian_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])).item()
        0.5
        >>> bool(losses.gaussian_kl(torch.zeros(1, 2), torch.full((1, 2), 1000.0)).isfinite())
        True
    """
    fn = "gaussian_kl"
    _check_tensor(fn, "mu", mu)
    _check_tensor(fn, "logvar", logvar)
    _check_reduction(fn, reduction)
    _check_logvar_range(fn, logvar_min, logvar_max)
    _broadcast_shapes(fn, ("mu", mu.shape), ("logvar", logvar.shape))
    dtype = _compute_dtype(mu, logvar)
    m = mu.to(dtype)
    lv = logvar.to(dtype).clamp(logvar_min, logvar_max)
    kl = 0.5 * (m * m + (torch.expm1(lv) - lv))
    return _kl_finish(fn, kl, dim, reduction)


def gaussian_kl_two(
    mu_q: Tensor,
    logvar_q: Tensor,
    mu_p: Tensor,
    logvar_p: Tensor,
    reduction: str = "mean",
    logvar_min: float = -30.0,
    logvar_max: float = 20.0,
    dim: int | Sequence[int] | None = -1,
) -> Tensor:
    """KL(q || p) for diagonal Gaussians q = N(mu_q, exp(logvar_q)), p = N(mu_p, exp(logvar_p)).

    Shapes: the four inputs broadcast to ``S``; summed over ``dim`` and reduced as in
    :func:`gaussian_kl`. Both log-variances are clamped to [logvar_min, logvar_max] first
    (zero gradient outside). With delta = lv_q - lv_p::

        KL = 0.5 * sum_dim(lv_p - lv_q + (exp(lv_q) + (mu_q - mu_p)^2) / exp(lv_p) - 1)
           = 0.5 * sum_dim(expm1(delta) - delta + (mu_q - mu_p)^2 * exp(-lv_p))

    No variance ratio is formed from two separately exponentiated values, and the result is
    exactly 0 when q = p.
    """
    fn = "gaussian_kl_two"
    named = (("mu_q", mu_q), ("logvar_q", logvar_q), ("mu_p", mu_p), ("logvar_p", logvar_p))
    for name, t in named:
        _check_tensor(fn, name, t)
    _check_reduction(fn, reduction)
    _check_logvar_range(fn, logvar_min, logvar_max)
    _broadcast_shapes(fn, *((name, t.shape) for name, t in named))
    dtype = _compute_dtype(mu_q, logvar_q, mu_p, logvar_p)
    lv_q = logvar_q.to(dtype).clamp(logvar_min, logvar_max)
    lv_p = logvar_p.to(dtype).clamp(logvar_min, logvar_max)
    delta = lv_q - lv_p
    dmu = mu_q.to(dtype) - mu_p.to(dtype)
    kl = 0.5 * ((torch.expm1(delta) - delta) + dmu * dmu * torch.exp(-lv_p))
    return _kl_finish(fn, kl, dim, reduction)


def _check_count(fn: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def kl_beta(
    step: int,
    warmup_steps: int,
    beta_max: float = 1.0,
    start: int = 0,
    schedule: str = "linear",
    cycles: int = 1,
    ratio: float = 0.5,
) -> float:
    """KL weight beta at optimiser step ``step``: a pure function of its arguments, so a run
    resumed from a checkpoint continues the schedule exactly.

    beta is 0 before ``start`` and ``beta_max`` from ``start + warmup_steps`` on. In between,
    with progress p = (step - start) / warmup_steps in [0, 1):

    * ``"linear"``: beta = beta_max * p
    * ``"cosine"``: beta = beta_max * (1 - cos(pi p)) / 2
    * ``"cyclical"`` (Fu et al., 2019): the warm-up span is split into ``cycles`` equal
      cycles; in each, beta rises linearly from 0 to beta_max over the first ``ratio`` of the
      cycle and then holds beta_max: beta = beta_max * min(1, frac(p * cycles) / ratio).

    ``warmup_steps = 0`` gives beta_max from ``start`` on. ``cycles`` and ``ratio`` are only
    used by ``"cyclical"`` (but always validated).

    Examples:
        >>> from fastcore import losses
        >>> [losses.kl_beta(step, warmup_steps=4) for step in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        >>> [losses.kl_beta(step, 8, schedule="cyclical", cycles=2) for step in range(9)]
        [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    """
    fn = "kl_beta"
    step = _check_count(fn, "step", step, 0)
    warmup_steps = _check_count(fn, "warmup_steps", warmup_steps, 0)
    start = _check_count(fn, "start", start, 0)
    cycles = _check_count(fn, "cycles", cycles, 1)
    if isinstance(beta_max, bool) or not isinstance(beta_max, (int, float)):
        raise TypeError(f"{fn}: beta_max must be a float, got {type(beta_max).__name__}")
    if not (math.isfinite(beta_max) and beta_max >= 0):
        raise ValueError(f"{fn}: beta_max must be a finite number >= 0, got {beta_max!r}")
    if schedule not in KL_SCHEDULES:
        raise ValueError(
            f"{fn}: schedule must be one of {', '.join(map(repr, KL_SCHEDULES))}, got {schedule!r}"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{fn}: ratio must be a float, got {type(ratio).__name__}")
    if not 0 < ratio <= 1:
        raise ValueError(f"{fn}: ratio must be in (0, 1], got {ratio!r}")

    if step < start:
        return 0.0
    if step >= start + warmup_steps:
        return float(beta_max)
    progress = (step - start) / warmup_steps
    if schedule == "linear":
        return beta_max * progress
    if schedule == "cosine":
        return beta_max * 0.5 * (1.0 - math.cos(math.pi * progress))
    in_cycle = ((step - start) * cycles % warmup_steps) / warmup_steps
    return beta_max * min(1.0, in_cycle / ratio)


# ---------------------------------------------------------------------------------------
# Standardization
# ---------------------------------------------------------------------------------------


def safe_standardize(
    x: Tensor,
    dim: int | Sequence[int] | None = None,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    min_std: float = 1e-6,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Standardize ``x`` to ``z = (x - mean) / std``, returning ``(z, mean, std)``.

    Shapes: ``x`` any shape ``S``; ``dim`` the dims reduced for the statistics (int, tuple,
    or ``None`` for all); ``mask`` bool broadcastable to ``S`` (True = use the entry for the
    statistics; masked-out entries are still standardized). The returned ``mean`` and
    ``std`` keep the reduced dims with size 1 (they broadcast against ``x``); ``z`` has shape
    ``S`` and ``x``'s dtype (float32 for integer ``x``); ``mean``/``std`` are in the compute
    dtype (float64 for float64 ``x``, else float32).

    Statistics (when ``mean``/``std`` are not given; pass both, e.g. training-set
    statistics, or neither), over the valid entries V (not NaN, and mask True), n = |V|::

        mean = sum_V(x) / n,   std = sqrt(max(sum_V((x - mean)^2) / n, min_std^2))

    i.e. the population std (no Bessel correction) clamped below at ``min_std``. They are
    computed about a detached per-slice shift (the slice maximum), so a constant slice gives
    exactly mean = c, z = 0 (never 0/0), and ``|mean| >> std`` loses no precision.

    * NaN entries of ``x`` are ignored by the statistics and stay NaN in ``z`` (missing stays
      missing); their gradient is 0 and they do not poison the other entries' gradients.
    * A slice with no valid entry gets mean 0, std 1 (so its z equals x, NaN stays NaN), with
      no warning.
    * ``+-inf`` entries are not treated as missing: they make their slice's statistics
      non-finite.
    * A given ``std`` is also clamped below at ``min_std``.

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> x = torch.tensor([[1.0, 2.0, float("nan"), 3.0], [5.0, 5.0, 5.0, 5.0]])
        >>> z, mean, std = losses.safe_standardize(x, dim=1)
        >>> [[round(v, 4) for v in row] for row in z.tolist()]  # NaN stays missing
        [[-1.2247, 0.0, nan, 1.2247], [0.0, 0.0, 0.0, 0.0]]
        >>> mean.flatten().tolist(), round(std[1].item(), 9)  # a constant row: std clamped, z = 0
        ([2.0, 5.0], 1e-06)
    """
    fn = "safe_standardize"
    _check_tensor(fn, "x", x)
    min_std = _check_positive(fn, "min_std", min_std)
    if (mean is None) != (std is None):
        raise ValueError(
            f"{fn}: pass both mean and std (e.g. training-set statistics) or neither, got "
            f"mean={'a tensor' if mean is not None else None}, "
            f"std={'a tensor' if std is not None else None}"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype if x.is_floating_point() else dtype
    xc = x.to(dtype)
    is_nan = torch.isnan(xc)
    x_safe = torch.where(is_nan, torch.zeros_like(xc), xc)

    if mean is not None and std is not None:
        _check_tensor(fn, "mean", mean)
        _check_tensor(fn, "std", std)
        _check_broadcasts_to(fn, "mean", mean.shape, x.shape, "x")
        _check_broadcasts_to(fn, "std", std.shape, x.shape, "x")
        if mask is not None:
            raise ValueError(
                f"{fn}: mask only selects entries for computed statistics; "
                "it cannot be combined with a given mean and std"
            )
        mean = mean.to(dtype)
        std = std.to(dtype).clamp(min=min_std)
        z = (x_safe - mean) / std
    else:
        dims = _normalize_dims(fn, dim, x.dim())
        if dim is not None and not dims:
            raise ValueError(f"{fn}: dim must name at least one dimension, got {dim!r}")
        valid = ~is_nan
        if mask is not None:
            _check_tensor(fn, "mask", mask)
            if mask.dtype != torch.bool:
                raise ValueError(
                    f"{fn}: mask must be a bool tensor (True = valid), got {mask.dtype}"
                )
            _check_broadcasts_to(fn, "mask", mask.shape, x.shape, "x")
            valid = valid & mask
        count = valid.to(dtype).sum(dim=dims, keepdim=True)
        has_any = count > 0
        n = torch.where(has_any, count, torch.ones_like(count))
        neg_inf = torch.full_like(xc, -math.inf)
        shift = torch.where(valid, x_safe, neg_inf).detach().amax(dim=dims, keepdim=True)
        shift = torch.where(has_any, shift, torch.zeros_like(shift))
        centred = torch.where(valid, x_safe - shift, torch.zeros_like(xc))
        offset = centred.sum(dim=dims, keepdim=True) / n
        dev = torch.where(valid, centred - offset, torch.zeros_like(xc))
        var = (dev * dev).sum(dim=dims, keepdim=True) / n
        var_floor = max(min_std * min_std, torch.finfo(dtype).tiny)
        std = torch.where(has_any, var.clamp(min=var_floor).sqrt(), torch.ones_like(var))
        mean = shift + offset
        z = ((x_safe - shift) - offset) / std
    z = torch.where(is_nan, torch.full_like(z, math.nan), z)
    return z.to(out_dtype), mean, std


def inverse_standardize(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Undo :func:`safe_standardize`: ``x = z * std + mean``.

    Shapes: ``mean`` and ``std`` broadcast to ``z``'s shape ``S``; returns ``S``, computed in
    the compute dtype and returned in ``z``'s dtype (float32 for integer ``z``). ``std`` is
    used as given (it was already clamped by :func:`safe_standardize`). NaN in ``z`` stays
    NaN.
    """
    fn = "inverse_standardize"
    _check_tensor(fn, "z", z)
    _check_tensor(fn, "mean", mean)
    _check_tensor(fn, "std", std)
    _check_broadcasts_to(fn, "mean", mean.shape, z.shape, "z")
    _check_broadcasts_to(fn, "std", std.shape, z.shape, "z")
    dtype = _compute_dtype(z, mean, std)
    out_dtype = z.dtype if z.is_floating_point() else dtype
    x = z.to(dtype) * std.to(dtype) + mean.to(dtype)
    return x.to(out_dtype)


# ---------------------------------------------------------------------------------------
# Masked regression losses
# ---------------------------------------------------------------------------------------


def _masked_regression(
    fn: str, pred: Tensor, target: Tensor, mask: Tensor | None, reduction: str, squared: bool
) -> Tensor:
    _check_tensor(fn, "pred", pred)
    _check_tensor(fn, "target", target)
    _check_reduction(fn, reduction)
    _check_broadcasts_to(fn, "target", target.shape, pred.shape, "pred")
    dtype = _compute_dtype(pred, target)
    valid_mask, weight = _mask_weight(fn, mask, pred.shape, dtype)
    p, t = pred.to(dtype), target.to(dtype)
    valid = ~torch.isnan(t)
    if valid_mask is not None:
        valid = valid & valid_mask
    weight = valid.to(dtype) if weight is None else torch.where(valid, weight, 0.0)
    p = torch.where(valid, p, torch.zeros_like(p))
    t = torch.where(valid, t, torch.zeros_like(t))
    diff = p - t
    loss = diff * diff if squared else diff.abs()
    return _reduce(loss, weight, reduction)


def masked_mse(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Mean squared error over the valid elements: ``sum(w (pred - target)^2) / sum(w)``.

    Shapes: ``pred`` ``S``; ``target`` broadcastable to ``S``; ``mask`` bool (True = valid)
    or float weights, broadcastable to ``S``. Returns a scalar, or ``S`` for
    ``reduction="none"`` (0 at invalid elements).

    NaN targets are always treated as missing (so ``mask=None`` means "every non-NaN
    target"), in addition to the mask. pred and target are replaced by 0 at invalid
    positions before the subtraction, so NaN/inf there reach neither the loss nor the
    gradient. No valid element: ``"mean"`` gives 0 with a zero (not NaN) gradient. NaN in
    ``pred`` at a valid position is not hidden: it makes the loss NaN.

    Examples:
        >>> import torch
        >>> from fastcore import losses
        >>> pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        >>> target = torch.tensor([1.5, float("nan"), 2.0])  # the NaN target is missing
        >>> loss = losses.masked_mse(pred, target)
        >>> loss.item()  # (0.25 + 1.0) / 2
        0.625
        >>> loss.backward()
        >>> pred.grad.tolist()  # no NaN leaks into the gradient
        [-0.5, 0.0, 1.0]
        >>> losses.masked_mse(pred, target, mask=torch.tensor([False, True, True])).item()
        1.0
        >>> losses.masked_mse(pred, torch.full((3,), float("nan"))).item()  # nothing valid
        0.0
    """
    return _masked_regression("masked_mse", pred, target, mask, reduction, squared=True)


def masked_mae(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Mean absolute error over the valid elements: ``sum(w |pred - target|) / sum(w)``.

    Shapes, mask, NaN and empty-mask handling as in :func:`masked_mse`. The gradient at
    ``pred == target`` is 0 (``sign(0)``).
    """
    return _masked_regression("masked_mae", pred, target, mask, reduction, squared=False)


# ---------------------------------------------------------------------------------------
# Physical soft penalties
# ---------------------------------------------------------------------------------------


def nonnegativity_penalty(x: Tensor, reduction: str = "mean") -> Tensor:
    """Soft penalty on negative values: ``relu(-x)^2`` elementwise, then ``reduction``.

    Shapes: ``x`` any shape ``S``; returns a scalar, or ``S`` for ``reduction="none"``. Zero
    (with zero gradient) where x >= 0; gradient ``2 x`` where x < 0.
    """
    fn = "nonnegativity_penalty"
    _check_tensor(fn, "x", x)
    _check_reduction(fn, reduction)
    negative_part = torch.relu(-x.to(_compute_dtype(x)))
    return _reduce(negative_part * negative_part, None, reduction)


def mass_balance_penalty(
    inflow: Tensor,
    outflow: Tensor,
    storage_change: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
    relative: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Squared violation of the balance ``inflow - outflow = storage_change``.

    Shapes: ``inflow``, ``outflow``, ``storage_change`` broadcast together to ``S`` (e.g.
    (B, T, N) fluxes with a (B, T, N) or (B, 1, N) storage change); ``mask`` broadcastable
    to ``S``. Returns a scalar, or ``S`` for ``reduction="none"``.

    With r = inflow - outflow - storage_change::

        relative=False:  r^2
        relative=True:   (r / (|inflow| + |outflow| + |storage_change| + eps))^2   in [0, 1]

    The relative form is scale-free and stable at zero flux (0 / eps = 0, finite gradient);
    ``eps`` (> 0, in flux units) only matters when every flux is near 0.
    """
    fn = "mass_balance_penalty"
    named = (("inflow", inflow), ("outflow", outflow), ("storage_change", storage_change))
    for name, t in named:
        _check_tensor(fn, name, t)
    _check_reduction(fn, reduction)
    eps = _check_positive(fn, "eps", eps)
    shape = _broadcast_shapes(fn, *((name, t.shape) for name, t in named))
    dtype = _compute_dtype(inflow, outflow, storage_change)
    valid, weight = _mask_weight(fn, mask, shape, dtype)
    i, o, s = (_where_valid(valid, t.to(dtype), 0.0) for t in (inflow, outflow, storage_change))
    residual = i - o - s
    if relative:
        residual = residual / (i.abs() + o.abs() + s.abs() + eps)
    return _reduce(residual * residual, weight, reduction)
