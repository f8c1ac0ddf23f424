"""The spatiotemporal block as originally designed: a Python loop over time steps, one
graph convolution per (N, F*H) and (N*F, H) slice. The oracle of
``fastcore.nn.SpatioTemporalBlock`` (same parameters, same result) and the benchmark
baseline it replaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcore.reference.spmm import spmm


def spatiotemporal_block(block, x: torch.Tensor, river, causal) -> torch.Tensor:
    """``block``'s forward computed step by step: ``x (B, T, N, F, H)``, ``river`` / ``causal``
    fastcore Graphs (their ``edge_index`` is used)."""
    batch, steps, nodes, features, hidden = x.shape
    river_weight = block.river_gate(river, x.dtype)
    causal_weight = block.causal_gate(causal, x.dtype)
    outputs = []
    for t in range(steps):
        h = x[:, t] * block.temporal_weight[0] + block.temporal_bias
        for k in range(1, block.kernel_size):
            if t - k >= 0:
                h = h + x[:, t - k] * block.temporal_weight[k]
        rows = h.reshape(batch, nodes, features * hidden)
        rows = rows + spmm(rows, river.edge_index, river_weight, dim=1)
        pairs = rows.reshape(batch, nodes * features, hidden)
        pairs = pairs + spmm(pairs, causal.edge_index, causal_weight, dim=1)
        h = pairs.reshape(batch, nodes, features, hidden)
        h = torch.einsum("bnfh,fhk->bnfk", h, block.linear_weight) + block.linear_bias
        h = F.layer_norm(h, (hidden,)) * block.norm_weight + block.norm_bias
        outputs.append(x[:, t] + block.res_scale * h)
    return torch.stack(outputs, dim=1)
