"""Safe resampling along time: linear index builders and a clamped gather.

Teacher and student sequences rarely have the same length. The original alignment code
indexed past the end ("index 81 is out of bounds for dimension 2 with size 80") and broke
on T = 0 and T = 1. These keep indices as int64 on the data's device, inside ``[0, T)``,
and treat empty sequences as valid. :class:`fastcore.Resample` builds on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastcore.ops._checks import FLOAT_DTYPES, check_dtype, normalize_dim
from fastcore.ops.gather import gather


def _check_length(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def build_safe_linear_indices(
    t_src: int,
    t_dst: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx0, idx1, frac)``, each ``[t_dst]``: output step i is
    ``(1 - frac[i]) * x[idx0[i]] + frac[i] * x[idx1[i]]``, equal to
    ``F.interpolate(mode="linear", align_corners=True)`` (the same float32 arithmetic).

    ``idx0``/``idx1`` are int64 in ``[0, t_src)``, ``frac`` of ``dtype`` (float32 by
    default; positions are computed in it), all on ``device``.
    ``t_src = 1`` repeats the single step; ``t_dst = 0`` gives empty tensors.

    Raises:
        ValueError: ``t_src < 1`` (nothing to interpolate from) or ``t_dst < 0``.
    """
    _check_length(t_src, "build_safe_linear_indices: t_src", 1)
    _check_length(t_dst, "build_safe_linear_indices: t_dst", 0)
    if not dtype.is_floating_point:
        raise TypeError(f"build_safe_linear_indices: dtype must be a float dtype, got {dtype}")
    steps = torch.arange(t_dst, device=device, dtype=dtype)
    if t_dst > 1:
        scale = torch.tensor(t_src - 1, dtype=dtype) / (t_dst - 1)
        position = steps * scale.to(steps.device)
    else:
        position = torch.zeros_like(steps)
    idx0 = position.floor().long().clamp_(0, t_src - 1)
    idx1 = (idx0 + 1).clamp_(max=t_src - 1)
    frac = position - idx0.to(dtype)
    return idx0, idx1, frac


def safe_time_resample(
    x: torch.Tensor, indices: torch.Tensor | Sequence[int], dim: int = 2
) -> torch.Tensor:
    """Gather steps of ``x`` along ``dim`` (time) at ``indices``, made safe: the indices are
    cast to int64 on x's device (float indices truncate toward zero) and **clamped** to
    ``[0, T-1]``; ``T == 0`` gives zeros with ``len(indices)`` steps. Differentiable in x
    (the gradient is a deterministic scatter-sum).

    Args:
        x: ``[*lead, T, *trail]`` with T at ``dim`` (``[B, H, T, D]`` KV caches by default);
            a float dtype.
        indices: 1-D ``[M]``: a tensor of any real dtype on any device, or a list of ints.
        dim: the time dimension.

    Returns:
        ``[*lead, M, *trail]``.
    """
    check_dtype(x, FLOAT_DTYPES, "safe_time_resample")
    dim = normalize_dim(dim, x.dim(), "safe_time_resample")
    index = torch.as_tensor(indices)
    if index.dim() != 1:
        raise ValueError(f"safe_time_resample: indices must be 1-D, got shape {tuple(index.shape)}")
    if index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"safe_time_resample: indices must be real numbers, got {index.dtype}")
    index = index.to(device=x.device).long()
    steps = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = index.numel()
    if steps == 0:
        return x.new_zeros(shape) + x.sum() * 0  # zeros, still connected to x's graph
    return gather(x, index.clamp(0, steps - 1), dim, check=False)
