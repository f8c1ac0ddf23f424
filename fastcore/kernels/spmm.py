"""Triton kernels for graph convolution: ``spmm`` (CSR by destination) and
``spmm_edge_grad`` (the edge-weight gradient, an SDDMM).

Dense tensors are the folded view ``[outer, nodes, inner]`` of a contiguous tensor; int64
address arithmetic; grid-stride loops. The launchers trust their inputs: fastcore.ops
validates (a fastcore.Graph at construction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcore.kernels._tiles import MAX_PROGRAMS, block_shape, fold


@triton.jit
def spmm_fwd_kernel(
    x_ptr,
    weight_ptr,
    ptr_ptr,
    col_ptr,
    out_ptr,
    rows,
    segments,
    n_src,
    inner,
    HAS_WEIGHT: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[o, v, :] = sum_{k in [ptr[v], ptr[v+1])} weight[k] * x[o, col[k], :], plus
    x[o, v, :] after the sum when RESIDUAL (a square structure).

    A program owns BLOCK_R output rows (o, v) x BLOCK_C columns and walks their entries in
    lockstep; each row sums in CSR order (deterministic)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    num_tiles = tl.cdiv(rows, BLOCK_R)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tl.cast(tile, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        row_mask = row < rows
        o = row // segments
        v = row - o * segments
        start = tl.load(ptr_ptr + v, mask=row_mask, other=0)
        length = tl.load(ptr_ptr + v + 1, mask=row_mask, other=0) - start
        base = o * n_src * inner
        max_length = tl.max(length)
        for c0 in range(0, inner, BLOCK_C):
            col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            col_mask = col < inner
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
            for j in range(0, max_length):
                live = row_mask & (j < length)
                node = tl.load(col_ptr + start + j, mask=live, other=0)
                values = tl.load(
                    x_ptr + (base + node * inner)[:, None] + col[None, :],
                    mask=live[:, None] & col_mask[None, :],
                    other=0.0,
                ).to(acc_dtype)
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + start + j, mask=live, other=0.0).to(acc_dtype)
                    values = values * w[:, None]
                acc += values
            if RESIDUAL:
                acc += tl.load(
                    x_ptr + (base + v * inner)[:, None] + col[None, :],
                    mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0,
                ).to(acc_dtype)
            tl.store(
                out_ptr + row[:, None] * inner + col[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=row_mask[:, None] & col_mask[None, :],
            )


@triton.jit
def spmm_edge_grad_kernel(
    grad_ptr,
    x_ptr,
    dst_ptr,
    col_ptr,
    out_ptr,
    edges,
    outer,
    segments,
    n_src,
    inner,
    ACC_FP64: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[k] = sum_o sum_j grad[o, dst[k], j] * x[o, col[k], j], over o ascending and
    column blocks in order, in float64 (deterministic)."""
    dot_dtype = tl.float64 if ACC_FP64 else tl.float32
    num_tiles = tl.cdiv(edges, BLOCK_E)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        k = tl.cast(tile, tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
        k_mask = k < edges
        dst = tl.load(dst_ptr + k, mask=k_mask, other=0)
        src = tl.load(col_ptr + k, mask=k_mask, other=0)
        total = tl.zeros([BLOCK_E], dtype=tl.float64)
        for o in range(0, outer):
            o64 = tl.cast(o, tl.int64)
            g_row = (o64 * segments + dst) * inner
            x_row = (o64 * n_src + src) * inner
            for c0 in range(0, inner, BLOCK_C):
                col = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                mask = k_mask[:, None] & (col[None, :] < inner)
                g = tl.load(grad_ptr + g_row[:, None] + col[None, :], mask=mask, other=0.0)
                xv = tl.load(x_ptr + x_row[:, None] + col[None, :], mask=mask, other=0.0)
                total += tl.sum(g.to(dot_dtype) * xv.to(dot_dtype), axis=1).to(tl.float64)
        tl.store(out_ptr + k, total.to(out_ptr.dtype.element_ty), mask=k_mask)


def spmm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    ptr: torch.Tensor,
    col: torch.Tensor,
    dim: int,
    residual: bool = False,
) -> torch.Tensor:
    """fastcore::spmm for a validated CSR (``ptr``, ``col``) and CSR-ordered ``weight``;
    ``residual`` adds each row's own input after its entries (square structures)."""
    outer, n_src, inner = fold(x, dim)
    segments = ptr.numel() - 1
    shape = list(x.shape)
    shape[dim] = segments
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = outer * segments
    ptr = ptr.to(torch.int64).contiguous()
    block_r, block_c = block_shape(rows, inner)
    spmm_fwd_kernel[(min(triton.cdiv(rows, block_r), MAX_PROGRAMS),)](
        x.contiguous(),
        ptr if weight is None else weight.contiguous(),
        ptr,
        col.to(torch.int64).contiguous(),
        out,
        rows,
        segments,
        n_src,
        inner,
        HAS_WEIGHT=weight is not None,
        RESIDUAL=residual,
        ACC_FP64=x.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


def spmm_edge_grad(
    grad: torch.Tensor, x: torch.Tensor, ptr: torch.Tensor, col: torch.Tensor, dim: int
) -> torch.Tensor:
    """fastcore::spmm_edge_grad: ``[E]`` in CSR order."""
    outer, n_src, inner = fold(x, dim)
    segments = ptr.numel() - 1
    edges = col.numel()
    out = torch.empty(edges, dtype=x.dtype, device=x.device)
    if edges == 0:
        return out
    ptr = ptr.to(torch.int64)
    dst = torch.repeat_interleave(
        torch.arange(segments, device=x.device), ptr.diff(), output_size=edges
    )
    block_c = min(triton.next_power_of_2(max(inner, 1)), 256)
    block_e = max(1, min(4096 // block_c, triton.next_power_of_2(edges)))
    spmm_edge_grad_kernel[(min(triton.cdiv(edges, block_e), MAX_PROGRAMS),)](
        grad.contiguous(),
        x.contiguous(),
        dst,
        col.to(torch.int64).contiguous(),
        out,
        edges,
        outer,
        segments,
        n_src,
        inner,
        ACC_FP64=x.dtype == torch.float64,
        BLOCK_E=block_e,
        BLOCK_C=block_c,
    )
    return out
