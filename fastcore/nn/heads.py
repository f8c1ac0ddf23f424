"""Distribution heads: hidden features to the parameters of a predictive distribution.

A head maps features ``h [..., F]`` (one vector per node and lead time, say ``[B, H, N,
F]``) through a linear layer (or a small MLP, ``hidden=(64,)``) to the parameters of a
distribution for each of ``out_channels`` targets, returned as a dict of ``[..., C]``
tensors whose keys are :data:`fastcore.metrics.DISTRIBUTIONS` ``[name]``:

* :class:`GaussianHead` (``"gaussian"``): ``loc`` = raw, ``scale`` = softplus(raw) +
  ``min_scale``;
* :class:`PoissonHead` (``"poisson"``): ``log_rate`` = log(softplus(raw) + ``min_rate``);
* :class:`NegativeBinomialHead` (``"nb"``): ``log_mu`` = log(softplus(raw) +
  ``min_mean``), ``log_theta`` = log(softplus(raw) + ``min_theta``);
* :class:`ZeroInflatedNegativeBinomialHead` (``"zinb"``): the ``nb`` parameters and
  ``pi_logits`` = clamp(raw, -20, 20).

Why these links: softplus grows linearly (an exp link overflows float32 at raw = 89 and
its gradient explodes with it), and the floor keeps every scale, rate, mean and
dispersion strictly positive, so a log of it is finite: features of size 1e4 give finite
parameters, NLLs and gradients. Means, rates and dispersions are carried as logs because
the likelihoods of :mod:`fastcore.losses` take them in log space. ``pi_logits`` is clamped
to [-20, 20] (pi in [2e-9, 1 - 2e-9], gradient 0 outside): beyond that a zero's
probability is 1 or 0 to float32 precision. ``theta`` is the NB size (inverse
dispersion: Var = mu + mu^2 / theta); ``dispersion="shared"`` learns one theta per output
channel instead of one per element (hhh4's choice). Count heads take an optional
``log_offset`` in ``forward`` (log population or exposure; added to ``log_mu`` /
``log_rate``), and ``init_mean`` starts their mean there (the bias's softplus inverse).

Every head has the same methods, taking the dict it returned (detached or not):

* ``nll(params, target, mask=None, reduction="mean")``: the likelihood of
  :mod:`fastcore.losses` (:func:`~fastcore.losses.gaussian_nll`,
  :func:`~fastcore.losses.poisson_nll_logits`,
  :func:`~fastcore.losses.negative_binomial_nll_logits`,
  :func:`~fastcore.losses.zero_inflated_negative_binomial_nll_logits`); NaN targets are
  always masked out (so a panel batch's ``y``/``y_raw`` go in as they are), and ``mask``
  (bool, or float weights) removes more;
* ``log_prob(params, target)``, ``mean``, ``variance``, ``median``, ``quantile(params,
  q)``: exact: the Gaussian's closed forms; for the count distributions the smallest
  integer k with F(k) >= q, found by summing the pmf from 0 in float64 in chunks whose
  width doubles (vectorised, memory-bounded, capped at ``max_count``; see
  :func:`fastcore.metrics.distribution_quantile`). The Gaussian's quantiles keep their
  gradient; count quantiles are integers (no gradient);
* ``sample(params, n=None, generator=None)``: draws (Poisson via ``torch.poisson``, NB as
  a gamma-Poisson mixture, ZINB with a Bernoulli zero), seeded by ``generator``;
* ``point(params, kind)``: the point forecast the user picks: ``"mean"``, ``"median"`` or
  a quantile level in (0, 1);
* ``crps(params, target, mask=None)``: :func:`fastcore.metrics.crps`.

**Which space the outputs live in.** A head models whatever targets it is trained on.
With :class:`fastcore.data.panel.PanelData`, train a :class:`GaussianHead` on
``batch.y`` (normalised); its ``loc``/quantiles are then normalised values, mapped back
with ``panel.inverse`` (exact for quantiles and the median under any normalisation, and
for the mean under ``"standard"``; under log1p the inverse of the mean is not the mean of
the counts). Count heads model **raw counts**: train them on ``batch.y_raw`` (the counts
themselves, never log1p-normalised values: those are not integers), while their inputs may
be log1p-normalised (``normalize="log1p"``, the usual choice for counts: the network sees
``log(1 + y)``, the head predicts the distribution of y). Their means, quantiles and
samples are counts; nothing needs inverting.

``make_head(name, in_features, ...)`` builds one by name from :data:`HEADS`
(``register_head`` adds one).

Examples:
    >>> import torch
    >>> from fastcore.nn.heads import make_head
    >>> torch.manual_seed(0) is not None
    True
    >>> head = make_head("nb", in_features=16, out_channels=1, init_mean=2.0)
    >>> params = head(torch.randn(4, 3, 5, 16))  # [B, H, N, F]
    >>> sorted(params), tuple(params["log_mu"].shape)
    (['log_mu', 'log_theta'], (4, 3, 5, 1))
    >>> counts = torch.randint(0, 5, (4, 3, 5, 1)).float()
    >>> loss = head.nll(params, counts)
    >>> loss.backward()
    >>> head.point(params, 0.9).shape == counts.shape
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcore import losses, metrics

PI_LOGIT_BOUND = 20.0
"""``pi_logits`` of the ZINB head lie in [-20, 20]."""

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _softplus_inverse(value: float) -> float:
    """x with softplus(x) = value (> 0), stable for every value."""
    return value + math.log(-math.expm1(-value))


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _log_softplus_floor(raw: Tensor, floor: float) -> Tensor:
    """log(softplus(raw) + floor): finite for every finite raw, >= log(floor)."""
    return torch.log(F.softplus(raw) + floor)


class DistributionHead(nn.Module):
    """The common base: an MLP from ``in_features`` to the raw parameters, the links, and
    the distribution's functions (see the module docstring).

    Subclasses set ``distribution`` (a key of :data:`fastcore.metrics.DISTRIBUTIONS`) and
    implement ``_link`` (raw outputs to the parameter dict), ``_nll``, ``mean``,
    ``variance`` and ``_sample``.
    """

    distribution: ClassVar[str] = ""

    def __init__(
        self,
        in_features: int,
        out_channels: int = 1,
        hidden: Sequence[int] = (),
        activation: str = "gelu",
        dropout: float = 0.0,
        max_count: int = metrics.DEFAULT_MAX_COUNT,
        projected: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a sequence of ints >= 1, got {hidden!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be an int >= 1, got {max_count!r}")
        self.in_features, self.out_channels = in_features, out_channels
        self.max_count = max_count
        self.param_names = metrics.DISTRIBUTIONS[self.distribution]
        self.projected = tuple(self.param_names if projected is None else projected)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(width, out_channels * len(self.projected))

    def _set_bias(self, name: str, value: float) -> None:
        """Start the raw output ``name`` at ``value`` for every channel."""
        i = self.projected.index(name)
        c = self.out_channels
        with torch.no_grad():
            self.proj.bias[i * c : (i + 1) * c] = value

    def forward(self, h: Tensor, **kwargs) -> dict[str, Tensor]:
        """``h [..., in_features]`` to ``{name: [..., out_channels]}``."""
        if h.dim() < 1 or h.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: features must be [..., {self.in_features}], got "
                f"{tuple(h.shape)}"
            )
        raw = self.proj(self.body(h)).unflatten(-1, (len(self.projected), self.out_channels))
        return self._link({name: raw[..., i, :] for i, name in enumerate(self.projected)}, **kwargs)

    def _link(self, raw: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"distribution={self.distribution!r}, in_features={self.in_features}, "
            f"out_channels={self.out_channels}"
        )

    # --- distribution functions -----------------------------------------------------------

    def _params(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs parameters {', '.join(self.param_names)}; the "
                f"dict has {', '.join(params) or 'none'}"
            )
        return {n: params[n] for n in self.param_names}

    def nll(
        self,
        params: dict[str, Tensor],
        target: Tensor,
        mask: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """The negative log-likelihood of ``target`` (broadcastable with the parameters),
        by the :mod:`fastcore.losses` function of the distribution. NaN/inf targets are
        masked out; ``mask`` (bool, True = valid, or float weights) removes or weights
        more. ``reduction`` as in :mod:`fastcore.losses` (``"mean"`` over valid entries)."""
        p = self._params(params)
        valid = torch.isfinite(target)
        if mask is None:
            mask = valid
        elif mask.dtype == torch.bool:
            mask = mask & valid
        else:
            mask = torch.where(valid, mask, torch.zeros_like(mask))
        return self._nll(p, target, mask, reduction)

    def _nll(self, p: dict[str, Tensor], target: Tensor, mask: Tensor, reduction: str) -> Tensor:
        raise NotImplementedError

    def log_prob(self, params: dict[str, Tensor], target: Tensor) -> Tensor:
        """Elementwise log density / log pmf (``-nll`` with ``reduction="none"``; 0 at
        NaN targets)."""
        return -self.nll(params, target, reduction="none")

    def mean(self, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def variance(self, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def quantile(self, params: dict[str, Tensor], q: float | Tensor) -> Tensor:
        """The ``q``-quantile, ``q`` in (0, 1) (a float or a tensor broadcasting with the
        parameters): exact; count quantiles by integer CDF inversion
        (:func:`fastcore.metrics.distribution_quantile`, bounded by ``max_count``), in the
        parameters' dtype."""
        p = self._params(params)
        dtype = next(iter(p.values())).dtype
        return metrics.distribution_quantile(self.distribution, p, q, self.max_count).to(dtype)

    def median(self, params: dict[str, Tensor]) -> Tensor:
        """The 0.5-quantile (for counts: the smallest k with F(k) >= 1/2)."""
        return self.quantile(params, 0.5)

    def point(self, params: dict[str, Tensor], kind: str | float = "mean") -> Tensor:
        """The point forecast: ``"mean"``, ``"median"``, or a quantile level in (0, 1)."""
        if kind == "mean":
            return self.mean(params)
        if kind == "median":
            return self.median(params)
        if isinstance(kind, float) and 0.0 < kind < 1.0:
            return self.quantile(params, kind)
        raise ValueError(f"kind must be 'mean', 'median' or a float in (0, 1), got {kind!r}")

    def sample(
        self,
        params: dict[str, Tensor],
        n: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draws with the parameters' shape ``S`` (``n=None``) or ``[n, *S]``; no gradient."""
        p = {k: v.detach() for k, v in self._params(params).items()}
        shape = torch.broadcast_shapes(*(v.shape for v in p.values()))
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"n must be an int >= 1 or None, got {n!r}")
            shape = (n, *shape)
        p = {k: v.expand(shape) for k, v in p.items()}
        dtype = next(iter(p.values())).dtype
        return self._sample(p, generator).to(dtype)

    def _sample(self, p: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def crps(self, params: dict[str, Tensor], target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean CRPS over the valid entries (:func:`fastcore.metrics.crps`, float64)."""
        return metrics.crps(
            self.distribution, self._params(params), target, mask, max_count=self.max_count
        )


class GaussianHead(DistributionHead):
    """Normal(loc, scale^2) per output channel: ``loc`` = raw, ``scale`` = softplus(raw) +
    ``min_scale``.

    Examples:
        >>> import torch
        >>> from fastcore.nn.heads import GaussianHead
        >>> head = GaussianHead(8, out_channels=2)
        >>> params = {"loc": torch.tensor([0.0, 1.0]), "scale": torch.tensor([1.0, 2.0])}
        >>> [round(v, 4) for v in head.quantile(params, 0.975).tolist()]
        [1.96, 4.9199]
        >>> bool(head(torch.full((3, 8), 1e4))["scale"].isfinite().all())
        True
    """

    distribution = "gaussian"

    def __init__(
        self,
        in_features: int,
        out_channels: int = 1,
        hidden: Sequence[int] = (),
        activation: str = "gelu",
        dropout: float = 0.0,
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__(in_features, out_channels, hidden, activation, dropout)
        self.min_scale = _positive("min_scale", min_scale)

    def _link(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loc": raw["loc"], "scale": F.softplus(raw["scale"]) + self.min_scale}

    def _nll(self, p, target, mask, reduction):
        return losses.gaussian_nll(target, p["loc"], p["scale"], mask=mask, reduction=reduction)

    def mean(self, params):
        return self._params(params)["loc"]

    def variance(self, params):
        return self._params(params)["scale"].square()

    def quantile(self, params, q):
        """Exact, ``loc + scale sqrt(2) erfinv(2q - 1)``, differentiable in the parameters."""
        p = self._params(params)
        q = torch.as_tensor(q, dtype=p["loc"].dtype, device=p["loc"].device)
        if q.numel() and not bool(((q > 0) & (q < 1)).all()):
            raise ValueError(f"q must lie strictly between 0 and 1, got {q.tolist()!r}")
        return p["loc"] + p["scale"] * math.sqrt(2.0) * torch.erfinv(2.0 * q - 1.0)

    def _sample(self, p, generator):
        noise = torch.randn(
            p["loc"].shape, generator=generator, dtype=p["loc"].dtype, device=p["loc"].device
        )
        return p["loc"] + p["scale"] * noise


def _poisson(rate: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.poisson(rate.double(), generator=generator)


def _gamma_poisson(log_mu: Tensor, log_theta: Tensor, generator) -> Tensor:
    """NB(mu, theta) draws as Poisson(Gamma(shape theta, mean mu)), in float64."""
    log_theta = log_theta.double().clamp(losses.LOG_THETA_MIN, losses.LOG_THETA_MAX)
    theta = log_theta.exp()
    # torch._standard_gamma is the sampler torch.distributions.Gamma itself uses; it is
    # called directly because it takes a generator.
    gamma = torch._standard_gamma(theta, generator=generator)
    rate = gamma * torch.exp(log_mu.double() - log_theta)
    return torch.poisson(rate, generator=generator)


class _CountHead(DistributionHead):
    """Shared by the count heads: the mean link with its offset and initial value."""

    def __init__(
        self,
        in_features: int,
        out_channels: int,
        hidden: Sequence[int],
        activation: str,
        dropout: float,
        max_count: int,
        min_mean: float,
        init_mean: float | None,
        mean_name: str,
        projected: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            in_features, out_channels, hidden, activation, dropout, max_count, projected
        )
        self.min_mean = _positive("min_mean", min_mean)
        self._mean_name = mean_name
        if init_mean is not None:
            init_mean = _positive("init_mean", init_mean)
            if init_mean <= self.min_mean:
                raise ValueError(f"init_mean must be > min_mean={self.min_mean}, got {init_mean}")
            self._set_bias(mean_name, _softplus_inverse(init_mean - self.min_mean))

    def _log_mean(self, raw: Tensor, log_offset: Tensor | None) -> Tensor:
        log_mean = _log_softplus_floor(raw, self.min_mean)
        return log_mean if log_offset is None else log_mean + log_offset


class PoissonHead(_CountHead):
    """Poisson(rate) per output channel: ``log_rate`` = log(softplus(raw) + ``min_rate``)
    (+ ``log_offset``).

    Examples:
        >>> import torch
        >>> from fastcore.nn.heads import PoissonHead
        >>> head = PoissonHead(4)
        >>> params = {"log_rate": torch.tensor([0.0, 2.3026])}  # rates 1 and 10
        >>> head.median(params).tolist(), head.quantile(params, 0.95).tolist()
        ([1.0, 10.0], [3.0, 15.0])
    """

    distribution = "poisson"

    def __init__(
        self,
        in_features: int,
        out_channels: int = 1,
        hidden: Sequence[int] = (),
        activation: str = "gelu",
        dropout: float = 0.0,
        min_rate: float = 1e-6,
        init_mean: float | None = None,
        max_count: int = metrics.DEFAULT_MAX_COUNT,
    ) -> None:
        super().__init__(
            in_features,
            out_channels,
            hidden,
            activation,
            dropout,
            max_count,
            min_rate,
            init_mean,
            "log_rate",
        )

    def _link(self, raw, log_offset: Tensor | None = None):
        return {"log_rate": self._log_mean(raw["log_rate"], log_offset)}

    def _nll(self, p, target, mask, reduction):
        return losses.poisson_nll_logits(target, p["log_rate"], mask=mask, reduction=reduction)

    def mean(self, params):
        return self._params(params)["log_rate"].exp()

    def variance(self, params):
        return self.mean(params)

    def _sample(self, p, generator):
        return _poisson(p["log_rate"].double().exp(), generator)


class NegativeBinomialHead(_CountHead):
    """NB(mean mu, size theta) per output channel, Var = mu + mu^2 / theta.

    ``log_mu`` = log(softplus(raw) + ``min_mean``) (+ ``log_offset``); ``log_theta`` =
    log(softplus(raw) + ``min_theta``) from the features (``dispersion="feature"``) or one
    learned value per channel (``dispersion="shared"``, starting at ``init_theta``).

    Examples:
        >>> import torch
        >>> from fastcore.nn.heads import NegativeBinomialHead
        >>> head = NegativeBinomialHead(4, dispersion="shared", init_theta=2.0)
        >>> params = head(torch.zeros(3, 4))
        >>> [round(v, 4) for v in params["log_theta"].exp().flatten().tolist()]
        [2.0, 2.0, 2.0]
        >>> p = {"log_mu": torch.tensor([3.0]).log(), "log_theta": torch.zeros(1)}  # mu 3, theta 1
        >>> round(head.mean(p).item(), 4), round(head.variance(p).item(), 4), head.median(p).tolist()
        (3.0, 12.0, [2.0])
    """

    distribution = "nb"
    DISPERSIONS = ("feature", "shared")

    def __init__(
        self,
        in_features: int,
        out_channels: int = 1,
        hidden: Sequence[int] = (),
        activation: str = "gelu",
        dropout: float = 0.0,
        min_mean: float = 1e-6,
        min_theta: float = 1e-3,
        dispersion: str = "feature",
        init_mean: float | None = None,
        init_theta: float | None = None,
        max_count: int = metrics.DEFAULT_MAX_COUNT,
    ) -> None:
        if dispersion not in self.DISPERSIONS:
            raise ValueError(
                f"dispersion must be one of {', '.join(map(repr, self.DISPERSIONS))}, got "
                f"{dispersion!r}"
            )
        names = metrics.DISTRIBUTIONS[self.distribution]
        projected = (
            names if dispersion == "feature" else tuple(n for n in names if n != "log_theta")
        )
        super().__init__(
            in_features,
            out_channels,
            hidden,
            activation,
            dropout,
            max_count,
            min_mean,
            init_mean,
            "log_mu",
            projected,
        )
        self.min_theta = _positive("min_theta", min_theta)
        self.dispersion = dispersion
        start = 0.0
        if init_theta is not None:
            init_theta = _positive("init_theta", init_theta)
            if init_theta <= self.min_theta:
                raise ValueError(
                    f"init_theta must be > min_theta={self.min_theta}, got {init_theta}"
                )
            start = _softplus_inverse(init_theta - self.min_theta)
        if dispersion == "shared":
            self.raw_theta = nn.Parameter(torch.full((out_channels,), start))
        elif init_theta is not None:
            self._set_bias("log_theta", start)

    def _link(self, raw, log_offset: Tensor | None = None):
        log_mu = self._log_mean(raw["log_mu"], log_offset)
        raw_theta = raw["log_theta"] if self.dispersion == "feature" else self.raw_theta
        log_theta = _log_softplus_floor(raw_theta, self.min_theta).expand_as(log_mu)
        out = {"log_mu": log_mu, "log_theta": log_theta}
        if "pi_logits" in raw:
            out["pi_logits"] = raw["pi_logits"].clamp(-PI_LOGIT_BOUND, PI_LOGIT_BOUND)
        return out

    def _nll(self, p, target, mask, reduction):
        return losses.negative_binomial_nll_logits(
            target, p["log_mu"], p["log_theta"], mask=mask, reduction=reduction
        )

    def mean(self, params):
        return self._params(params)["log_mu"].exp()

    def variance(self, params):
        p = self._params(params)
        mu = p["log_mu"].exp()
        return mu + mu.square() * torch.exp(-p["log_theta"])

    def _sample(self, p, generator):
        return _gamma_poisson(p["log_mu"], p["log_theta"], generator)


class ZeroInflatedNegativeBinomialHead(NegativeBinomialHead):
    """A zero with probability pi = sigmoid(``pi_logits``), else NB(mu, theta):
    P(0) = pi + (1 - pi) NB(0), mean (1 - pi) mu. ``pi_logits`` = clamp(raw, -20, 20);
    ``init_zero_prob`` starts pi there. Other arguments as :class:`NegativeBinomialHead`.

    Examples:
        >>> import torch
        >>> from fastcore.nn.heads import ZeroInflatedNegativeBinomialHead
        >>> head = ZeroInflatedNegativeBinomialHead(4)
        >>> p = {"log_mu": torch.tensor([2.0]), "log_theta": torch.tensor([3.0]),
        ...      "pi_logits": torch.tensor([0.0])}  # pi = 0.5
        >>> head.median(p).tolist(), round(head.mean(p).item(), 4)  # half the mass at 0
        ([0.0], 3.6945)
    """

    distribution = "zinb"

    def __init__(
        self,
        in_features: int,
        out_channels: int = 1,
        hidden: Sequence[int] = (),
        activation: str = "gelu",
        dropout: float = 0.0,
        min_mean: float = 1e-6,
        min_theta: float = 1e-3,
        dispersion: str = "feature",
        init_mean: float | None = None,
        init_theta: float | None = None,
        init_zero_prob: float | None = None,
        max_count: int = metrics.DEFAULT_MAX_COUNT,
    ) -> None:
        super().__init__(
            in_features,
            out_channels,
            hidden,
            activation,
            dropout,
            min_mean,
            min_theta,
            dispersion,
            init_mean,
            init_theta,
            max_count,
        )
        if init_zero_prob is not None:
            if not 0.0 < init_zero_prob < 1.0:
                raise ValueError(f"init_zero_prob must lie in (0, 1), got {init_zero_prob!r}")
            self._set_bias("pi_logits", math.log(init_zero_prob / (1.0 - init_zero_prob)))

    def _nll(self, p, target, mask, reduction):
        return losses.zero_inflated_negative_binomial_nll_logits(
            target, p["log_mu"], p["log_theta"], p["pi_logits"], mask=mask, reduction=reduction
        )

    def mean(self, params):
        p = self._params(params)
        return torch.sigmoid(-p["pi_logits"]) * p["log_mu"].exp()

    def variance(self, params):
        p = self._params(params)
        keep = torch.sigmoid(-p["pi_logits"])  # 1 - pi
        mu = p["log_mu"].exp()
        nb_var = mu + mu.square() * torch.exp(-p["log_theta"])
        return keep * nb_var + keep * (1.0 - keep) * mu.square()

    def _sample(self, p, generator):
        counts = _gamma_poisson(p["log_mu"], p["log_theta"], generator)
        pi = torch.sigmoid(p["pi_logits"].double())
        u = torch.rand(pi.shape, generator=generator, dtype=torch.float64, device=pi.device)
        return torch.where(u < pi, torch.zeros_like(counts), counts)


HEADS: dict[str, type[DistributionHead]] = {
    "gaussian": GaussianHead,
    "normal": GaussianHead,
    "poisson": PoissonHead,
    "nb": NegativeBinomialHead,
    "negative_binomial": NegativeBinomialHead,
    "zinb": ZeroInflatedNegativeBinomialHead,
    "zero_inflated_negative_binomial": ZeroInflatedNegativeBinomialHead,
}
"""Head name -> class, for :func:`make_head` (with aliases)."""


def register_head(name: str, cls: type[DistributionHead], overwrite: bool = False) -> None:
    """Make ``make_head(name, ...)`` build ``cls`` (a :class:`DistributionHead` subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, DistributionHead)):
        raise TypeError(f"cls must be a DistributionHead subclass, got {cls!r}")
    if name in HEADS and not overwrite:
        raise ValueError(
            f"a head named {name!r} exists ({HEADS[name].__name__}); pass overwrite=True"
        )
    HEADS[name] = cls


def make_head(name: str, in_features: int, out_channels: int = 1, **kwargs) -> DistributionHead:
    """The head called ``name`` in :data:`HEADS` (``"gaussian"``, ``"poisson"``, ``"nb"``,
    ``"zinb"``, or an alias), with its keyword arguments.

    Examples:
        >>> from fastcore.nn.heads import make_head
        >>> type(make_head("zinb", 32, init_zero_prob=0.8)).__name__
        'ZeroInflatedNegativeBinomialHead'
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[name](in_features, out_channels, **kwargs)
