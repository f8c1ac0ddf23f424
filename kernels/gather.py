"""Triton kernels for the gather family: ``gather`` (index_select) and ``csr_sum``.

Both work on the folded view ``[outer, size, inner]`` of a contiguous tensor, with int64
address arithmetic and grid-stride loops so that more than 2^31 elements (or programs)
work. The launchers trust their inputs: fastcore.ops validates before calling them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The CUDA limit on grid.x; programs loop over the remaining tiles.
_MAX_PROGRAMS = 2**31 - 1
# Elements per program tile: a compromise between occupancy on the GPU and the number
# of programs the interpreter has to step through on the CPU.
_TILE = 4096


@triton.jit
def gather_fwd_kernel(
    src_ptr,
    index_ptr,
    out_ptr,
    rows,
    index_len,
    size,
    inner,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[o, m, :] = src[o, index[m], :] for the flattened output rows (o, m)."""
    num_tiles = tl.cdiv(rows, BLOCK_R)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = row < rows
        o = row // index_len
        m = row - o * index_len
        idx = tl.load(index_ptr + m, mask=row_mask, other=0).to(tl.int64)
        src_row = (o * size + idx) * inner
        out_row = row * inner
        for c0 in range(0, inner, BLOCK_C):
            col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = row_mask[:, None] & (col[None, :] < inner)
            values = tl.load(src_ptr + src_row[:, None] + col[None, :], mask=mask)
            tl.store(out_ptr + out_row[:, None] + col[None, :], values, mask=mask)


@triton.jit
def csr_sum_kernel(
    src_ptr,
    perm_ptr,
    ptr_ptr,
    out_ptr,
    rows,
    segments,
    size,
    inner,
    HAS_PERM: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[o, r, :] = sum_{k in [ptr[r], ptr[r+1])} src[o, perm[k] or k, :].

    A program owns a tile of BLOCK_R output rows (o, r) x BLOCK_C columns and walks the
    tile's segments in lockstep: step j adds the j-th member of every segment still that
    long. Each sum runs in the fixed order k = ptr[r], ptr[r] + 1, ... (deterministic).
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    num_tiles = tl.cdiv(rows, BLOCK_R)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = row < rows
        o = row // segments
        r = row - o * segments
        start = tl.load(ptr_ptr + r, mask=row_mask, other=0)
        length = tl.load(ptr_ptr + r + 1, mask=row_mask, other=0) - start
        base = o * size * inner
        for c0 in range(0, inner, BLOCK_C):
            col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            col_mask = col < inner
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
            for j in range(0, tl.max(length)):
                live = row_mask & (j < length)
                if HAS_PERM:
                    src_row = tl.load(perm_ptr + start + j, mask=live, other=0)
                else:
                    src_row = start + j
                offset = base + src_row * inner
                values = tl.load(
                    src_ptr + offset[:, None] + col[None, :],
                    mask=live[:, None] & col_mask[None, :],
                    other=0.0,
                )
                acc += values.to(acc_dtype)
            out_offset = row[:, None] * inner + col[None, :]
            tl.store(
                out_ptr + out_offset,
                acc.to(out_ptr.dtype.element_ty),
                mask=row_mask[:, None] & col_mask[None, :],
            )


def _fold(t: torch.Tensor, dim: int) -> tuple[int, int, int]:
    outer = 1
    for s in t.shape[:dim]:
        outer *= s
    inner = 1
    for s in t.shape[dim + 1 :]:
        inner *= s
    return outer, t.shape[dim], inner


def _tile(rows: int, inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): all of a row's columns up to 1024, rows to fill the tile."""
    block_c = min(triton.next_power_of_2(max(inner, 1)), 1024)
    block_r = max(1, min(_TILE // block_c, triton.next_power_of_2(rows)))
    return block_r, block_c


def gather(src: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``src.index_select(dim, index)`` for a validated 1-D int32/int64 ``index``."""
    outer, size, inner = _fold(src, dim)
    shape = list(src.shape)
    shape[dim] = index.numel()
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    rows = outer * index.numel()
    block_r, block_c = _tile(rows, inner)
    grid = (min(triton.cdiv(rows, block_r), _MAX_PROGRAMS),)
    gather_fwd_kernel[grid](
        src.contiguous(),
        index.contiguous(),
        out,
        rows,
        index.numel(),
        size,
        inner,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


def csr_sum(
    src: torch.Tensor, perm: torch.Tensor | None, ptr: torch.Tensor, dim: int
) -> torch.Tensor:
    """Segment sums of ``src`` rows along ``dim`` for a validated int64 CSR (``perm``, ``ptr``)."""
    outer, size, inner = _fold(src, dim)
    segments = ptr.numel() - 1
    shape = list(src.shape)
    shape[dim] = segments
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    rows = outer * segments
    ptr = ptr.to(torch.int64).contiguous()
    perm_arg = ptr if perm is None else perm.to(torch.int64).contiguous()
    block_r, block_c = _tile(rows, inner)
    csr_sum_kernel[(min(triton.cdiv(rows, block_r), _MAX_PROGRAMS),)](
        src.contiguous(),
        perm_arg,
        ptr,
        out,
        rows,
        segments,
        size,
        inner,
        HAS_PERM=perm is not None,
        ACC_FP64=src.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out
