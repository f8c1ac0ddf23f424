"""The hierarchical river-basin forecaster and its graph-free GRU baseline.

:class:`HierarchicalBasinModel` reads a lookback window of every fine basin's inputs and
forecasts its discharge over a horizon, autoregressively:

1. **per-feature latents**: each input variable f of each basin gets its own latent,
   ``x[..., f] * w_f + b_f`` plus an embedding of the basin's static attributes, giving the
   hidden state ``(B, T, N, F, H)`` of :class:`~fastcore.nn.SpatioTemporalBlock`;
2. **fine -> coarse**: SpatioTemporalBlocks on the fine level (river graph over basins,
   causal graph between the variables of each basin) and a per-variable residual MLP (the
   blocks are linear but for their LayerNorm), then :class:`~fastcore.nn.GraphPooling`
   to the medium level, blocks there, pooling to the coarse level, blocks there;
3. **coarse -> fine guidance**: :class:`~fastcore.nn.GraphUnpooling` back down, added to
   each finer level's state (a skip connection), one more block per level;
4. **multi-scale fusion**: the last step's fine, medium and coarse states (the coarser ones
   unpooled to the fine basins) mixed with learned softmax weights, next to the fine state
   averaged over the window, through an MLP into a context per basin;
5. **autoregressive decoder**: a :class:`RiverGRUCell` (a GRU per basin reading its own
   input and, through the river graph, its neighbours') steps through the horizon; its input is the context, that day's forcings and the
   previous day's discharge (observed with the teacher-forcing probability, else its own
   prediction; the coin is a :class:`~fastcore.nn.SampleUniform`, keyed per window inside
   :func:`~fastcore.nn.sample_randomness`); the hidden state is detached between steps;
6. **bounded head**: ``sigmoid(logit(q_prev) + scale * (w h + b) + shift)`` with learnable
   scale and shift: the prediction lives on the normalised target scale ``q / q_max`` in
   (0, 1) (the data module's :class:`~fastcore.data.basin.DischargeScaler` maps it back
   exactly), and the zero-initialised ``w`` makes the untrained model forecast persistence,
   so training learns the day-to-day change.

Guards: non-finite inputs are replaced with 0 (``nan_to_num``) and logits are clamped to
``[-logit_clamp, logit_clamp]``; every trigger is counted in :attr:`guard_counts` (a dict
of tensors the job logs), never silent.

Its layers run fastcore's ops; the same model on the per-time-step loop of the original
code (the benchmark baseline and a test's oracle) is
:class:`fastcore.testing.LoopLayersBasinModel`, which overrides :meth:`~HierarchicalBasinModel.block`
and :meth:`~HierarchicalBasinModel.mlp`.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcore.graph import Hierarchy
from fastcore.nn import GraphPooling, GraphUnpooling, SampleUniform, SpatioTemporalBlock
from fastcore.nn.spatiotemporal import EdgeGate, last_and_mean
from fastcore.ops import Graph, feature_mlp, spmm


class _Guards:
    """Counts of guard triggers, accumulated as tensors (no device sync per step)."""

    names = ("nonfinite_inputs", "clamped_logits")

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.counts[name] = self.counts[name] + value if name in self.counts else value

    def pop(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.counts.items()}
        self.counts = {}
        return out


def _nan_guard(x: torch.Tensor, guards: _Guards) -> torch.Tensor:
    bad = ~torch.isfinite(x)
    guards.add("nonfinite_inputs", bad.sum())
    return torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)


class BoundedHead(nn.Module):
    """``(..., hidden), base (...) -> (...)`` in (0, 1):
    ``sigmoid(logit(base) + scale * (w h + b) + shift)``.

    ``base`` is the previous day's normalised discharge (clamped to ``[eps, 1 - eps]``):
    with the zero-initialised ``w`` the untrained head forecasts persistence, and training
    learns the change. The logit is clamped (and counted) at ``+-clamp``.
    """

    def __init__(self, hidden: int, clamp: float = 15.0, eps: float = 1e-4) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.scale = nn.Parameter(torch.ones(()))
        self.shift = nn.Parameter(torch.zeros(()))
        self.clamp, self.eps = clamp, eps

    def forward(self, h: torch.Tensor, base: torch.Tensor, guards: _Guards) -> torch.Tensor:
        base_logit = torch.logit(base.clamp(self.eps, 1 - self.eps))
        logit = base_logit + self.scale * self.linear(h).squeeze(-1) + self.shift
        guards.add("clamped_logits", (logit.detach().abs() > self.clamp).sum())
        return torch.sigmoid(logit.clamp(-self.clamp, self.clamp))


class FeatureMLP(nn.Module):
    """``h + W2_f gelu(W1_f h + b1_f) + b2_f`` on ``(B, T, N, F, H)``: a residual two-layer
    MLP per variable f (its own weights), the nonlinearity between SpatioTemporalBlocks;
    :func:`fastcore.ops.feature_mlp` (one fused pass on CPU)."""

    def __init__(self, num_features: int, hidden: int, expand: int = 2) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_features, hidden, expand * hidden) * hidden**-0.5)
        self.b1 = nn.Parameter(torch.zeros(num_features, expand * hidden))
        self.w2 = nn.Parameter(
            torch.randn(num_features, expand * hidden, hidden) * (expand * hidden) ** -0.5 * 0.5
        )
        self.b2 = nn.Parameter(torch.zeros(num_features, hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return feature_mlp(h, self.w1, self.b1, self.w2, self.b2)


class RiverGRUCell(nn.Module):
    """A GRU cell per basin whose input is its own ``x`` next to what its upstream and
    downstream neighbours hold: ``h' = GRU([x, A [x, h]], h)``, ``A`` the river graph
    weighted by a learned gate over the edge attributes (one :func:`fastcore.ops.spmm`
    call per step). Unlike :class:`~fastcore.nn.GraphGRUCell`, whose gates read only the
    graph-mixed input, the basin's own input and state enter at full weight.

    Over a sequence whose leading input columns stay the same (the decoder's context),
    :meth:`prepare` computes their part of the input gates once and :meth:`step` mixes
    and projects only the columns that change: the same function, a fraction of the
    work per step. The parameters are those of ``nn.GRUCell(2 * input_size + hidden,
    hidden)`` (``self.cell``) and of the gate."""

    def __init__(self, input_size: int, hidden: int, edge_dim: int = 3) -> None:
        super().__init__()
        self.input_size, self.hidden = input_size, hidden
        self.gate = EdgeGate(edge_dim, "sym")
        self.cell = nn.GRUCell(2 * input_size + hidden, hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor, graph: Graph) -> torch.Tensor:
        """``x (B, N, I)``, ``h (B, N, H)`` -> ``h' (B, N, H)``."""
        weight = self.gate(graph, x.dtype)
        return self.step(x, h, graph, weight, self.prepare(x[..., :0], graph, weight))

    def prepare(
        self, fixed: torch.Tensor, graph: Graph, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The input gates' part from the first ``k`` input columns, ``fixed (B, N, k)``,
        which :meth:`step` then leaves out of ``x``: ``b_ih + [fixed, A fixed] W^T`` over
        those columns of ``W_ih`` as ``(B*N, 3H)``, next to the columns of ``W_ih`` that
        :meth:`step` projects (cut out once here, not at every step) and ``k``. ``weight``:
        the gate's edge weights, ``self.gate(graph, dtype)``."""
        batch, nodes, k = fixed.shape
        if k > self.input_size:
            raise ValueError(f"fixed has {k} columns, more than input_size {self.input_size}")
        bias, w_ih, i = self.cell.bias_ih, self.cell.weight_ih, self.input_size
        if k == 0:
            return bias.expand(batch * nodes, -1), w_ih, 0
        w_fixed = torch.cat([w_ih[:, :k], w_ih[:, i : i + k]], 1)
        w_rest = torch.cat([w_ih[:, k:i], w_ih[:, i + k :]], 1)  # x's last I - k, then the mix
        both = torch.cat([fixed, spmm(fixed, graph, weight, dim=1)], -1)
        return torch.addmm(bias, both.reshape(batch * nodes, 2 * k), w_fixed.t()), w_rest, k

    def step(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        graph: Graph,
        weight: torch.Tensor,
        prepared: tuple[torch.Tensor, torch.Tensor, int],
    ) -> torch.Tensor:
        """One step: ``x (B, N, I - k)`` the input columns after the ``k`` that
        :meth:`prepare` took, ``h (B, N, H)`` -> ``h' (B, N, H)``."""
        batch, nodes, _ = x.shape
        gates_x, w_ih, k = prepared
        i, rows = self.input_size, batch * nodes
        if x.shape[-1] != i - k:
            raise ValueError(f"x has {x.shape[-1]} columns, expected input_size - k = {i - k}")
        mixed = spmm(torch.cat([x, h], -1), graph, weight, dim=1)  # [A x, A h]
        gi = torch.addmm(gates_x, torch.cat([x, mixed], -1).reshape(rows, -1), w_ih.t())
        flat = h.reshape(rows, self.hidden)
        gh = torch.addmm(self.cell.bias_hh, flat, self.cell.weight_hh.t())
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(torch.addcmul(i_n, r, h_n))
        return torch.addcmul(n, flat - n, z).view(batch, nodes, self.hidden)  # (1 - z) n + z h


class _Decoder(nn.Module):
    """The autoregressive part shared by both models: ``steps`` days from a context."""

    def __init__(self, context: int, num_forcings: int, hidden: int, graph_cell: bool) -> None:
        super().__init__()
        self.init = nn.Linear(context, hidden)
        inputs = context + num_forcings + 1
        self.cell = RiverGRUCell(inputs, hidden) if graph_cell else nn.GRUCell(inputs, hidden)
        self.head = BoundedHead(hidden)
        self.coin = SampleUniform()  # teacher forcing: keyed per window under a trainer

    def forward(
        self,
        context: torch.Tensor,
        last_q: torch.Tensor,
        future: torch.Tensor,
        teacher: torch.Tensor | None,
        teacher_prob: float,
        graph: Graph | None,
        guards: _Guards,
        detach_hidden: bool,
    ) -> torch.Tensor:
        """``context (B, N, C)``, ``last_q (B, N)``, ``future (B, S, N, Ff)``, ``teacher``
        ``(B, S, N)`` observed targets (NaN: missing) -> predictions ``(B, S, N)``."""
        batch, steps, nodes = future.shape[:3]
        h = torch.tanh(self.init(context))
        q_prev = last_q
        future = _nan_guard(future, guards)
        if graph is not None:  # the context's share of the input gates, once
            weight = self.cell.gate(graph, context.dtype)
            prepared = self.cell.prepare(context, graph, weight)
        preds = []
        for k in range(steps):
            if graph is not None:
                inp = torch.cat([future[:, k], q_prev[..., None]], -1)
                h = self.cell.step(inp, h, graph, weight, prepared)
            else:
                inp = torch.cat([context, future[:, k], q_prev[..., None]], -1)
                flat = self.cell(inp.reshape(batch * nodes, -1), h.reshape(batch * nodes, -1))
                h = flat.view(batch, nodes, -1)
            q = self.head(h, q_prev, guards)
            preds.append(q)
            q_next = q.detach()
            if teacher is not None and teacher_prob > 0:
                observed = teacher[:, k]
                use = torch.isfinite(observed) & (self.coin(observed) < teacher_prob)
                q_next = torch.where(use, observed.nan_to_num(0.0), q_next)
            q_prev = q_next
            if detach_hidden:
                h = h.detach()
        return torch.stack(preds, 1)


class HierarchicalBasinModel(nn.Module):
    """The multi-scale spatiotemporal basin forecaster (see the module docstring).

    Args:
        hierarchy: fine -> medium -> coarse :class:`~fastcore.Hierarchy` whose
            ``num_features`` equals ``num_inputs``; river graphs carry ``[E, 3]`` edge
            attributes (``BasinNetwork.to_hierarchy``).
        static: ``[N_fine, S]`` static basin attributes (normalised).
        num_inputs: F, the input variables per basin and day (the causal graph's features).
        num_forcings: the forcings known over the horizon (the decoder's inputs).
        hidden: H, the latent width per (basin, variable).
        blocks: SpatioTemporalBlocks per level on the way down (one more on the way up).
        kernel_size: the blocks' causal temporal kernel.
        q_feature: which input variable is the (normalised) discharge.
        decoder_hidden: the width of the decoder's graph GRU state.
    """

    def __init__(
        self,
        hierarchy: Hierarchy,
        static: torch.Tensor,
        num_inputs: int,
        num_forcings: int,
        hidden: int = 16,
        blocks: int = 1,
        kernel_size: int = 3,
        q_feature: int = -1,
        detach_hidden: bool = True,
        decoder_hidden: int = 32,
    ) -> None:
        super().__init__()
        if hierarchy.num_levels != 3:
            raise ValueError(f"the basin model needs 3 levels, got {hierarchy.level_names}")
        if hierarchy.num_features != num_inputs:
            raise ValueError(
                f"hierarchy.num_features {hierarchy.num_features} != num_inputs {num_inputs}"
            )
        if static.dim() != 2 or static.shape[0] != hierarchy.num_nodes[0]:
            raise ValueError(
                f"static must be [N_fine={hierarchy.num_nodes[0]}, S], got {tuple(static.shape)}"
            )
        self.hierarchy = hierarchy
        self.num_inputs, self.hidden = num_inputs, hidden
        self.q_feature = q_feature % num_inputs
        self.detach_hidden = detach_hidden
        self.register_buffer("static", static.float())
        self.in_weight = nn.Parameter(torch.randn(num_inputs, hidden) * 0.5)
        self.in_bias = nn.Parameter(torch.zeros(num_inputs, hidden))
        self.static_proj = nn.Linear(static.shape[1], hidden)

        def stack(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                SpatioTemporalBlock(num_inputs, hidden, kernel_size, river_edge_dim=3)
                for _ in range(n)
            )

        self.down = nn.ModuleList(stack(blocks) for _ in range(3))
        self.up = nn.ModuleList(stack(1) for _ in range(2))
        self.mlps = nn.ModuleList(FeatureMLP(num_inputs, hidden) for _ in range(5))
        self.pool = GraphPooling("mean")
        self.unpool = GraphUnpooling()
        self.unpool_nodes = GraphUnpooling(dim=1)  # (B, N, F, H) states of the last step
        self.fusion = nn.Parameter(torch.zeros(3))
        width = num_inputs * hidden
        self.readout = nn.Sequential(
            nn.Linear(2 * width, decoder_hidden),
            nn.GELU(),
            nn.Linear(decoder_hidden, decoder_hidden),
        )
        self.decoder = _Decoder(decoder_hidden, num_forcings, decoder_hidden, graph_cell=True)
        self.guards = _Guards()

    def block(self, block: SpatioTemporalBlock, h: torch.Tensor, level: int) -> torch.Tensor:
        """Run one :class:`~fastcore.nn.SpatioTemporalBlock` over ``h (B, T, N_l, F, H)`` on
        level ``level``'s graphs."""
        river, causal = self.hierarchy.graphs(level)
        return block(h, river, causal)

    def mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Run the ``index``-th per-variable MLP (0-2 down the levels, 3-4 back up)."""
        return self.mlps[index](h)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, N, F)`` -> the latents ``(B, T, N, F, H)``:
        ``x[..., f] * in_weight[f] + in_bias[f] + static_proj(static)[n]``, for finite ``x``
        (:meth:`encode` replaces non-finite inputs first: through the zeros below, an
        infinite entry would turn its whole row NaN).

        One matrix product writes them: ``x (BTN, F)`` times the block-diagonal ``(F, F*H)``
        whose row f holds ``in_weight[f]`` in columns ``f*H .. f*H+H`` (each output entry is
        ``x * w`` plus exact zeros), then the ``(N, F, H)`` bias is added (out of place: in
        place on the view, autograd would copy the gradient twice). Its backward is a
        product ``x^T grad`` and one sum over ``B*T`` rows, where broadcasting
        ``x[..., None] * in_weight`` costs several passes over the latents each way."""
        batch, steps, nodes, features = x.shape
        weight = torch.block_diag(*self.in_weight.unsqueeze(1))  # (F, F*H)
        bias = self.in_bias + self.static_proj(self.static)[:, None, :]  # (N, F, H)
        h = torch.mm(x.reshape(-1, features), weight)
        return h.view(batch, steps, nodes, features, self.hidden) + bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, N, F)`` -> the context ``(B, N, decoder_hidden)``."""
        h = self.embed(_nan_guard(x, self.guards))
        states = []
        for level in range(3):
            if level:
                h = self.pool(h, self.hierarchy, level - 1)
            for block in self.down[level]:
                h = self.block(block, h, level)
            h = self.mlp(level, h)
            states.append(h)
        for level in (1, 0):  # coarse -> medium -> fine guidance
            h = self.unpool(h, self.hierarchy, level, skip=states[level])
            h = self.mlp(3 + level, self.block(self.up[level][0], h, level))
            states[level] = h
        last_fine, summary = last_and_mean(states[0])  # summary: averaged over the window
        last = [last_fine] + [s[:, -1] for s in states[1:]]  # (B, N_l, F, H)
        medium_on_fine = self.unpool_nodes(last[1], self.hierarchy, 0)
        coarse_on_fine = self.unpool_nodes(
            self.unpool_nodes(last[2], self.hierarchy, 1), self.hierarchy, 0
        )
        w = torch.softmax(self.fusion, 0)
        fused = w[0] * last[0] + w[1] * medium_on_fine + w[2] * coarse_on_fine
        return self.readout(torch.cat([fused.flatten(2), summary.flatten(2)], -1))

    def forward(
        self,
        x: torch.Tensor,
        future: torch.Tensor,
        teacher: torch.Tensor | None = None,
        teacher_prob: float = 0.0,
    ) -> torch.Tensor:
        """``x (B, T, N, F)`` past inputs, ``future (B, S, N, Ff)`` horizon forcings,
        ``teacher (B, S, N)`` observed normalised targets for scheduled sampling ->
        normalised discharge forecasts ``(B, S, N)`` in (0, 1)."""
        if (
            x.dim() != 4
            or x.shape[2] != self.hierarchy.num_nodes[0]
            or x.shape[3] != self.num_inputs
        ):
            raise ValueError(
                f"x must be (B, T, N={self.hierarchy.num_nodes[0]}, F={self.num_inputs}), "
                f"got {tuple(x.shape)}"
            )
        context = self.encode(x)
        last_q = _nan_guard(x[:, -1, :, self.q_feature], self.guards)
        return self.decoder(
            context,
            last_q,
            future,
            teacher,
            teacher_prob,
            self.hierarchy.graphs(0)[0],
            self.guards,
            self.detach_hidden,
        )

    def sanity_report(self) -> str:
        return self.hierarchy.report()


class BasinGRU(nn.Module):
    """The graph-free baseline: one GRU per basin (shared weights, basins independent)
    over the lookback window, then the same autoregressive decoder and bounded head
    without a graph."""

    def __init__(
        self,
        num_inputs: int,
        num_forcings: int,
        static: torch.Tensor,
        hidden: int = 64,
        q_feature: int = -1,
        detach_hidden: bool = True,
    ) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.q_feature = q_feature % num_inputs
        self.detach_hidden = detach_hidden
        self.register_buffer("static", static.float())
        self.encoder = nn.GRU(num_inputs + static.shape[1], hidden, batch_first=True)
        self.decoder = _Decoder(hidden, num_forcings, hidden, graph_cell=False)
        self.guards = _Guards()

    def forward(
        self,
        x: torch.Tensor,
        future: torch.Tensor,
        teacher: torch.Tensor | None = None,
        teacher_prob: float = 0.0,
    ) -> torch.Tensor:
        """The same contract as :meth:`HierarchicalBasinModel.forward`: ``x (B, T, N, F)``,
        ``future (B, S, N, Ff)``, optional ``teacher (B, S, N)`` -> ``(B, S, N)`` in (0, 1)."""
        if x.dim() != 4 or x.shape[2] != self.static.shape[0] or x.shape[3] != self.num_inputs:
            raise ValueError(
                f"x must be (B, T, N={self.static.shape[0]}, F={self.num_inputs}), "
                f"got {tuple(x.shape)}"
            )
        batch, steps, nodes, _ = x.shape
        x = _nan_guard(x, self.guards)
        static = self.static[None, None].expand(batch, steps, -1, -1)
        seq = torch.cat([x, static], -1).permute(0, 2, 1, 3).reshape(batch * nodes, steps, -1)
        _, h = self.encoder(seq)
        context = h[-1].view(batch, nodes, -1)
        last_q = x[:, -1, :, self.q_feature]
        return self.decoder(
            context, last_q, future, teacher, teacher_prob, None, self.guards, self.detach_hidden
        )
