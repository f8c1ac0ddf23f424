"""A probabilistic spatiotemporal forecaster for panels, and the baselines it is scored against.

:class:`PanelForecaster` maps a window of a panel (``[B, L, N, C']`` normalised inputs with
their missing flags, the raw inputs, seasonal features, covariates) to the parameters of a
predictive distribution for every lead time h, node i and channel, ``[B, H, N, C]``, in
the series' own units. Its mean has the structure of the endemic-epidemic model (``hhh4``
of R's ``surveillance``; Held, Höhle & Hofmann 2005)::

    counts (poisson, nb, zinb):
        mu[h, i]  = nu[h, i] + lam[h, i] * level[h, i] + phi[h, i] * mean_{j -> i} level[h, j]
        log nu    = alpha[i] + season(t + h) . beta + (network)
    continuous (gaussian), in units of node i's training mean m_i and std s_i:
        loc[h, i] = m_i + s_i (e[h, i] + lam[h, i] z[h, i] + phi[h, i] mean_{j -> i} z[h, j])
        e         = alpha[i] + season(t + h) . beta + (network),   z = (level - m) / s

``level[h, i]`` is a mix of node i's last K observed values (softmax weights per lead
time; K = ``lags``), ``mean_{j -> i}`` the mean over the graph neighbours j with an edge
into i. With ``lam`` = 1, the mix on the newest value and the rest 0, the forecast is
persistence: the last observed value is one easy solution.

Two parts:

* the **backbone**: ``log lam`` and ``log phi`` per lead time, the lag mix per lead time,
  the endemic level ``alpha`` per node, its seasonal coefficients ``beta`` and a
  dispersion (NB ``log theta`` / Gaussian ``log scale``) per lead time: an hhh4 model.
  :meth:`PanelForecaster.fit_backbone` fits it alone by maximum likelihood on the training
  windows (full-batch L-BFGS, a N(common level, 1) prior on the node levels);
* the **network**: a linear input map of ``[x, season_x, cov_x, node embedding, static]``
  per step and node, ``blocks`` :class:`~fastcore.nn.SpatioTemporalBlock` s over the
  lookback window (causal temporal convolution + graph convolution), a
  :class:`~fastcore.nn.GraphGRUCell` over the L steps (``encoder="gru"``) or the last step
  and the window mean (``encoder="pool"``), and a decoder MLP per lead time over ``[state,
  season_y, cov_y, lead embedding, node embedding]``, whose features give per window, lead
  time and node additive corrections of ``log lam``, ``log phi`` and the lag logits (a
  linear layer) and, through the distribution head (:func:`fastcore.nn.make_head`), of the
  endemic part and the dispersion (NB ``theta``, ZINB ``pi``, Gaussian ``scale``). The node
  embedding is learned per node: panels whose nodes differ in level (a district without
  cases, a windy headland) need it.

Both last layers start at zero, so the untrained network *is* the backbone; training (the
head's NLL) then moves both. :meth:`PanelForecaster.combine` with ``features=None``
evaluates the backbone alone.

Baselines (functions of the raw series and the forecast origins, all ``[W, H, N, C]``):
:func:`persistence` (the last observed value), :func:`seasonal_naive` (the value one period
before each target), :func:`training_mean` (each node's mean over the training split) and
:func:`neighbour_blend` (``w`` own last + ``(1 - w)`` mean of the neighbours' last values,
``w`` fitted on the training split by :func:`fit_blend_weight`). :func:`fit_distribution`
gives a point forecast a predictive distribution of any head's family, fitted by maximum
likelihood on the training split's windows (:class:`BaselineDistribution`), so that the
baselines' NLL, CRPS and coverage compare with the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastcore import losses
from fastcore.nn import GraphGRUCell, SampleDropout, SpatioTemporalBlock, make_head
from fastcore.nn.spatiotemporal import last_and_mean
from fastcore.ops import Graph, spmm

DISTRIBUTIONS = ("gaussian", "poisson", "nb", "zinb")
COUNT_DISTRIBUTIONS = ("poisson", "nb", "zinb")
ENCODERS = ("gru", "pool")


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def fill_window(x_raw: Tensor, fallback: Tensor) -> Tensor:
    """``[B, L, N, C]`` raw inputs (NaN = missing) with each missing value replaced by the
    latest observed one before it in the window, or ``fallback [N, C]`` before the window's
    first observation at that node."""
    steps = x_raw.shape[1]
    observed = torch.isfinite(x_raw)
    index = torch.arange(steps, device=x_raw.device).view(1, steps, 1, 1).expand_as(x_raw)
    latest = torch.where(observed, index, torch.full_like(index, -1)).cummax(1).values
    value = torch.gather(torch.nan_to_num(x_raw), 1, latest.clamp_min(0))
    return torch.where(latest >= 0, value, fallback.to(value.dtype).expand_as(value))


def last_observed(x_raw: Tensor, fallback: Tensor) -> Tensor:
    """``[B, L, N, C]`` raw inputs (NaN = missing) -> ``[B, N, C]``: each node's latest
    observed value in the window, ``fallback [N, C]`` where the window has none."""
    return fill_window(x_raw, fallback)[:, -1]


class PanelForecaster(nn.Module):
    """Window of a panel -> predictive distribution per lead time, node and channel.

    Args:
        graph: the panel's graph (a :class:`fastcore.Graph` over the N nodes; held as a
            submodule, so ``.to()`` moves it and it is part of the state dict).
        distribution: ``"gaussian"``, ``"poisson"``, ``"nb"`` or ``"zinb"``.
        channels: C, the target channels; ``input_channels``: C' of ``x`` (2C with the
            missing flags).
        horizon: H lead times (direct multi-horizon output).
        center / scale: ``[N, C]`` each node's training mean and standard deviation (the
            Gaussian mean's units; ``center`` is also the value of a node not yet observed
            in a window).
        season_features / covariates: widths of ``season_x`` (= ``season_y``) and
            ``cov_x`` (0: none).
        static: ``[N, S]`` static node features (normalised), or None.
        hidden / blocks / kernel_size / embed: widths and depth.
        dropout: on the decoder's hidden layer (:class:`~fastcore.nn.SampleDropout`).
        add_self_loops: the graph convolutions keep each node's own row.
        encoder: ``"gru"`` (a graph GRU over the window) or ``"pool"`` (last step + mean).
        dispersion: NB/ZINB ``theta`` from the features (``"feature"``) or one per channel
            (``"shared"``), times the backbone's per lead and node.
        lags: K, the last values the level mixes (clamped to the window in ``forward``).
        init_rates: ``(lam, phi)`` where the backbone starts (and its fit starts from).

    ``forward(x, x_raw, season_x, season_y, cov_x, cov_y)`` returns the parameter dict of
    :data:`fastcore.metrics.DISTRIBUTIONS` ``[distribution]``, each ``[B, H, N, C]``, in
    the raw units of the series. :meth:`fit_backbone` fits the backbone alone.

    Examples:
        >>> import torch
        >>> from fastcore.ops import Graph
        >>> from fastcore.models.panel import PanelForecaster
        >>> graph = Graph(torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), num_nodes=3)
        >>> model = PanelForecaster(graph, distribution="nb", channels=1, input_channels=2,
        ...                         horizon=2, center=torch.ones(3, 1), scale=torch.ones(3, 1),
        ...                         hidden=8, lags=1, init_rates=(1.0, 1e-6))
        >>> x_raw = torch.tensor([0.0, 3.0, 1.0]).expand(4, 5, 3)[..., None]  # B=4, L=5
        >>> x = torch.cat([x_raw.log1p(), torch.ones_like(x_raw)], -1)
        >>> params = model(x, x_raw)
        >>> sorted(params), tuple(params["log_mu"].shape)
        (['log_mu', 'log_theta'], (4, 2, 3, 1))
        >>> [round(v, 2) for v in params["log_mu"].exp()[0, 0, :, 0].tolist()]  # persistence
        [0.01, 3.01, 1.01]
    """

    def __init__(
        self,
        graph: Graph,
        *,
        distribution: str,
        channels: int,
        input_channels: int,
        horizon: int,
        center: Tensor,
        scale: Tensor,
        season_features: int = 0,
        covariates: int = 0,
        static: Tensor | None = None,
        hidden: int = 32,
        blocks: int = 2,
        kernel_size: int = 3,
        embed: int = 8,
        dropout: float = 0.1,
        add_self_loops: bool = True,
        encoder: str = "gru",
        dispersion: str = "feature",
        init_mean: float = 0.01,
        lags: int = 4,
        init_rates: tuple[float, float] = (1.0, 0.05),
    ) -> None:
        super().__init__()
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}, got "
                f"{distribution!r}"
            )
        if encoder not in ENCODERS:
            raise ValueError(
                f"encoder must be one of {', '.join(map(repr, ENCODERS))}, got {encoder!r}"
            )
        if isinstance(lags, bool) or not isinstance(lags, int) or lags < 1:
            raise ValueError(f"lags must be an int >= 1, got {lags!r}")
        if len(init_rates) != 2 or not all(r > 0 for r in init_rates):
            raise ValueError(f"init_rates must be two numbers > 0 (lam, phi), got {init_rates!r}")
        if not init_mean > 0:
            raise ValueError(f"init_mean must be > 0, got {init_mean!r}")
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a fastcore.Graph, got {type(graph).__name__}")
        nodes = graph.num_nodes
        for name, value in (("center", center), ("scale", scale)):
            if tuple(value.shape) != (nodes, channels):
                raise ValueError(
                    f"{name} must be [N={nodes}, C={channels}], got {tuple(value.shape)}"
                )
        self.distribution = distribution
        self.channels, self.horizon, self.nodes, self.lags = channels, horizon, nodes, lags
        self.hidden, self.encoder = hidden, encoder
        self.graph = graph
        edge_dim = 0 if graph.edge_attr is None else int(graph.edge_attr[0].numel())
        self.register_buffer("center", center.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().clone())
        if static is not None:
            if static.dim() != 2 or static.shape[0] != nodes:
                raise ValueError(f"static must be [N={nodes}, S], got {tuple(static.shape)}")
            self.register_buffer("static", static.detach().float().clone())
        else:
            self.static = None
        static_width = 0 if static is None else int(static.shape[1])

        # --- the backbone: hhh4's parameters (module docstring), fitted by fit_backbone
        counts = distribution in COUNT_DISTRIBUTIONS
        self.log_rates = nn.Parameter(
            torch.tensor([math.log(init_rates[0]), math.log(init_rates[1])])
            .view(1, 2, 1)
            .repeat(horizon, 1, channels)
        )  # [H, 2, C]: log lam, log phi per lead time
        lag_start = torch.zeros(horizon, lags)
        if lags > 1:
            lag_start[:, 0] = math.log(99.0 * (lags - 1))  # 0.99 on the newest value
        self.lag_logits = nn.Parameter(lag_start)  # [H, K]
        level = math.log(init_mean) if counts else 0.0
        self.node_level = nn.Parameter(torch.full((nodes, channels), level))  # log nu / e
        self.season_level = nn.Parameter(torch.zeros(season_features, channels))
        self.lead_dispersion = (
            nn.Parameter(torch.zeros(horizon, 1, channels))  # log theta / log scale per lead
            if distribution != "poisson"
            else None
        )

        # --- the network: features per (window, lead, node) -> corrections of the backbone
        self.node_embedding = nn.Parameter(torch.randn(nodes, embed) * 0.1)
        self.lead_embedding = nn.Parameter(torch.randn(horizon, embed) * 0.1)
        self.input = nn.Linear(
            input_channels + season_features + covariates + embed + static_width, hidden
        )
        self.blocks = nn.ModuleList(
            SpatioTemporalBlock(
                1, hidden, kernel_size, river_edge_dim=edge_dim, add_self_loops=add_self_loops
            )
            for _ in range(blocks)
        )
        if encoder == "gru":
            self.cell = GraphGRUCell(hidden, hidden, edge_dim, add_self_loops=add_self_loops)
        else:
            self.pool = nn.Linear(2 * hidden, hidden)
        self.decoder = nn.Sequential(
            nn.Linear(hidden + season_features + covariates + 2 * embed, hidden),
            nn.GELU(),
            SampleDropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
        )
        kwargs: dict = {}
        if counts:
            kwargs["init_mean"] = 1.0  # the head's mean multiplies nu: 1 at the start
        if distribution in ("nb", "zinb"):
            kwargs["dispersion"] = dispersion
            kwargs["init_theta"] = 1.0
        if distribution == "zinb":
            kwargs["init_zero_prob"] = 0.05
        self.head = make_head(distribution, hidden, out_channels=channels, **kwargs)
        self.corrections = nn.Linear(hidden, 2 * channels + lags)  # log lam, log phi, lags
        with torch.no_grad():
            # zero last layers: the network starts as the backbone, and learns departures
            self.head.proj.weight.zero_()
            self.corrections.weight.zero_()
            self.corrections.bias.zero_()
            if distribution == "gaussian":  # rows [loc | scale]: loc 0, scale 1 at the start
                self.head.proj.bias[:channels] = 0.0
                self.head.proj.bias[channels:] = _softplus_inverse(1.0 - self.head.min_scale)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (what :meth:`fit_backbone` fits)."""
        out = [self.log_rates, self.lag_logits, self.node_level, self.season_level]
        return out + ([self.lead_dispersion] if self.lead_dispersion is not None else [])

    # ---------------------------------------------------------------------- pieces

    def _neighbour_mean(self, values: Tensor) -> Tensor:
        """``[..., N, C]`` -> the mean over each node's in-neighbours (0 without any)."""
        weight = self.graph.normalization("mean", values.dtype)
        return spmm(values.contiguous(), self.graph, weight, dim=-2)

    def encode(
        self, x: Tensor, season_x: Tensor | None = None, cov_x: Tensor | None = None
    ) -> Tensor:
        """``x [B, L, N, C']`` (+ season, covariates) -> the state ``[B, N, hidden]``."""
        batch, steps, nodes, _ = x.shape
        if nodes != self.nodes:
            raise ValueError(f"x has {nodes} nodes, the model {self.nodes}: x is [B, L, N, C']")
        parts = [x]
        if season_x is not None:
            parts.append(season_x[:, :, None, :].expand(batch, steps, nodes, -1))
        if cov_x is not None:
            parts.append(cov_x)
        parts.append(self.node_embedding.expand(batch, steps, -1, -1))
        if self.static is not None:
            parts.append(self.static.expand(batch, steps, -1, -1))
        h = self.input(torch.cat(parts, -1))
        for block in self.blocks:
            h = block(h, self.graph)
        if self.encoder == "gru":
            state = None
            for t in range(steps):
                state = self.cell(h[:, t], state, self.graph)
            return state
        return torch.tanh(self.pool(torch.cat(last_and_mean(h), -1)))

    def decode(
        self, state: Tensor, season_y: Tensor | None = None, cov_y: Tensor | None = None
    ) -> Tensor:
        """The state ``[B, N, hidden]`` -> features per lead time ``[B, H, N, hidden]``."""
        batch, nodes, _ = state.shape
        horizon = self.horizon
        parts = [state[:, None].expand(batch, horizon, nodes, -1)]
        if season_y is not None:
            parts.append(season_y[:, :, None, :].expand(batch, horizon, nodes, -1))
        if cov_y is not None:
            parts.append(cov_y)
        parts.append(self.lead_embedding[None, :, None, :].expand(batch, -1, nodes, -1))
        parts.append(self.node_embedding[None, None].expand(batch, horizon, -1, -1))
        return self.decoder(torch.cat(parts, -1))

    def combine(
        self, features: Tensor | None, x_raw: Tensor, season_y: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The distribution's parameters from the features ``[B, H, N, hidden]`` (None:
        the backbone alone, as the network starts) and the raw window ``[B, L, N, C]``."""
        batch, horizon, nodes, c = x_raw.shape[0], self.horizon, self.nodes, self.channels
        if features is None:
            features = x_raw.new_zeros(batch, horizon, nodes, self.hidden)
        raw = self.head(features)
        d_lam, d_phi, d_lag = self.corrections(features).split([c, c, self.lags], -1)
        lam = (self.log_rates[None, :, 0, None, :] + d_lam).clamp(-20, 5).exp()  # [B, H, N, C]
        phi = (self.log_rates[None, :, 1, None, :] + d_phi).clamp(-20, 5).exp()
        filled = fill_window(x_raw.to(features.dtype), self.center)  # [B, L, N, C]
        recent = filled[:, -self.lags :].flip(1)  # [B, K', N, C], lag 0 first
        k = recent.shape[1]  # K' = min(K, L)
        mix = torch.softmax(self.lag_logits[None, :, None, :k] + d_lag[..., :k], -1)
        level = torch.einsum("bhnk,bknc->bhnc", mix, recent)  # [B, H, N, C]
        offset = self.node_level[None, None]  # [1, 1, N, C]
        if season_y is not None and self.season_level.shape[0]:
            offset = offset + (season_y.to(features.dtype) @ self.season_level)[:, :, None, :]
        if self.distribution == "gaussian":
            z = (level - self.center) / self.scale
            anomaly = offset + raw["loc"] + lam * z + phi * self._neighbour_mean(z)
            scale = raw["scale"] * self.lead_dispersion[None].clamp(-10, 10).exp()
            return {"loc": self.center + self.scale * anomaly, "scale": self.scale * scale}
        name = "log_rate" if self.distribution == "poisson" else "log_mu"
        endemic = (offset + raw[name]).clamp(max=20).exp()
        mu = endemic + lam * level + phi * self._neighbour_mean(level)
        out = {**raw, name: mu.log()}
        if self.lead_dispersion is not None:
            out["log_theta"] = raw["log_theta"] + self.lead_dispersion[None]
        return out

    def forward(
        self,
        x: Tensor,
        x_raw: Tensor,
        season_x: Tensor | None = None,
        season_y: Tensor | None = None,
        cov_x: Tensor | None = None,
        cov_y: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The distribution's parameters ``{name: [B, H, N, C]}`` in raw units (module
        docstring). ``x_raw [B, L, N, C]``: the raw inputs, NaN where missing."""
        features = self.decode(self.encode(x, season_x, cov_x), season_y, cov_y)
        return self.combine(features, x_raw, season_y)

    def fit_backbone(
        self,
        x_raw: Tensor,
        y_raw: Tensor,
        season_y: Tensor | None = None,
        iterations: int = 100,
    ) -> dict[str, float]:
        """Fit the backbone alone by maximum likelihood (full-batch L-BFGS) on windows
        ``x_raw [W, L, N, C]`` -> ``y_raw [W, H, N, C]`` (NaN = missing, masked): the
        network's corrections are zero until it trains, so this is where it starts. Only
        the last ``lags`` steps of ``x_raw`` are read. Returns the NLL before and after;
        a fit that ends non-finite is undone."""
        params = self.backbone_parameters()
        saved = [p.detach().clone() for p in params]
        x_raw = x_raw[:, -self.lags :]
        if not bool(torch.isfinite(y_raw).any()):
            raise ValueError("fit_backbone: no observed target")

        count = float(torch.isfinite(y_raw).sum())

        def objective() -> Tensor:
            nll = self.head.nll(self.combine(None, x_raw, season_y), y_raw)
            # a N(common level, 1) prior on the nodes' levels (hhh4's random effects): a
            # node without a case in the training windows keeps a small, finite endemic
            # level instead of one that sinks towards 0 (and a test case with it)
            spread = self.node_level - self.node_level.mean(0, keepdim=True)
            return nll + 0.5 * spread.square().sum() / count

        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        with torch.enable_grad():
            before = float(objective().detach())
            opt.step(closure)
            after = float(objective().detach())
        for p in params:
            p.grad = None
        with torch.no_grad():
            if not math.isfinite(after) or after > before:
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)
            # a rate the fit drove to 0 (log -> -inf) keeps a gradient for the network:
            # rates in [e^-8, e^3], the lag logits within 20 of their largest
            self.log_rates.clamp_(-8.0, 3.0)
            top = self.lag_logits.amax(-1, keepdim=True)
            self.lag_logits.copy_(torch.maximum(self.lag_logits, top - 20.0))
            after = float(objective().detach())
        return {"before": before, "after": after}


# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------


def forward_fill(raw: Tensor, fallback: Tensor) -> Tensor:
    """``raw [T, N, C]`` (NaN = missing) with each missing value replaced by the latest
    observed one before it, or ``fallback [N, C]`` before a node's first observation."""
    steps = raw.shape[0]
    index = torch.arange(steps).view(steps, 1, 1).expand_as(raw)
    latest = torch.where(torch.isfinite(raw), index, -1).cummax(0).values
    filled = raw.gather(0, latest.clamp_min(0))
    return torch.where(latest >= 0, filled, fallback.to(raw.dtype).expand_as(raw))


def training_mean(raw: Tensor, start: int, stop: int) -> Tensor:
    """``[N, C]``: each node's mean over steps ``[start, stop)`` (NaN ignored; 0 for a node
    never observed there)."""
    part = raw[start:stop].double()
    valid = torch.isfinite(part)
    count = valid.sum(0)
    mean = torch.where(valid, part, 0.0).sum(0) / count.clamp_min(1)
    return torch.where(count > 0, mean, 0.0).to(raw.dtype)


def persistence(raw: Tensor, origins: Tensor, horizon: int, fallback: Tensor) -> Tensor:
    """``[W, H, N, C]``: the last value observed at or before each origin, for every lead
    time (``fallback [N, C]`` for a node not observed yet)."""
    last = forward_fill(raw, fallback)[origins]
    return last[:, None].expand(-1, horizon, -1, -1).clone()


