"""Backward kernels of the kv_project family (``fastcore::kv_project_backward``, for both
the projection and the fused distillation loss). Launched from kv_project.py; the tiles
are in _kv_tiles.py."""

from __future__ import annotations

import triton
import triton.language as tl

from fastcore.kernels._kv_tiles import (
    add_chunk,
    chunk_items,
    distill_grad,
    group_ptr,
    group_setup,
    head_projection,
    k_cols,
    lanes,
    live_rows,
    load_proj,
    mix_column,
    mm,
    out_tile,
    project_tile,
    resample,
    store_chunks,
    tile_rows,
)


@triton.jit
def kv_project_bwd_kernel(
    kv_table,
    kv_ptr,
    st_table,
    st_ptr,
    go_ptr,
    scale_ptr,
    mix_ptr,
    proj_ptr,
    bias_ptr,
    ptr_ptr,
    idx_ptr,
    w_ptr,
    gst_table,
    gst_ptr,
    mid_ptr,
    gm_part,
    gp_part,
    gb_part,
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
    NEED_MID: tl.constexpr,
    ALIGNED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """The per-tile backward. G (the output tile's gradient) comes from ``grad_out``
    (LOSS 0) or is recomputed from the recomputed output tile and the student tile
    (LOSS 1 mse, 2 cosine; ``scale[g]`` = upstream gradient / N; dL/dst is stored to
    ``gst``). Program (c, g) sums over its work items, in registers, and stores once:

    * ``gm_part[g, c] [Hs, Ht]``: shared ``<dZ[s], xr[h]>`` with ``dZ = G @ P^T``; per head
      ``<G[s], xr[h] @ P_h>``;
    * ``gp_part[g, c] [Dt, Ds]`` (shared only): ``Z^T G``, one accumulator per Dt chunk;
    * ``gb_part[g, c] [Hs, Ds]``: ``sum_t G``;
    * ``mid`` (every element of its tiles): shared ``dZ [G, B, Hs, Ts, Dt]`` when NEED_MID;
      per head ``dY[h] = sum_s M[s,h] G[s]`` ``[G, B, Ht, Ts, Ds]``, always.

    HAS_MASK (a loss only): rows the mask ``[B, Ts]`` marks 0 read no teacher step and get
    G = 0 (and a zero student gradient, stored like every other row).
    """
    acc_dtype = tl.float64 if MODE == "fp64" else tl.float32
    s, s_mask, ecol, ds_mask = lanes(Hs, Ds, BLOCK_S, BLOCK_DS)
    g, x_g, mix_g, proj_g, bias_g = group_setup(
        kv_table, kv_ptr, mix_ptr, proj_ptr, bias_ptr, Ht, Dt, Hs, Ds, PER_HEAD, ALIGNED
    )
    c, tiles, lo, hi = chunk_items(chunks, B, Ts, BLOCK_T)
    hcol = tl.arange(0, BLOCK_H).to(tl.int64)
    if LOSS != 0:
        st_g = group_ptr(st_table, g, st_ptr, ALIGNED)
        gst_g = group_ptr(gst_table, g, gst_ptr, ALIGNED)
        scale = tl.load(scale_ptr + g).to(acc_dtype)
    gm = tl.zeros([BLOCK_S, BLOCK_H], dtype=acc_dtype)
    gb = tl.zeros([BLOCK_S, BLOCK_DS], dtype=acc_dtype)
    gp0 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp1 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp2 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp3 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    for item in range(lo, hi):
        b, t, t_mask, src, w, length, steps = tile_rows(
            item, tiles, ptr_ptr, ptr_stride, idx_ptr, w_ptr, Ts, BLOCK_T
        )
        live, length, steps = live_rows(mask_ptr, b, t, t_mask, length, steps, Ts, HAS_MASK)
        x_b = x_g + b * Ht * Tt * Dt
        # rows_bst: rows [b, s, t] of a [.., B, Hs, Ts, *] tensor, from group g's start.
        rows_bst, valid, row_valid = out_tile(b, t, t_mask, s, s_mask, ds_mask, Hs, Ts)
        tile_offs = rows_bst * Ds + ecol[None, None, :]
        if LOSS == 0:
            gt = tl.load(go_ptr + g * B * Hs * Ts * Ds + tile_offs, mask=valid, other=0.0)
            gt = gt.to(acc_dtype)
        else:
            o = project_tile(
                x_b, mix_g, proj_g, bias_g, src, w, length, steps, Ht, Tt, Dt, Hs, Ds,
                PER_HEAD, HAS_BIAS, MODE, BLOCK_S, BLOCK_T, BLOCK_K, NUM_K, BLOCK_DS,
            )  # fmt: skip
            used = valid & live[None, :, None]
            st = tl.load(st_g + tile_offs, mask=used, other=0.0).to(acc_dtype)
            gt, gs = distill_grad(o, st, used, scale, LOSS)
            tl.store(gst_g + tile_offs, gs.to(gst_ptr.dtype.element_ty), mask=valid)
        if HAS_BIAS:
            gb += tl.sum(gt, axis=1)
        if PER_HEAD:
            for h in range(0, Ht):
                hh = tl.cast(h, tl.int64)
                y = head_projection(
                    x_b + hh * Tt * Dt, proj_g + hh * Dt * Ds, src, w, length, steps, Dt, Ds,
                    MODE, BLOCK_T, BLOCK_K, NUM_K, BLOCK_DS,
                )  # fmt: skip
                part = tl.sum(tl.sum(gt * y[None, :, :], axis=2), axis=1)
                gm += tl.where(hcol[None, :] == hh, part[:, None], 0.0)
                m = mix_column(mix_g, hh, Ht, Hs, MODE, BLOCK_S)
                dy = tl.sum(m[:, None, None] * gt, axis=0)
                tl.store(
                    mid_ptr + (((g * B + b) * Ht + hh) * Ts + t[:, None]) * Ds + ecol[None, :],
                    dy,
                    mask=t_mask[:, None] & ds_mask[None, :],
                )
        else:
            g2 = tl.reshape(gt, [BLOCK_S * BLOCK_T, BLOCK_DS])
            for kc in tl.static_range(NUM_K):
                dcol, dt_mask = k_cols(kc, Dt, BLOCK_K)
                pk = load_proj(proj_g, dcol, dt_mask, Ds, MODE, BLOCK_DS)
                dz = tl.zeros([BLOCK_S * BLOCK_T, BLOCK_K], dtype=acc_dtype)
                dz = tl.reshape(mm(dz, g2, tl.trans(pk), MODE), [BLOCK_S, BLOCK_T, BLOCK_K])
                z = tl.zeros([BLOCK_S, BLOCK_T, BLOCK_K], dtype=acc_dtype)
                for h in range(0, Ht):
                    hh = tl.cast(h, tl.int64)
                    xr = resample(
                        x_b + hh * Tt * Dt, src, w, length, steps, dcol, dt_mask, Dt, MODE,
                        BLOCK_T, BLOCK_K,
                    )  # fmt: skip
                    m = mix_column(mix_g, hh, Ht, Hs, MODE, BLOCK_S)
                    z += m[:, None, None] * xr[None, :, :]
                    part = tl.sum(tl.sum(dz * xr[None, :, :], axis=2), axis=1)
                    gm += tl.where(hcol[None, :] == hh, part[:, None], 0.0)
                d = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
                d = mm(d, tl.trans(tl.reshape(z, [BLOCK_S * BLOCK_T, BLOCK_K])), g2, MODE)
                gp0, gp1, gp2, gp3 = add_chunk(kc, d, gp0, gp1, gp2, gp3)
                if NEED_MID:
                    tl.store(
                        mid_ptr + (g * B * Hs * Ts + rows_bst) * Dt + dcol[None, None, :],
                        dz,
                        mask=row_valid[:, :, None] & dt_mask[None, None, :],
                    )
    unit = g * chunks + c
    tl.store(
        gm_part + (unit * Hs + s[:, None]) * Ht + hcol[None, :],
        gm,
        mask=s_mask[:, None] & (hcol[None, :] < Ht),
    )
    if HAS_BIAS:
        tl.store(
            gb_part + (unit * Hs + s[:, None]) * Ds + ecol[None, :],
            gb,
            mask=s_mask[:, None] & ds_mask[None, :],
        )
    if not PER_HEAD:
        store_chunks(gp_part + unit * Dt * Ds, gp0, gp1, gp2, gp3, Dt, Ds, BLOCK_K, NUM_K, BLOCK_DS)


@triton.jit
def kv_project_bwd_kv_kernel(
    mid_ptr,
    mix_ptr,
    w_ptr,
    t_ptr_ptr,
    t_col_ptr,
    t_edge_ptr,
    gkv_table,
    gkv_ptr,
    t_stride,
    B,
    Ht,
    Tt,
    Dt,
    Hs,
    Ts,
    chunks,
    ALIGNED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    """Shared P: ``grad_kv[g, b, h, j] = sum_s M[g,s,h] A[s, j]`` with
    ``A[s, j] = sum_{k in row j} w[t_edge[k]] dZ[g, b, s, t_col[k]]`` (the transposed rows,
    in their fixed order: deterministic). Program (c, g) owns tiles of BLOCK_J teacher
    steps x every head; grad_kv (G tensors ``[B, Ht, Tt, Dt]``, address table ``gkv``) in
    kv's dtype."""
    acc_dtype = tl.float64 if MODE == "fp64" else tl.float32
    g = tl.program_id(1).to(tl.int64)
    _c, tiles, lo, hi = chunk_items(chunks, B, Tt, BLOCK_J)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < Hs
    dcol = tl.arange(0, BLOCK_DT).to(tl.int64)
    dt_mask = dcol < Dt
    mix_g = mix_ptr + g * Hs * Ht
    gkv_g = group_ptr(gkv_table, g, gkv_ptr, ALIGNED)
    for item in range(lo, hi):
        b, j, j_mask, col, edge, length, steps = tile_rows(
            item, tiles, t_ptr_ptr, t_stride, t_col_ptr, t_edge_ptr, Tt, BLOCK_J
        )
        mid_b = mid_ptr + (g * B + b) * Hs * Ts * Dt
        a = tl.zeros([BLOCK_S, BLOCK_J, BLOCK_DT], dtype=acc_dtype)
        for i in range(0, steps):
            live = i < length
            step = tl.load(col + i, mask=live, other=0)
            e = tl.load(edge + i, mask=live, other=0)
            wi = tl.load(w_ptr + e, mask=live, other=0.0).to(acc_dtype)
            values = tl.load(
                mid_b + (s[:, None, None] * Ts + step[None, :, None]) * Dt + dcol[None, None, :],
                mask=s_mask[:, None, None] & live[None, :, None] & dt_mask[None, None, :],
                other=0.0,
            ).to(acc_dtype)
            a += wi[None, :, None] * values
        out_mask = j_mask[:, None] & dt_mask[None, :]
        for h in range(0, Ht):
            hh = tl.cast(h, tl.int64)
            m = mix_column(mix_g, hh, Ht, Hs, MODE, BLOCK_S)
            gk = tl.sum(m[:, None, None] * a, axis=0)
            tl.store(
                gkv_g + ((b * Ht + hh) * Tt + j[:, None]) * Dt + dcol[None, :],
                gk.to(gkv_ptr.dtype.element_ty),
                mask=out_mask,
            )


@triton.jit
def kv_project_bwd_proj_kernel(
    kv_table,
    kv_ptr,
    mid_ptr,
    proj_ptr,
    w_ptr,
    t_ptr_ptr,
    t_col_ptr,
    t_edge_ptr,
    gkv_table,
    gkv_ptr,
    gp_part,
    t_stride,
    mask_ptr,
    B,
    Ht,
    Tt,
    Dt,
    Ts,
    Ds,
    chunks,
    NEED_KV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ALIGNED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """Per-head P, program (c, h, g) over tiles of BLOCK_J teacher steps of head h:
    ``A[j] = sum_{k in row j} w[t_edge[k]] dY[g, b, h, t_col[k]]`` (transposed rows, fixed
    order), then ``grad_kv[g, b, h, j] = A[j] @ P[g,h]^T`` (NEED_KV) and
    ``gp_part[g, c, h] += x[g][b, h, j]^T A[j]`` (x read in place, no gather), one
    accumulator per Dt chunk, stored once. HAS_MASK (a loss's mask ``[B, Ts]``): entries of
    masked student rows are skipped, and a teacher step no valid row reads is not read
    (its x never meets the zero A: a NaN there goes nowhere)."""
    acc_dtype = tl.float64 if MODE == "fp64" else tl.float32
    h = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    c, tiles, lo, hi = chunk_items(chunks, B, Tt, BLOCK_J)
    x_g = group_ptr(kv_table, g, kv_ptr, ALIGNED)
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    ds_mask = ecol < Ds
    proj_h = proj_ptr + (g * Ht + h) * Dt * Ds
    if NEED_KV:
        gkv_g = group_ptr(gkv_table, g, gkv_ptr, ALIGNED)
    gp0 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp1 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp2 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp3 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    for item in range(lo, hi):
        b, j, j_mask, col, edge, length, steps = tile_rows(
            item, tiles, t_ptr_ptr, t_stride, t_col_ptr, t_edge_ptr, Tt, BLOCK_J
        )
        mid_bh = mid_ptr + ((g * B + b) * Ht + h) * Ts * Ds
        a = tl.zeros([BLOCK_J, BLOCK_DS], dtype=acc_dtype)
        used = tl.zeros([BLOCK_J, 1], dtype=tl.int1)
        # [BLOCK_J, 1] columns: see resample() in _kv_tiles (Triton 3.6 layouts).
        for i in range(0, steps):
            live = (i < length)[:, None]
            step = tl.load((col + i)[:, None], mask=live, other=0)
            if HAS_MASK:
                live = live & (tl.load(mask_ptr + b * Ts + step, mask=live, other=0) != 0)
                used = used | live
            e = tl.load((edge + i)[:, None], mask=live, other=0)
            wi = tl.load(w_ptr + e, mask=live, other=0.0).to(acc_dtype)
            values = tl.load(
                mid_bh + step * Ds + ecol[None, :], mask=live & ds_mask[None, :], other=0.0
            ).to(acc_dtype)
            a += wi * values
        x_bh = x_g + (b * Ht + h) * Tt * Dt
        for kc in tl.static_range(NUM_K):
            dcol, dt_mask = k_cols(kc, Dt, BLOCK_K)
            rows = j[:, None] * Dt + dcol[None, :]
            rows_mask = j_mask[:, None] & dt_mask[None, :]
            if NEED_KV:
                pk = load_proj(proj_h, dcol, dt_mask, Ds, MODE, BLOCK_DS)
                gk = tl.zeros([BLOCK_J, BLOCK_K], dtype=acc_dtype)
                gk = mm(gk, a, tl.trans(pk), MODE)
                tl.store(
                    gkv_g + (b * Ht + h) * Tt * Dt + rows,
                    gk.to(gkv_ptr.dtype.element_ty),
                    mask=rows_mask,
                )
            if HAS_MASK:
                x = tl.load(x_bh + rows, mask=rows_mask & used, other=0.0).to(acc_dtype)
            else:
                x = tl.load(x_bh + rows, mask=rows_mask, other=0.0).to(acc_dtype)
            d = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
            d = mm(d, tl.trans(x), a, MODE)
            gp0, gp1, gp2, gp3 = add_chunk(kc, d, gp0, gp1, gp2, gp3)
    base = gp_part + ((g * chunks + c) * Ht + h) * Dt * Ds
    store_chunks(base, gp0, gp1, gp2, gp3, Dt, Ds, BLOCK_K, NUM_K, BLOCK_DS)
