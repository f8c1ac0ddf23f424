"""The spatiotemporal block and the graph GRU cell of the basin model.

Hidden state ``(B, T, N, F, H)``: one latent of width H per (basin, variable). Every graph
convolution is one :func:`fastcore.ops.spmm` call over all batch and time steps (the
seed's per-time-step loop survives only in :mod:`fastcore.reference.spatiotemporal`, as
the oracle and the benchmark baseline).
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from fastcore.ops import linear_norm_residual, spmm, time_conv
from fastcore.ops.graph import NORMALIZATIONS, Graph


def _check_graph(graph: Graph, num_nodes: int, what: str, device: torch.device) -> None:
    """The entry check, before any work: the graph's indices were bounded by its num_nodes
    when it was built, so matching num_nodes proves every index fits (no per-call read of
    the indices; the op itself checks only shapes). A graph on another device than the
    input is an error naming both."""
    if not isinstance(graph, Graph):
        raise TypeError(f"{what} graph must be a fastcore.Graph, got {type(graph).__name__}")
    if graph.num_nodes != num_nodes:
        raise ValueError(
            f"{what} graph has {graph.num_nodes} nodes but the input needs {num_nodes}; "
            "its indices would not match the tensor"
        )
    if graph.device != device:
        raise ValueError(
            f"{what} graph is on {graph.device} but the input is on {device}; hold the graph "
            "in the module (self.graph = graph) so that module.to() moves it, or pass "
            "graph.to(device)"
        )


def _positive_int(value: int, what: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return number


class EdgeGate(nn.Module):
    """Per-edge weights ``normalization * sigmoid(edge_attr @ w + b)``: a learned gate over
    the edge features (plain normalization weights when the graph has none).

    Called with ``self_loops=True`` it returns the weights of the graph with a self loop
    added to every node, ``[E + N]`` (the E gated edges, then the N loops, which have no
    features and are not gated), every weight normalized with degrees that count the loop:
    :meth:`fastcore.Graph.normalization` with ``self_loops=True``."""

    def __init__(self, edge_dim: int, normalization: str = "sym") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}"
            )
        self.normalization = normalization
        self.gate = nn.Linear(edge_dim, 1) if edge_dim > 0 else None

    def forward(self, graph: Graph, dtype: torch.dtype, self_loops: bool = False) -> torch.Tensor:
        """``[E]`` weights in edge order (``[E + N]`` with ``self_loops``: the loops last)."""
        weight = graph.normalization(self.normalization, dtype, self_loops=self_loops)
        if self.gate is None:
            return weight
        if graph.edge_attr is None:
            raise ValueError("this block gates edges by edge_attr, but the graph has none")
        attr = graph.edge_attr.to(dtype).reshape(graph.num_edges, self.gate.in_features)
        gate = torch.sigmoid(self.gate(attr)).squeeze(-1)
        if self_loops:
            edges = graph.num_edges
            return torch.cat([weight[:edges] * gate, weight[edges:]])
        return weight * gate


class _LastAndMean(torch.autograd.Function):
    """``h (B, T, ...)`` -> ``(h[:, -1], h.mean(1))``, whose backward writes ``h``'s gradient
    in one pass (``g_mean / T`` at every step, plus ``g_last`` at the last): autograd's
    select and mean backwards write a zero tensor, a divided copy and their sum. The same
    values as theirs, bit for bit."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.steps = h.shape[1]
        return h[:, -1].clone(), h.mean(1)

    @staticmethod
    def backward(ctx, g_last: torch.Tensor, g_mean: torch.Tensor) -> torch.Tensor:
        shape = (g_mean.shape[0], ctx.steps, *g_mean.shape[1:])
        grad = torch.empty(shape, dtype=g_mean.dtype, device=g_mean.device)
        grad.copy_((g_mean / ctx.steps).unsqueeze(1).expand(shape))
        grad[:, -1] += g_last
        return grad