def seasonal_naive(
    raw: Tensor, origins: Tensor, horizon: int, period: int, fallback: Tensor
) -> Tensor:
    """``[W, H, N, C]``: for the target at step s = origin + h, the value at s - ``period``
    (the latest observed at or before it when that one is missing). Every s - period must
    be >= 0 (a ``ValueError`` otherwise): the series must be a period longer than the
    first origin."""
    steps = origins[:, None] + torch.arange(1, horizon + 1)[None, :] - period
    if steps.numel() and int(steps.min()) < 0:
        raise ValueError(
            f"seasonal naive needs a value one period ({period} steps) before every target; "
            f"origin {int(origins.min())} + 1 - {period} = {int(steps.min())} < 0"
        )
    return forward_fill(raw, fallback)[steps]


def neighbour_mean(values: Tensor, edge_index: Tensor, own_if_isolated: bool = True) -> Tensor:
    """``values [..., N, C]`` -> the unweighted mean over each node's in-neighbours (edges
    ``edge_index[0] -> edge_index[1]``); a node without any gets its own value
    (``own_if_isolated``) or 0."""
    nodes = values.shape[-2]
    src, dst = edge_index[0].long(), edge_index[1].long()
    total = torch.zeros_like(values).index_add_(-2, dst, values.index_select(-2, src))
    degree = torch.zeros(nodes, dtype=values.dtype).index_add_(
        0, dst, torch.ones(dst.numel(), dtype=values.dtype)
    )
    mean = total / degree.clamp_min(1)[:, None]
    isolated = (degree == 0)[:, None]
    return torch.where(isolated, values if own_if_isolated else torch.zeros_like(values), mean)


