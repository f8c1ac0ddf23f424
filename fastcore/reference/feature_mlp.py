"""The basin model's per-feature residual MLP, the obvious way: two batched matmuls over
the features with the exact GELU between them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_mlp(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """``h + gelu(einsum(h, w1) + b1) @ w2 + b2`` per feature on ``h (..., F, H)`` with
    ``w1 (F, H, K)``, ``b1 (F, K)``, ``w2 (F, K, H)``, ``b2 (F, H)``."""
    u = F.gelu(torch.einsum("...fh,fhk->...fk", h, w1) + b1)
    return h + torch.einsum("...fk,fkh->...fh", u, w2) + b2
