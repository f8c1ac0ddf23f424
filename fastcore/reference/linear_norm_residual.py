"""The spatiotemporal block's tail, the obvious way: per-feature linear map, LayerNorm over
H with a per-feature affine, residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_norm_residual(
    h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    res_scale: float,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``x + res_scale * (gamma * LayerNorm_H(einsum(h, weight) + bias) + beta)`` on
    ``h, x (..., F, H)`` with ``weight (F, H, H)`` and ``bias, gamma, beta (F, H)``."""
    z = torch.einsum("...fh,fhk->...fk", h, weight) + bias
    return x + res_scale * (F.layer_norm(z, (h.shape[-1],), eps=eps) * gamma + beta)
