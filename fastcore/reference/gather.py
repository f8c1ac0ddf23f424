"""Reference gather (``index_select``) and its transpose, the CSR segment sum."""

from __future__ import annotations

import torch


def gather(src: torch.Tensor, index: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``src.index_select(dim, index)``; autograd by PyTorch (``index_add_``)."""
    return src.index_select(dim, index.long())


def csr_sum(
    src: torch.Tensor, perm: torch.Tensor | None, ptr: torch.Tensor, dim: int = -2
) -> torch.Tensor:
    """``out[..., r, ...] = sum(src[..., perm[k], ...] for k in range(ptr[r], ptr[r+1]))``.

    ``perm`` (a permutation of the rows along ``dim``, or ``None`` for the identity) lists
    the rows in segment order; ``ptr`` has one entry more than there are segments. Sums
    accumulate in float32 for half types, like the kernels.
    """
    dim = dim % src.dim()
    rows = src if perm is None else src.index_select(dim, perm.long())
    ptr = ptr.long()
    segment_of_row = torch.repeat_interleave(
        torch.arange(ptr.numel() - 1, device=src.device), ptr.diff(), output_size=rows.size(dim)
    )
    acc_dtype = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    shape = list(src.shape)
    shape[dim] = ptr.numel() - 1
    out = torch.zeros(shape, dtype=acc_dtype, device=src.device)
    out = out.index_add(dim, segment_of_row, rows.to(acc_dtype))
    return out.to(src.dtype)
