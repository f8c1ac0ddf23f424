"""Forward kernels of the kv_project family: the projection (``fastcore::kv_project``) and
the fused distillation loss (``fastcore::kv_distill_loss``). Launched from kv_project.py;
the tiles are in _kv_tiles.py."""

from __future__ import annotations

import triton
import triton.language as tl

from fastcore.kernels._kv_tiles import (
    chunk_items,
    distill_sum,
    group_ptr,
    group_setup,
    lanes,
    live_rows,
    out_tile,
    project_tile,
    tile_rows,
)


@triton.jit
def kv_project_fwd_kernel(
    kv_table,
    kv_ptr,
    mix_ptr,
    proj_ptr,
    bias_ptr,
    ptr_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    ptr_stride,
    B,
    Ht,
    Tt,
    Dt,
    Hs,
    Ts,
    Ds,
    chunks,
    PER_HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """``out[g, b, s, t] = sum_h M[g,s,h] (sum_k w_k kv[g][b, h, idx_k]) @ P[g](,h) + bias[g, s]``.

    Program (c, g) computes the output tiles ``[Hs, BLOCK_T, Ds]`` of its work items in
    registers and stores them in kv's dtype."""
    s, s_mask, ecol, ds_mask = lanes(Hs, Ds, BLOCK_S, BLOCK_DS)
    g, x_g, mix_g, proj_g, bias_g = group_setup(
        kv_table, kv_ptr, mix_ptr, proj_ptr, bias_ptr, Ht, Dt, Hs, Ds, PER_HEAD, ALIGNED
    )
    _c, tiles, lo, hi = chunk_items(chunks, B, Ts, BLOCK_T)
    out_g = out_ptr + g * B * Hs * Ts * Ds
    for item in range(lo, hi):
        b, t, t_mask, src, w, length, steps = tile_rows(
            item, tiles, ptr_ptr, ptr_stride, idx_ptr, w_ptr, Ts, BLOCK_T
        )
        o = project_tile(
            x_g + b * Ht * Tt * Dt, mix_g, proj_g, bias_g, src, w, length, steps,
            Ht, Tt, Dt, Hs, Ds,
            PER_HEAD, HAS_BIAS, MODE, BLOCK_S, BLOCK_T, BLOCK_K, NUM_K, BLOCK_DS,
        )  # fmt: skip
        rows, valid, _row_valid = out_tile(b, t, t_mask, s, s_mask, ds_mask, Hs, Ts)
        out = out_g + rows * Ds + ecol[None, None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def kv_distill_loss_fwd_kernel(
    kv_table,
    kv_ptr,
    st_table,
    st_ptr,
    mix_ptr,
    proj_ptr,
    bias_ptr,
    ptr_ptr,
    idx_ptr,
    w_ptr,
    part_ptr,
    ptr_stride,
    mask_ptr,
    B,
    Ht,
    Tt,
    Dt,
    Hs,
    Ts,
    Ds,
    chunks,
    LOSS: tl.constexpr,
    PER_HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ALIGNED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """``part[g, c]`` = the sum of group g's loss terms (LOSS 1: squared errors, 2:
    ``1 - cos`` per row) over the work items of chunk c, in float64: each output tile is
    recomputed in registers and compared with the student tile, never stored. HAS_MASK:
    rows the mask ``[B, Ts]`` marks 0 are skipped (no teacher step read, no term)."""
    s, s_mask, ecol, ds_mask = lanes(Hs, Ds, BLOCK_S, BLOCK_DS)
    g, x_g, mix_g, proj_g, bias_g = group_setup(
        kv_table, kv_ptr, mix_ptr, proj_ptr, bias_ptr, Ht, Dt, Hs, Ds, PER_HEAD, ALIGNED
    )
    c, tiles, lo, hi = chunk_items(chunks, B, Ts, BLOCK_T)
    st_g = group_ptr(st_table, g, st_ptr, ALIGNED)
    acc_dtype = tl.float64 if MODE == "fp64" else tl.float32
    total = tl.zeros([1], dtype=tl.float64)
    for item in range(lo, hi):
        b, t, t_mask, src, w, length, steps = tile_rows(
            item, tiles, ptr_ptr, ptr_stride, idx_ptr, w_ptr, Ts, BLOCK_T
        )
        live, length, steps = live_rows(mask_ptr, b, t, t_mask, length, steps, Ts, HAS_MASK)
        o = project_tile(
            x_g + b * Ht * Tt * Dt, mix_g, proj_g, bias_g, src, w, length, steps,
            Ht, Tt, Dt, Hs, Ds,
            PER_HEAD, HAS_BIAS, MODE, BLOCK_S, BLOCK_T, BLOCK_K, NUM_K, BLOCK_DS,
        )  # fmt: skip
        rows, valid, row_valid = out_tile(b, t, live, s, s_mask, ds_mask, Hs, Ts)
        st = tl.load(st_g + rows * Ds + ecol[None, None, :], mask=valid, other=0.0)
        st = st.to(acc_dtype)
        total += distill_sum(o, st, valid, row_valid, LOSS).to(tl.float64)
    tl.store(part_ptr + g * chunks + c + tl.arange(0, 1), total)
