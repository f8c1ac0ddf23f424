"""The spatiotemporal block and the graph GRU cell of the basin model.

Hidden state ``(B, T, N, F, H)``: one latent of width H per (basin, variable). Every graph
convolution is one :func:`fastcore.ops.spmm` call over all batch and time steps (the
seed's per-time-step loop survives only in :mod:`fastcore.reference.spatiotemporal`, as
the oracle and the benchmark baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from fastcore.ops import linear_norm_residual, spmm, time_conv
from fastcore.ops.graph import NORMALIZATIONS, Graph


def _check_graph(graph: Graph, num_nodes: int, what: str) -> None:
    """The entry check, before any work: the graph's indices were bounded by its num_nodes
    when it was built, so matching num_nodes proves every index fits (no per-call read of
    the indices; the op itself checks only shapes)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"{what} graph must be a fastcore.Graph, got {type(graph).__name__}")
    if graph.num_nodes != num_nodes:
        raise ValueError(
            f"{what} graph has {graph.num_nodes} nodes but the input needs {num_nodes}; "
            "its indices would not match the tensor"
        )


class EdgeGate(nn.Module):
    """Per-edge weights ``normalization * sigmoid(edge_attr @ w + b)``: a learned gate over
    the edge features (plain normalization weights when the graph has none)."""

    def __init__(self, edge_dim: int, normalization: str = "sym") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}"
            )
        self.normalization = normalization
        self.gate = nn.Linear(edge_dim, 1) if edge_dim > 0 else None

    def forward(self, graph: Graph, dtype: torch.dtype) -> torch.Tensor:
        """``[E]`` weights in edge order."""
        weight = graph.normalization(self.normalization, dtype)
        if self.gate is None:
            return weight
        if graph.edge_attr is None:
            raise ValueError("this block gates edges by edge_attr, but the graph has none")
        attr = graph.edge_attr.to(dtype).reshape(graph.num_edges, self.gate.in_features)
        return weight * torch.sigmoid(self.gate(attr)).squeeze(-1)


class SpatioTemporalBlock(nn.Module):
    """One block over a hidden state ``(B, T, N, F, H)``:

    1. causal depthwise temporal conv over T (kernel ``kernel_size`` per (feature, channel));
    2. river graph conv: ``h + spmm(h, river)`` over N, row width F*H, edge weights from
       the river graph's ``edge_attr`` through a learned gate (times its normalization);
    3. causal graph conv: ``h + spmm(h, causal)`` over the N*F (basin, variable) nodes, row
       width H, with its own gate;
    4. a linear map H -> H per feature;
    5. LayerNorm over H with a (F, H) affine per feature;
    6. ``x + res_scale * h``.

    Each graph convolution is one spmm call over all B*T steps, its residual included
    (``spmm(..., residual=True)``); steps 4-6 are one :func:`fastcore.ops.linear_norm_residual`
    call; there is no Python loop.

    Args:
        num_features: F.  hidden: H.  kernel_size: the temporal kernel (causal: output t
            sees inputs t-kernel_size+1 .. t).
        river_edge_dim / causal_edge_dim: the width of each graph's ``edge_attr`` (0: no
            gate, the weights are the normalization alone).
        normalization: ``"sym" | "mean" | "none"`` for both graphs.
        res_scale: the residual scale.
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
    ) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.num_features, self.hidden, self.kernel_size = num_features, hidden, kernel_size
        self.res_scale = res_scale
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

    def forward(self, x: torch.Tensor, river: Graph, causal: Graph) -> torch.Tensor:
        """``x (B, T, N, F, H)`` -> the same shape. ``river``: a Graph over the N basins;
        ``causal``: a Graph over the N*F (basin, variable) nodes, id = basin * F + variable."""
        if x.dim() != 5 or x.shape[3] != self.num_features or x.shape[4] != self.hidden:
            raise ValueError(
                f"SpatioTemporalBlock expects (B, T, N, F={self.num_features}, "
                f"H={self.hidden}), got {tuple(x.shape)}"
            )
        batch, steps, nodes = x.shape[:3]
        _check_graph(river, nodes, "river")
        _check_graph(causal, nodes * self.num_features, "causal")
        # Elementwise work runs on (B, T, N, F*H) views with (F*H,) weights: broadcasting an
        # (F, H) weight over the 5-D tensor is several times slower in PyTorch's kernels.
        width = self.num_features * self.hidden
        x4 = x.reshape(batch, steps, nodes, width)
        h = self.temporal(x4)
        h = spmm(h, river, self.river_gate(river, h.dtype), dim=2, residual=True)
        pairs = h.view(batch, steps, nodes * self.num_features, self.hidden)
        pairs = spmm(pairs, causal, self.causal_gate(causal, h.dtype), dim=2, residual=True)
        return linear_norm_residual(  # steps 4-6 in one pass
            pairs.view(x.shape),
            x,
            self.linear_weight,
            self.linear_bias,
            self.norm_weight,
            self.norm_bias,
            self.res_scale,
        )


class GraphGRUCell(nn.Module):
    """A graph-convolutional GRU cell over node states ``(..., N, hidden)``.

    The graph convolution of ``[x, h]`` (width ``input_size + hidden``) runs once, in one
    spmm call, and feeds all the gates: with ``P = A [x, h]`` and ``P W = [z | r | n_x | n_h]``,
    ``z = sigmoid(.)``, ``r = sigmoid(.)``, ``n = tanh(n_x + r * n_h)`` and
    ``h' = (1 - z) * n + z * h``.

    Args:
        input_size / hidden: the widths of x and h.
        edge_dim: the width of the graph's ``edge_attr`` for a learned edge gate (0: none).
        normalization: ``"sym" | "mean" | "none"``.
    """

    def __init__(
        self, input_size: int, hidden: int, edge_dim: int = 0, normalization: str = "sym"
    ) -> None:
        super().__init__()
        self.input_size, self.hidden = input_size, hidden
        self.gate = EdgeGate(edge_dim, normalization)
        self.weight = nn.Linear(input_size + hidden, 4 * hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, graph: Graph) -> torch.Tensor:
        """``x (..., N, input_size)``, ``h (..., N, hidden)`` or None (zeros) -> ``h'``."""
        if x.shape[-1] != self.input_size:
            raise ValueError(f"GraphGRUCell: x has width {x.shape[-1]}, expected {self.input_size}")
        if h is None:
            h = x.new_zeros(*x.shape[:-1], self.hidden)
        if h.shape[:-1] != x.shape[:-1] or h.shape[-1] != self.hidden:
            raise ValueError(
                f"GraphGRUCell: h has shape {tuple(h.shape)}, expected {(*x.shape[:-1], self.hidden)}"
            )
        _check_graph(graph, x.shape[-2], "GraphGRUCell")
        mixed = spmm(torch.cat([x, h], -1), graph, self.gate(graph, x.dtype), dim=-2)
        z, r, n_x, n_h = self.weight(mixed).chunk(4, dim=-1)
        z, r = torch.sigmoid(z), torch.sigmoid(r)
        n = torch.tanh(n_x + r * n_h)
        return (1 - z) * n + z * h
