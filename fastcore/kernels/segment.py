"""Triton kernels for segment reductions: ``segment_reduce`` (sum / mean / max / min over
CSR segments along a dim) and ``segment_arg_scatter`` (the max/min backward).

They work on the folded view ``[outer, size, inner]`` of a contiguous tensor, with int64
address arithmetic and grid-stride loops. fastcore.ops validates before calling them; an
invalid CSR (possible only with ``check=False``) never reads or writes outside the tensors:
segment r covers the entries ``[clamp(ptr[r], 0, size), clamp(ptr[r+1], that, size))`` and a
``perm`` entry outside ``[0, size)`` takes part in nothing (a mean divides by the members it
folded in), as in the CPU kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcore.kernels._tiles import MAX_PROGRAMS, block_shape, fold

REDUCE_CODES = {"sum": 0, "mean": 1, "max": 2, "min": 3}


@triton.jit
def _load_member(
    src_ptr, perm_ptr, start, j, live, base, size, inner, col, col_mask, HAS_PERM: tl.constexpr
):
    """The j-th member of each row's segment: its source row ``[BLOCK_R, 1]``, whether it
    is one (``[BLOCK_R, 1]``: live and, with a perm, in ``[0, size)``) and its
    ``[BLOCK_R, BLOCK_C]`` values (0 where it is not). Everything is indexed in the tile's
    2-D layout: Triton 3.6 (sm_90) fails to compile a 1-D masked load whose mask also feeds
    the 2-D one (remove-layout-conversions leaves the two in different layouts)."""
    live2 = live[:, None]
    if HAS_PERM:
        src_row = tl.load((perm_ptr + start + j)[:, None], mask=live2, other=0)
        live2 = live2 & (src_row >= 0) & (src_row < size)
        src_row = tl.where(live2, src_row, 0)
    else:
        src_row = (start + j)[:, None]
    values = tl.load(
        src_ptr + (base[:, None] + src_row * inner) + col[None, :],
        mask=live2 & col_mask[None, :],
        other=0.0,
    )
    return src_row, live2, values


@triton.jit
def segment_reduce_fwd_kernel(
    src_ptr,
    perm_ptr,
    ptr_ptr,
    out_ptr,
    arg_ptr,
    rows,
    segments,
    size,
    inner,
    REDUCE: tl.constexpr,
    HAS_PERM: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[o, r, :] = reduce_{k in [ptr[r], ptr[r+1])} src[o, perm[k] or k, :].

    REDUCE: 0 sum, 1 mean, 2 max, 3 min. A program owns a tile of BLOCK_R output rows
    (o, r) x BLOCK_C columns and walks the tile's segments in lockstep: step j folds in
    the j-th member of every segment still that long, so each segment runs in the fixed
    order k = ptr[r], ptr[r] + 1, ... (deterministic). Max/min start from the first member,
    replace only on a strictly better value or a first NaN (ties go to the first member),
    and record the source row in arg; an empty segment gives 0 (arg = size).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    num_tiles = tl.cdiv(rows, BLOCK_R)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = row < rows
        o = row // segments
        r = row - o * segments
        start = tl.minimum(tl.maximum(tl.load(ptr_ptr + r, mask=row_mask, other=0), 0), size)
        stop = tl.minimum(tl.load(ptr_ptr + r + 1, mask=row_mask, other=0), size)
        length = tl.maximum(stop - start, 0)
        base = o * size * inner
        max_length = tl.max(length)
        for c0 in range(0, inner, BLOCK_C):
            col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            col_mask = col < inner
            if REDUCE < 2:
                acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
                count = tl.zeros([BLOCK_R, 1], dtype=tl.int64)
                for j in range(0, max_length):
                    live = row_mask & (j < length)
                    _, member, values = _load_member(
                        src_ptr,
                        perm_ptr,
                        start,
                        j,
                        live,
                        base,
                        size,
                        inner,
                        col,
                        col_mask,
                        HAS_PERM,
                    )
                    acc += values.to(acc_dtype)
                    count += member.to(tl.int64)
                if REDUCE == 1:
                    acc = acc / tl.maximum(count, 1).to(acc_dtype)
            else:
                # A row's accumulator starts at its first member (seen turns on there):
                # later members replace it only on a strictly better value or a first
                # NaN, so ties go to the first member.
                acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
                arg = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int64) + size
                seen = tl.zeros([BLOCK_R, 1], dtype=tl.int1)
                for j in range(0, max_length):
                    live = row_mask & (j < length)
                    src_row, member, values = _load_member(
                        src_ptr,
                        perm_ptr,
                        start,
                        j,
                        live,
                        base,
                        size,
                        inner,
                        col,
                        col_mask,
                        HAS_PERM,
                    )
                    values = values.to(acc_dtype)
                    if REDUCE == 2:
                        better = values > acc
                    else:
                        better = values < acc
                    better = better | ((values != values) & (acc == acc)) | (seen == 0)
                    better = better & member
                    acc = tl.where(better, values, acc)
                    arg = tl.where(better, src_row, arg)
                    seen = seen | member
                tl.store(
                    arg_ptr + row[:, None] * inner + col[None, :],
                    arg,
                    mask=row_mask[:, None] & col_mask[None, :],
                )
            tl.store(
                out_ptr + row[:, None] * inner + col[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=row_mask[:, None] & col_mask[None, :],
            )


@triton.jit
def segment_arg_scatter_kernel(
    grad_ptr,
    arg_ptr,
    out_ptr,
    rows,
    segments,
    size,
    inner,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[o, arg[o, r, c], c] = grad[o, r, c] where arg < size (out is zero-filled)."""
    num_tiles = tl.cdiv(rows, BLOCK_R)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = row < rows
        o = row // segments
        for c0 in range(0, inner, BLOCK_C):
            col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = row_mask[:, None] & (col[None, :] < inner)
            offset = row[:, None] * inner + col[None, :]
            arg = tl.load(arg_ptr + offset, mask=mask, other=size)
            values = tl.load(grad_ptr + offset, mask=mask)
            hit = mask & (arg >= 0) & (arg < size)
            target = (o * size)[:, None] * inner + tl.where(hit, arg, 0) * inner + col[None, :]
            tl.store(out_ptr + target, values, mask=hit)