def neighbour_blend(own: Tensor, neighbours: Tensor, weight: float) -> Tensor:
    """``weight * own + (1 - weight) * neighbours``."""
    return weight * own + (1.0 - weight) * neighbours


def fit_blend_weight(own: Tensor, neighbours: Tensor, target: Tensor) -> float:
    """The least-squares ``w`` in [0, 1] of ``target ~ w own + (1 - w) neighbours`` over the
    observed targets (0.5 when own and neighbours never differ)."""
    valid = torch.isfinite(target)
    own, neighbours, target = own.double(), neighbours.double(), target.double()
    d = (own - neighbours)[valid]
    r = (target - neighbours)[valid]
    denom = float((d * d).sum())
    if denom <= 0:
        return 0.5
    return float(min(max(float((d * r).sum()) / denom, 0.0), 1.0))


@dataclass
class BaselineDistribution:
    """A predictive distribution around a point forecast, fitted on the training split.

    * ``gaussian``: N(point, sigma^2) with ``sigma [H, N, C]`` per lead time and node (the
      root mean square of the training residuals: the maximum-likelihood scale for a
      fixed mean);
    * count families: mean ``point + delta`` with ``delta [H, 1, C]`` >= 1e-6 per lead time
      (a floor that keeps a forecast of 0 from giving an observed case probability 0),
      NB ``log_theta`` and ZINB ``pi_logits`` per lead time, all by maximum likelihood.
    """

    distribution: str
    sigma: Tensor | None = None
    delta: Tensor | None = None
    log_theta: Tensor | None = None
    pi_logits: Tensor | None = None

    def params(self, point: Tensor) -> dict[str, Tensor]:
        """The parameter dict for point forecasts ``[W, H, N, C]`` (float64)."""
        point = point.double()
        if self.distribution == "gaussian":
            return {"loc": point, "scale": self.sigma.expand_as(point)}
        log_mu = (point.clamp_min(0) + self.delta).log()
        if self.distribution == "poisson":
            return {"log_rate": log_mu}
        out = {"log_mu": log_mu, "log_theta": self.log_theta.expand_as(log_mu)}
        if self.distribution == "zinb":
            out["pi_logits"] = self.pi_logits.expand_as(log_mu)
        return out


