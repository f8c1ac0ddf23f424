"""Reference gather (``index_select``) and its transpose, the CSR segment sum."""

from __future__ import annotations

import torch

from fastcore.reference.segment import segment_reduce


def gather(src: torch.Tensor, index: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``src.index_select(dim, index)``; autograd by PyTorch (``index_add_``). An index
    outside ``[0, src.size(dim)]`` (possible only with ``check=False``) reads a zero row, as
    in the kernels."""
    dim = dim % src.dim()
    index = index.long()
    valid = (index >= 0) & (index < src.size(dim))
    if src.size(dim) == 0:  # every index is out of range: zeros, still in src's graph
        shape = list(src.shape)
        shape[dim] = index.numel()
        return src.new_zeros(shape) + src.sum() * 0
    rows = src.index_select(dim, torch.where(valid, index, 0))
    shape = [1] * src.dim()
    shape[dim] = index.numel()
    return torch.where(valid.view(shape), rows, torch.zeros((), dtype=src.dtype, device=src.device))


def csr_sum(
    src: torch.Tensor, perm: torch.Tensor | None, ptr: torch.Tensor, dim: int = -2
) -> torch.Tensor:
    """``out[..., r, ...] = sum(src[..., perm[k], ...] for k in range(ptr[r], ptr[r+1]))``.

    ``perm`` (a permutation of the rows along ``dim``, or ``None`` for the identity) lists
    the rows in segment order; ``ptr`` has one entry more than there are segments. Sums
    accumulate in float32 for half types, like the kernels.
    """
    return segment_reduce(src, perm, ptr, dim, "sum")[0]