def segment_reduce(
    src: torch.Tensor, perm: torch.Tensor | None, ptr: torch.Tensor, dim: int, reduce: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, arg)`` of fastcore::segment_reduce for a validated CSR (``perm``, ``ptr``)."""
    outer, size, inner = fold(src, dim)
    segments = ptr.numel() - 1
    shape = list(src.shape)
    shape[dim] = segments
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    arg_reduce = reduce in ("max", "min")
    arg = torch.empty(shape if arg_reduce else (0,), dtype=torch.int64, device=src.device)
    if out.numel() == 0:
        return out, arg
    rows = outer * segments
    ptr = ptr.to(torch.int64).contiguous()
    perm_arg = ptr if perm is None else perm.to(torch.int64).contiguous()
    block_r, block_c = block_shape(rows, inner)
    segment_reduce_fwd_kernel[(min(triton.cdiv(rows, block_r), MAX_PROGRAMS),)](
        src.contiguous(),
        perm_arg,
        ptr,
        out,
        arg if arg_reduce else out,
        rows,
        segments,
        size,
        inner,
        REDUCE=REDUCE_CODES[reduce],
        HAS_PERM=perm is not None,
        ACC_FP64=src.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out, arg


def segment_arg_scatter(grad: torch.Tensor, arg: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """fastcore::segment_arg_scatter: zeros with ``size`` rows along ``dim``, ``grad`` placed at ``arg``."""
    outer, segments, inner = fold(grad, dim)
    shape = list(grad.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0 or out.numel() == 0:
        return out
    rows = outer * segments
    block_r, block_c = block_shape(rows, inner)
    segment_arg_scatter_kernel[(min(triton.cdiv(rows, block_r), MAX_PROGRAMS),)](
        grad.contiguous(),
        arg.contiguous(),
        out,
        rows,
        segments,
        size,
        inner,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out
