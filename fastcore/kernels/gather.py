"""Triton kernels for the gather family: ``gather`` (index_select) and ``csr_sum`` (its
transpose, the segment sum of ``fastcore.kernels.segment``).

They work on the folded view ``[outer, size, inner]`` of a contiguous tensor, with int64
address arithmetic and grid-stride loops so that more than 2^31 elements (or programs)
work. fastcore.ops validates before calling them; an index outside ``[0, size)`` (possible
only with ``check=False``) reads a zero row, and nothing outside the tensors is touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcore.kernels._tiles import MAX_PROGRAMS, block_shape, fold
from fastcore.kernels.segment import segment_reduce


@triton.jit
def gather_fwd_kernel(
    src_ptr,
    index_ptr,
    base_ptr,
    out_ptr,
    rows,
    index_len,
    size,
    inner,
    HAS_BASE: tl.constexpr,
    ADD_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[o, m, :] = src[o, index[m], :] (+ base[o, m, :] with HAS_BASE, added in float32
    or float64) for the flattened output rows (o, m); a zero row where index[m] is outside
    [0, size)."""
    num_tiles = tl.cdiv(rows, BLOCK_R)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = row < rows
        o = row // index_len
        m = row - o * index_len
        idx = tl.load(index_ptr + m, mask=row_mask, other=0).to(tl.int64)
        valid = row_mask & (idx >= 0) & (idx < size)
        src_row = (o * size + tl.where(valid, idx, 0)) * inner
        out_row = row * inner
        for c0 in range(0, inner, BLOCK_C):
            col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = row_mask[:, None] & (col[None, :] < inner)
            values = tl.load(
                src_ptr + src_row[:, None] + col[None, :],
                mask=valid[:, None] & (col[None, :] < inner),
                other=0,
            )
            if HAS_BASE:
                base = tl.load(base_ptr + out_row[:, None] + col[None, :], mask=mask)
                add_dtype = tl.float64 if ADD_FP64 else tl.float32
                values = (values.to(add_dtype) + base.to(add_dtype)).to(values.dtype)
            tl.store(out_ptr + out_row[:, None] + col[None, :], values, mask=mask)


def gather(
    src: torch.Tensor, index: torch.Tensor, dim: int, base: torch.Tensor | None = None
) -> torch.Tensor:
    """``src.index_select(dim, index)`` (``+ base``, of the output's shape) for a validated
    1-D int32/int64 ``index``."""
    outer, size, inner = fold(src, dim)
    shape = list(src.shape)
    shape[dim] = index.numel()
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    rows = outer * index.numel()
    block_r, block_c = block_shape(rows, inner)
    grid = (min(triton.cdiv(rows, block_r), MAX_PROGRAMS),)
    gather_fwd_kernel[grid](
        src.contiguous(),
        index.contiguous(),
        out if base is None else base.contiguous(),
        out,
        rows,
        index.numel(),
        size,
        inner,
        HAS_BASE=base is not None,
        ADD_FP64=src.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


def csr_sum(
    src: torch.Tensor, perm: torch.Tensor | None, ptr: torch.Tensor, dim: int
) -> torch.Tensor:
    """Segment sums of ``src`` rows along ``dim`` for a validated int64 CSR (``perm``, ``ptr``)."""
    return segment_reduce(src, perm, ptr, dim, "sum")[0]