def _count_nll(dist: str, target: Tensor, log_mu: Tensor, log_theta, pi_logits) -> Tensor:
    if dist == "poisson":
        return losses.poisson_nll_logits(target, log_mu, reduction="none")
    if dist == "nb":
        return losses.negative_binomial_nll_logits(target, log_mu, log_theta, reduction="none")
    return losses.zero_inflated_negative_binomial_nll_logits(
        target, log_mu, log_theta, pi_logits, reduction="none"
    )


def fit_distribution(
    distribution: str, point: Tensor, target: Tensor, iterations: int = 100
) -> BaselineDistribution:
    """Fit :class:`BaselineDistribution` to training windows: ``point`` and ``target``
    ``[W, H, N, C]`` (NaN targets ignored), by maximum likelihood (closed form for the
    Gaussian; L-BFGS in float64 for the count families, one set of parameters per lead
    time and channel)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    point, target = point.double(), target.double()
    valid = torch.isfinite(target)
    if not bool(valid.any()):
        raise ValueError("fit_distribution: no observed target in the training windows")
    if distribution == "gaussian":
        w = valid.double()
        sq = torch.where(valid, (target - point).square(), 0.0)
        count_node = w.sum(0)  # [H, N, C]
        pooled = (sq.sum((0, 2)) / w.sum((0, 2)).clamp_min(1)).sqrt()  # [H, C]
        sigma = (sq.sum(0) / count_node.clamp_min(1)).sqrt()
        sigma = torch.where(count_node >= 2, sigma, pooled[:, None, :].expand_as(sigma))
        floor = 1e-3 * float(pooled.max()) + 1e-9
        return BaselineDistribution(distribution, sigma=sigma.clamp_min(floor))
    # The likelihood depends on each target only through (lead, channel, point, value):
    # fit on the distinct rows, each weighted by how often it occurs (counts repeat a lot).
    horizon, channels = point.shape[1], point.shape[3]
    lead = torch.arange(horizon, dtype=torch.float64).view(1, horizon, 1, 1).expand_as(point)
    chan = torch.arange(channels, dtype=torch.float64).view(1, 1, 1, channels).expand_as(point)
    rows = torch.stack([lead[valid], chan[valid], point.clamp_min(0)[valid], target[valid]], 1)
    rows, weight = torch.unique(rows, dim=0, return_counts=True)
    h, ch = rows[:, 0].long(), rows[:, 1].long()
    base, y = rows[:, 2], rows[:, 3]
    count_hc = torch.zeros(horizon, channels, dtype=torch.float64).index_put_(
        (h, ch), weight.double(), accumulate=True
    )
    weight = weight.double() / count_hc[h, ch]  # each (lead, channel) mean counts once
    sums = torch.zeros(horizon, channels, dtype=torch.float64)
    sums.index_put_((h, ch), y * weight, accumulate=True)
    mean_y = sums.clamp_min(1e-3)  # [H, C]
    a = (0.1 * mean_y).log().clone().requires_grad_(True)  # log delta
    b = torch.zeros(horizon, channels, dtype=torch.float64, requires_grad=True)  # log theta
    c = torch.full((horizon, channels), -2.0, dtype=torch.float64, requires_grad=True)
    variables = {"poisson": [a], "nb": [a, b], "zinb": [a, b, c]}[distribution]

    def objective() -> Tensor:
        log_mu = (base + a.exp()[h, ch] + 1e-6).log()
        log_theta = b.clamp(-8, 12)[h, ch]
        pi = c.clamp(-15, 15)[h, ch]
        return (_count_nll(distribution, y, log_mu, log_theta, pi) * weight).sum()

    opt = torch.optim.LBFGS(
        variables, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        out = BaselineDistribution(distribution, delta=(a.exp() + 1e-6)[:, None, :].detach())
        if distribution in ("nb", "zinb"):
            out.log_theta = b.clamp(-8, 12)[:, None, :].detach()
        if distribution == "zinb":
            out.pi_logits = c.clamp(-15, 15)[:, None, :].detach()
    return out