def last_and_mean(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h (B, T, ...)`` -> ``(h[:, -1], h.mean(1))``, the last step and the mean over time
    (a window's summary), with the one-pass backward of :class:`_LastAndMean`."""
    return _LastAndMean.apply(h)


class SpatioTemporalBlock(nn.Module):
    """One block over a hidden state ``(B, T, N, F, H)`` (or ``(B, T, N, H)`` when F = 1):

    1. causal depthwise temporal conv over T (kernel ``kernel_size`` per (feature, channel));
    2. river graph conv: ``h + spmm(h, river)`` over N, row width F*H, edge weights from
       the river graph's ``edge_attr`` through a learned gate (times its normalization);
    3. causal graph conv: ``h + spmm(h, causal)`` over the N*F (basin, variable) nodes, row
       width H, with its own gate; skipped without a causal graph (no mixing between the
       variables of a node);
    4. a linear map H -> H per feature;
    5. LayerNorm over H with a (F, H) affine per feature;
    6. ``x + res_scale * h``.

    Each graph convolution is one spmm call over all B*T steps, its residual included
    (``spmm(..., residual=True)``); steps 4-6 are one :func:`fastcore.ops.linear_norm_residual`
    call; there is no Python loop.

    The ``h +`` of steps 2 and 3 is a self loop of weight 1 on every node, next to the
    edges' normalized weights (``add_self_loops=True``, the default): every node keeps its
    own state in each mix. ``add_self_loops=False`` mixes the neighbours only
    (``spmm(h, graph)``), so a node without incoming edges gets zeros from that step.

    Args:
        num_features: F (1 or more).  hidden: H.  kernel_size: the temporal kernel (causal:
            output t sees inputs t-kernel_size+1 .. t).
        river_edge_dim / causal_edge_dim: the width of each graph's ``edge_attr`` (0: no
            gate, the weights are the normalization alone).
        normalization: ``"sym" | "mean" | "none"`` for both graphs.
        res_scale: the residual scale.
        add_self_loops: each graph convolution adds the node's own row (True) or not.

    Examples:
        >>> import torch
        >>> from fastcore import Graph
        >>> from fastcore.nn import SpatioTemporalBlock
        >>> river = Graph(torch.tensor([[0, 1], [2, 2]]), num_nodes=3)  # 0 -> 2 <- 1
        >>> one = SpatioTemporalBlock(num_features=1, hidden=8)  # one variable per basin
        >>> one(torch.randn(2, 5, 3, 8), river).shape  # (B, T, N, H), no causal graph
        torch.Size([2, 5, 3, 8])
        >>> two = SpatioTemporalBlock(num_features=2, hidden=8)
        >>> causal = Graph(torch.tensor([[0, 2, 4], [1, 3, 5]]), num_nodes=6)  # id n * 2 + f
        >>> two(torch.randn(2, 5, 3, 2, 8), river, causal).shape  # variable 0 -> 1 per basin
        torch.Size([2, 5, 3, 2, 8])
        >>> two(torch.randn(2, 5, 3, 2, 8), river).shape  # causal=None: variables unmixed
        torch.Size([2, 5, 3, 2, 8])
    """

    def __init__(
        self,
        num_features: int,
        hidden: int,
        kernel_size: int = 3,
        river_edge_dim: int = 0,
        causal_edge_dim: int = 0,
        normalization: str = "sym",
        res_scale: float = 0.5,
        add_self_loops: bool = True,
    ) -> None:
        super().__init__()
        num_features = _positive_int(num_features, "SpatioTemporalBlock: num_features")
        hidden = _positive_int(hidden, "SpatioTemporalBlock: hidden")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.num_features, self.hidden, self.kernel_size = num_features, hidden, kernel_size
        self.res_scale = res_scale
        self.add_self_loops = bool(add_self_loops)
        self.temporal_weight = nn.Parameter(torch.empty(kernel_size, num_features, hidden))
        self.temporal_bias = nn.Parameter(torch.zeros(num_features, hidden))
        self.river_gate = EdgeGate(river_edge_dim, normalization)
        self.causal_gate = EdgeGate(causal_edge_dim, normalization)
        self.linear_weight = nn.Parameter(torch.empty(num_features, hidden, hidden))
        self.linear_bias = nn.Parameter(torch.zeros(num_features, hidden))
        self.norm_weight = nn.Parameter(torch.ones(num_features, hidden))
        self.norm_bias = nn.Parameter(torch.zeros(num_features, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # Start close to the identity in time: the newest step dominates.
            self.temporal_weight.normal_(0.0, 0.1 / self.kernel_size)
            self.temporal_weight[0] += 1.0
            nn.init.normal_(self.linear_weight, 0.0, self.hidden**-0.5)

    def temporal(self, x: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv over T on ``x (B, T, N, F*H)``: ``y[:, t] = b + sum_k w[k] *
        x[:, t - k]`` (zeros before t = 0), :func:`fastcore.ops.time_conv`."""
        return time_conv(x, self.temporal_weight.flatten(1), self.temporal_bias.flatten())

    def forward(self, x: torch.Tensor, river: Graph, causal: Graph | None = None) -> torch.Tensor:
        """``x (B, T, N, F, H)`` -> the same shape; with F = 1 also ``x (B, T, N, H)`` -> the
        same shape. ``river``: a Graph over the N basins; ``causal``: a Graph over the N*F
        (basin, variable) nodes, id = basin * F + variable, or None (no mixing between a
        basin's variables)."""
        x5 = self._as_5d(x)
        batch, steps, nodes = x5.shape[:3]
        _check_graph(river, nodes, "river", x.device)
        if causal is not None:
            _check_graph(causal, nodes * self.num_features, "causal", x.device)
        # Elementwise work runs on (B, T, N, F*H) views with (F*H,) weights: broadcasting an
        # (F, H) weight over the 5-D tensor is several times slower in PyTorch's kernels.
        width = self.num_features * self.hidden
        x4 = x5.reshape(batch, steps, nodes, width)
        loops = self.add_self_loops
        h = self.temporal(x4)
        h = spmm(h, river, self.river_gate(river, h.dtype), dim=2, residual=loops)
        if causal is not None:
            pairs = h.view(batch, steps, nodes * self.num_features, self.hidden)
            h = spmm(pairs, causal, self.causal_gate(causal, h.dtype), dim=2, residual=loops)
        out = linear_norm_residual(  # steps 4-6 in one pass
            h.view(x5.shape),
            x5,
            self.linear_weight,
            self.linear_bias,
            self.norm_weight,
            self.norm_bias,
            self.res_scale,
        )
        return out if x.dim() == 5 else out.view(x.shape)

    def _as_5d(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(B, T, N, F, H)``: a 4-D ``(B, T, N, H)`` gains F = 1; anything else is
        an error naming the shape and the one expected."""
        f, hidden = self.num_features, self.hidden
        want = f"(B, T, N, F={f}, H={hidden})" + (f" or (B, T, N, H={hidden})" if f == 1 else "")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SpatioTemporalBlock expects a tensor {want}, got {type(x).__name__}")
        if x.dim() == 4 and x.shape[3] == hidden:
            if f != 1:
                raise ValueError(
                    f"SpatioTemporalBlock expects {want}, got {tuple(x.shape)}: a 4-D input "
                    f"holds one variable per node, but this block has num_features={f}"
                )
            return x.unsqueeze(3)
        if x.dim() != 5 or x.shape[3] != f or x.shape[4] != hidden:
            raise ValueError(f"SpatioTemporalBlock expects {want}, got {tuple(x.shape)}")
        return x


class GraphGRUCell(nn.Module):
    """A graph-convolutional GRU cell over node states ``(..., N, hidden)``.

    The graph convolution of ``[x, h]`` (width ``input_size + hidden``) runs once, in one
    spmm call, and feeds all the gates: with ``P = A [x, h]`` and ``P W = [z | r | n_x | n_h]``,
    ``z = sigmoid(.)``, ``r = sigmoid(.)``, ``n = tanh(n_x + r * n_h)`` and
    ``h' = (1 - z) * n + z * h``.

    ``A`` is the graph with a self loop added to every node (``add_self_loops=True``, the
    default, as in GCN): a node's own input and state enter its mix next to its
    neighbours', every weight normalized with degrees that count the loop (``"sym"``:
    ``1 / sqrt((out_deg[src] + 1) (in_deg[dst] + 1))``; a loop's weight has no edge
    features, so the edge gate leaves it alone). ``add_self_loops=False`` mixes the
    neighbours only (the cell's former behaviour): a node without incoming edges then
    sees neither its input nor its state.

    Args:
        input_size / hidden: the widths of x and h.
        edge_dim: the width of the graph's ``edge_attr`` for a learned edge gate (0: none).
        normalization: ``"sym" | "mean" | "none"``.
        add_self_loops: add each node's own ``[x, h]`` to its mix (True) or not.

    Examples:
        >>> import torch
        >>> from fastcore import Graph
        >>> from fastcore.nn import GraphGRUCell
        >>> _ = torch.manual_seed(0)
        >>> no_edges = Graph(torch.empty(2, 0, dtype=torch.long), num_nodes=3)
        >>> x = torch.randn(3, 2)  # (N, input_size)
        >>> cell = GraphGRUCell(2, 4)  # add_self_loops=True: each node reads its own input
        >>> h = cell(x, None, no_edges)
        >>> h.shape
        torch.Size([3, 4])
        >>> torch.equal(h, cell(torch.zeros(3, 2), None, no_edges))  # the input counts
        False
        >>> old = GraphGRUCell(2, 4, add_self_loops=False)  # neighbours only
        >>> torch.equal(old(x, None, no_edges), old(torch.zeros(3, 2), None, no_edges))
        True
    """

    def __init__(
        self,
        input_size: int,
        hidden: int,
        edge_dim: int = 0,
        normalization: str = "sym",
        add_self_loops: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = _positive_int(input_size, "GraphGRUCell: input_size")
        self.hidden = _positive_int(hidden, "GraphGRUCell: hidden")
        self.add_self_loops = bool(add_self_loops)
        self.gate = EdgeGate(edge_dim, normalization)
        self.weight = nn.Linear(input_size + hidden, 4 * hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, graph: Graph) -> torch.Tensor:
        """``x (..., N, input_size)``, ``h (..., N, hidden)`` or None (zeros) -> ``h'``."""
        if x.dim() < 2 or x.shape[-1] != self.input_size:
            if x.dim() < 2:
                raise ValueError(
                    f"GraphGRUCell: x must be (..., N, input_size={self.input_size}), got shape "
                    f"{tuple(x.shape)}"
                )
            raise ValueError(f"GraphGRUCell: x has width {x.shape[-1]}, expected {self.input_size}")
        if h is None:
            h = x.new_zeros(*x.shape[:-1], self.hidden)
        if h.shape[:-1] != x.shape[:-1] or h.shape[-1] != self.hidden:
            raise ValueError(
                f"GraphGRUCell: h has shape {tuple(h.shape)}, expected {(*x.shape[:-1], self.hidden)}"
            )
        _check_graph(graph, x.shape[-2], "GraphGRUCell", x.device)
        both = torch.cat([x, h], -1)
        if self.add_self_loops:
            weight = self.gate(graph, x.dtype, self_loops=True)
            edges = graph.num_edges
            mixed = spmm(both, graph, weight[:edges], dim=-2)
            mixed = torch.addcmul(mixed, weight[edges:, None], both)  # + each node's loop
        else:
            mixed = spmm(both, graph, self.gate(graph, x.dtype), dim=-2)
        z, r, n_x, n_h = self.weight(mixed).chunk(4, dim=-1)
        z, r = torch.sigmoid(z), torch.sigmoid(r)
        n = torch.tanh(n_x + r * n_h)
        return (1 - z) * n + z * h
