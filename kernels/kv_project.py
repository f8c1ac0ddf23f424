"""Triton kernels for the fused KV-cache projection (``fastcore::kv_project``), its
backward and the fused distillation loss (``fastcore::kv_distill_loss``). The contract is
in fastcore/reference/kv.py; the CPU twin is csrc/cpu/kv_project.cpp.

Groups: ``kv`` (and the student cache) are lists of G tensors, read through a table of
their int64 addresses, so one launch covers every group (``ALIGNED``: every address is
16-byte aligned, so rows load vectorised). Under the interpreter the table holds host
addresses: the interpreter path is for CPU tensors.

Work item = (group g, batch b, tile of BLOCK_T student steps). Program (c, g) walks the
fixed range ``[items * c / chunks, items * (c + 1) / chunks)`` of group g's items;
``chunks`` is a function of the shapes only, so the per-program partial sums (parameter
gradients, losses), reduced afterwards by ``torch.sum`` over the program axis, give the
same bits on every run and every device. No float atomics. Per item, in registers,
accumulating in float32 (float64 for float64 kv), the teacher head dim in NUM_K chunks of
BLOCK_K columns (a P chunk ``[BLOCK_K, Ds]`` is a dot operand; the whole P of a 256-wide
head would not fit in shared memory):

* ``xr[h] = sum_k w_k x[h, idx_k]``: one teacher head (and column chunk) at a time;
* shared ``dim_proj``: ``Z[s] = sum_h M[s,h] xr[h]`` (``[BLOCK_S, BLOCK_T, BLOCK_K]``: heads
  mixed before projecting, Ht/Hs fewer FLOPs), then ``tl.dot`` of the
  ``[BLOCK_S * BLOCK_T, BLOCK_K]`` rows with the P chunk, plus bias;
* per-head ``dim_proj``: ``Y[h] = xr[h] @ P_h`` (``tl.dot``), ``out[s] = sum_h M[s,h] Y[h]``.

Backward (G = the gradient of an output tile: loaded from ``grad_out``, or recomputed from
the recomputed output tile and the student tile for a distillation loss):

* shared: ``dZ = G @ P^T``; ``grad_M[s,h] += <dZ[s], xr[h]>``; ``grad_P += Z^T G``;
  ``grad_bias += sum_t G``. ``dZ`` goes to a student-sized float32 buffer when the kv
  gradient is needed; ``kv_project_bwd_kv_kernel`` gathers it over the transposed rows:
  ``grad_kv[h, j] = sum_s M[s,h] sum_{k in row j} w_k dZ[s, t_k]``.
* per head: ``grad_M[s,h] += <G[s], Y[h]>``, ``dY[h] = sum_s M[s,h] G[s]`` to a buffer;
  ``kv_project_bwd_proj_kernel`` (programs by head) gathers ``A[h, j] = sum_k w_k dY[h, t_k]``
  and forms ``grad_kv[h, j] = A[h, j] @ P_h^T`` and
  ``grad_P_h = sum_j x[h, j]^T A[h, j]`` (= ``sum_t xr[h,t]^T dY[h,t]``), x read in place.

Matrix products are ``tl.dot`` with fp32 accumulation: fp32 operands ("ieee") for float32
kv, half operands (kv's type) for bf16/fp16 kv; float64 uses a broadcast multiply-and-sum
(``tl.dot`` has no float64 on older Triton GPU backends), a correctness path. Head dims
are padded to powers of two >= 16 and masked; Ds is taken whole (up to 256 is the design
range) and Dt in at most 4 chunks. The launchers trust their inputs: fastcore.ops
validates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Programs of the chunked grids: about two per H100 SM. A constant, not the device's SM
# count, so the partial sums (hence the gradients) are the same bits on every device.
PROGRAMS = 264
# Elements of a program's largest register tile (BLOCK_S x BLOCK_T x head dim); float64
# (the broadcast products) gets smaller tiles.
TILE = 4096
TILE_FP64 = 2048
# Elements of a P chunk [BLOCK_K, Ds] (a dot operand staged in shared memory).
PROJ_TILE = 16384
# At most this many Dt chunks (the per-chunk grad_dim_proj accumulators are unrolled).
MAX_K_CHUNKS = 4
# The loss codes of the kernels ("": the plain backward of kv_project).
LOSS_CODES = {"": 0, "mse": 1, "cosine": 2}
COSINE_EPS = 1e-8


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------


@triton.jit
def _group_ptr(table_ptr, g, like_ptr, ALIGNED: tl.constexpr):
    """Group g's base pointer, from the int64 address table, typed as ``like_ptr``."""
    addr = tl.load(table_ptr + g)
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
    return addr.to(tl.pointer_type(like_ptr.dtype.element_ty))


@triton.jit
def _dot_type(x, ACC_FP64: tl.constexpr, DOT_MODE: tl.constexpr):
    """``x`` as a matrix-product operand: kv's half type for "bf16" / "fp16", else the
    accumulation type."""
    if DOT_MODE == "bf16":
        return x.to(tl.bfloat16)
    elif DOT_MODE == "fp16":
        return x.to(tl.float16)
    elif ACC_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _mm(acc, a, b, USE_DOT: tl.constexpr, ACC_FP64: tl.constexpr, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` in acc's type: ``tl.dot`` (operands as :func:`_dot_type`; "ieee":
    exact fp32 products), or a broadcast multiply-and-sum without USE_DOT (float64)."""
    if USE_DOT:
        a = _dot_type(a, ACC_FP64, DOT_MODE)
        b = _dot_type(b, ACC_FP64, DOT_MODE)
        if DOT_MODE == "ieee":
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
    else:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _item_range(c, chunks, items):
    """The work items ``[lo, hi)`` of chunk c (int64)."""
    lo = items * c // chunks
    hi = items * (c + 1) // chunks
    return lo, hi


@triton.jit
def _rows(ptr_ptr, row, row_mask):
    """CSR rows of a tile: their starts, lengths and the tile's longest row."""
    start = tl.load(ptr_ptr + row, mask=row_mask, other=0)
    length = tl.load(ptr_ptr + row + 1, mask=row_mask, other=0) - start
    return start, length, tl.max(length, axis=0)


@triton.jit
def _k_cols(kc, Dt, BLOCK_K: tl.constexpr):
    """Columns of Dt chunk kc and their mask."""
    dcol = tl.cast(kc, tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    return dcol, dcol < Dt


@triton.jit
def _resample(
    x_head,
    idx_ptr,
    w_ptr,
    start,
    length,
    steps,
    t_mask,
    col,
    col_mask,
    width,
    ACC_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """``xr[t, :] = sum_k w[k] * x_head[idx[k], col]`` over each row of the tile, in CSR
    order (``x_head``: one teacher head ``[Tt, width]``) -> ``[BLOCK_T, BLOCK_W]``, 0 where
    masked."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    xr = tl.zeros([BLOCK_T, BLOCK_W], dtype=acc_dtype)
    for j in range(0, steps):
        live = t_mask & (j < length)
        src = tl.load(idx_ptr + start + j, mask=live, other=0)
        w = tl.load(w_ptr + start + j, mask=live, other=0.0).to(acc_dtype)
        values = tl.load(
            x_head + src[:, None] * width + col[None, :],
            mask=live[:, None] & col_mask[None, :],
            other=0.0,
        ).to(acc_dtype)
        xr += w[:, None] * values
    return xr


@triton.jit
def _mix_head(
    z,
    x_b,
    hh,
    mix_g,
    idx_ptr,
    w_ptr,
    start,
    length,
    steps,
    t_mask,
    s,
    s_mask,
    dcol,
    dt_mask,
    Ht,
    Tt,
    Dt,
    ACC_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Head hh's resampled rows ``xr [BLOCK_T, BLOCK_K]`` (columns dcol) and
    ``z + M[:, hh] xr``."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    xr = _resample(
        x_b + hh * Tt * Dt,
        idx_ptr,
        w_ptr,
        start,
        length,
        steps,
        t_mask,
        dcol,
        dt_mask,
        Dt,
        ACC_FP64,
        BLOCK_T,
        BLOCK_K,
    )
    m = tl.load(mix_g + s * Ht + hh, mask=s_mask, other=0.0).to(acc_dtype)
    return xr, z + m[:, None, None] * xr[None, :, :]


@triton.jit
def _load_proj(
    proj_h, dcol, dt_mask, ecol, ds_mask, Ds, ACC_FP64: tl.constexpr, DOT_MODE: tl.constexpr
):
    """Rows dcol of one projection matrix ``[Dt, Ds]`` -> ``[BLOCK_K, BLOCK_DS]``
    (0-padded), as a matrix-product operand."""
    p = tl.load(
        proj_h + dcol[:, None] * Ds + ecol[None, :],
        mask=dt_mask[:, None] & ds_mask[None, :],
        other=0.0,
    )
    return _dot_type(p, ACC_FP64, DOT_MODE)


@triton.jit
def _project_tile(
    x_b,
    mix_g,
    proj_g,
    bias_g,
    idx_ptr,
    w_ptr,
    start,
    length,
    steps,
    t_mask,
    s,
    s_mask,
    ecol,
    ds_mask,
    Ht,
    Tt,
    Dt,
    Ds,
    PER_HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """The output tile ``[BLOCK_S, BLOCK_T, BLOCK_DS]`` of (g, b, t) in the accumulation
    type, bias included (``x_b``: kv[g][b]; ``mix_g``, ``proj_g``, ``bias_g``: group g's)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    if PER_HEAD:
        o = tl.zeros([BLOCK_S, BLOCK_T, BLOCK_DS], dtype=acc_dtype)
        for h in range(0, Ht):
            hh = tl.cast(h, tl.int64)
            y = tl.zeros([BLOCK_T, BLOCK_DS], dtype=acc_dtype)
            for kc in range(0, NUM_K):
                dcol, dt_mask = _k_cols(kc, Dt, BLOCK_K)
                xr = _resample(
                    x_b + hh * Tt * Dt,
                    idx_ptr,
                    w_ptr,
                    start,
                    length,
                    steps,
                    t_mask,
                    dcol,
                    dt_mask,
                    Dt,
                    ACC_FP64,
                    BLOCK_T,
                    BLOCK_K,
                )
                pk = _load_proj(
                    proj_g + hh * Dt * Ds, dcol, dt_mask, ecol, ds_mask, Ds, ACC_FP64, DOT_MODE
                )
                y = _mm(y, xr, pk, USE_DOT, ACC_FP64, DOT_MODE)
            m = tl.load(mix_g + s * Ht + hh, mask=s_mask, other=0.0).to(acc_dtype)
            o += m[:, None, None] * y[None, :, :]
    else:
        o2 = tl.zeros([BLOCK_S * BLOCK_T, BLOCK_DS], dtype=acc_dtype)
        for kc in range(0, NUM_K):
            dcol, dt_mask = _k_cols(kc, Dt, BLOCK_K)
            z = tl.zeros([BLOCK_S, BLOCK_T, BLOCK_K], dtype=acc_dtype)
            for h in range(0, Ht):
                _xr, z = _mix_head(
                    z,
                    x_b,
                    tl.cast(h, tl.int64),
                    mix_g,
                    idx_ptr,
                    w_ptr,
                    start,
                    length,
                    steps,
                    t_mask,
                    s,
                    s_mask,
                    dcol,
                    dt_mask,
                    Ht,
                    Tt,
                    Dt,
                    ACC_FP64,
                    BLOCK_T,
                    BLOCK_K,
                )
            pk = _load_proj(proj_g, dcol, dt_mask, ecol, ds_mask, Ds, ACC_FP64, DOT_MODE)
            o2 = _mm(
                o2, tl.reshape(z, [BLOCK_S * BLOCK_T, BLOCK_K]), pk, USE_DOT, ACC_FP64, DOT_MODE
            )
        o = tl.reshape(o2, [BLOCK_S, BLOCK_T, BLOCK_DS])
    if HAS_BIAS:
        bias = tl.load(
            bias_g + s[:, None] * Ds + ecol[None, :],
            mask=s_mask[:, None] & ds_mask[None, :],
            other=0.0,
        ).to(acc_dtype)
        o += bias[:, None, :]
    return o


@triton.jit
def _distill_sum(o, st, valid, row_valid, LOSS: tl.constexpr):
    """A tile's loss terms, summed: ``(o - st)^2`` over elements (LOSS 1) or
    ``1 - cos(o, st)`` over rows (LOSS 2, each norm clamped below at COSINE_EPS)."""
    o = tl.where(valid, o, 0.0)
    if LOSS == 1:
        d = o - st
        return tl.sum(tl.sum(tl.sum(d * d, axis=2), axis=1), axis=0)
    else:
        dp = tl.sum(o * st, axis=2)
        no = tl.maximum(tl.sqrt(tl.sum(o * o, axis=2)), 1e-8)
        ns = tl.maximum(tl.sqrt(tl.sum(st * st, axis=2)), 1e-8)
        terms = tl.where(row_valid, 1.0 - dp / (no * ns), 0.0)
        return tl.sum(tl.sum(terms, axis=1), axis=0)


@triton.jit
def _distill_grad(o, st, valid, scale, LOSS: tl.constexpr):
    """(dL/do, dL/dst) of a tile, scaled by ``scale`` (= upstream gradient / N), 0 where not
    ``valid``. Cosine: ``L = 1 - <o,st> / (max(|o|,eps) max(|st|,eps))``, a clamped norm
    being constant."""
    o = tl.where(valid, o, 0.0)
    if LOSS == 1:
        go = 2.0 * scale * (o - st)
        go = tl.where(valid, go, 0.0)
        return go, -go
    else:
        dp = tl.sum(o * st, axis=2)
        on = tl.sqrt(tl.sum(o * o, axis=2))
        sn = tl.sqrt(tl.sum(st * st, axis=2))
        no = tl.maximum(on, 1e-8)
        ns = tl.maximum(sn, 1e-8)
        inv = 1.0 / (no * ns)
        cosv = dp * inv
        co = tl.where(on > 1e-8, cosv / (no * no), 0.0)
        cs = tl.where(sn > 1e-8, cosv / (ns * ns), 0.0)
        go = -scale * (st * inv[:, :, None] - co[:, :, None] * o)
        gs = -scale * (o * inv[:, :, None] - cs[:, :, None] * st)
        return tl.where(valid, go, 0.0), tl.where(valid, gs, 0.0)


@triton.jit
def _store_rows(base, rows, cols, values, Dt, Ds, BLOCK_K: tl.constexpr):
    """Store a [BLOCK_K, BLOCK_DS] grad_dim_proj chunk at ``base`` (a ``[Dt, Ds]`` matrix)."""
    tl.store(
        base + rows[:, None] * Ds + cols[None, :],
        values,
        mask=(rows[:, None] < Dt) & (cols[None, :] < Ds),
    )


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


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
    ACC_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """``out[g, b, s, t] = sum_h M[g,s,h] (sum_k w_k kv[g][b, h, idx_k]) @ P[g](,h) + bias[g, s]``.

    Program (c, g) computes the output tiles ``[Hs, BLOCK_T, Ds]`` of its work items in
    registers (module docstring) and stores them in kv's dtype."""
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    x_g = _group_ptr(kv_table, g, kv_ptr, ALIGNED)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < Hs
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    ds_mask = ecol < Ds
    mix_g = mix_ptr + g * Hs * Ht
    bias_g = bias_ptr + g * Hs * Ds
    if PER_HEAD:
        proj_g = proj_ptr + g * Ht * Dt * Ds
    else:
        proj_g = proj_ptr + g * Dt * Ds
    tiles = tl.cdiv(Ts, BLOCK_T)
    lo, hi = _item_range(c, chunks, B * tiles)
    for item in range(lo, hi):
        b = item // tiles
        t = (item - b * tiles) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        t_mask = t < Ts
        start, length, steps = _rows(ptr_ptr, t, t_mask)
        o = _project_tile(
            x_g + b * Ht * Tt * Dt,
            mix_g,
            proj_g,
            bias_g,
            idx_ptr,
            w_ptr,
            start,
            length,
            steps,
            t_mask,
            s,
            s_mask,
            ecol,
            ds_mask,
            Ht,
            Tt,
            Dt,
            Ds,
            PER_HEAD,
            HAS_BIAS,
            ACC_FP64,
            USE_DOT,
            DOT_MODE,
            BLOCK_S,
            BLOCK_T,
            BLOCK_K,
            NUM_K,
            BLOCK_DS,
        )
        offs = ((g * B + b) * Hs + s[:, None, None]) * Ts + t[None, :, None]
        valid = s_mask[:, None, None] & t_mask[None, :, None] & ds_mask[None, None, :]
        tl.store(
            out_ptr + offs * Ds + ecol[None, None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=valid,
        )


@triton.jit
def kv_distill_fwd_kernel(
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
    ALIGNED: tl.constexpr,
    ACC_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """``part[g, c]`` = the sum of group g's loss terms (LOSS 1: squared errors, 2:
    ``1 - cos`` per row) over the work items of chunk c, in float64: each output tile is
    recomputed in registers and compared with the student tile, never stored."""
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    x_g = _group_ptr(kv_table, g, kv_ptr, ALIGNED)
    st_g = _group_ptr(st_table, g, st_ptr, ALIGNED)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < Hs
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    ds_mask = ecol < Ds
    mix_g = mix_ptr + g * Hs * Ht
    bias_g = bias_ptr + g * Hs * Ds
    if PER_HEAD:
        proj_g = proj_ptr + g * Ht * Dt * Ds
    else:
        proj_g = proj_ptr + g * Dt * Ds
    total = tl.zeros([1], dtype=tl.float64)
    tiles = tl.cdiv(Ts, BLOCK_T)
    lo, hi = _item_range(c, chunks, B * tiles)
    for item in range(lo, hi):
        b = item // tiles
        t = (item - b * tiles) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        t_mask = t < Ts
        start, length, steps = _rows(ptr_ptr, t, t_mask)
        o = _project_tile(
            x_g + b * Ht * Tt * Dt,
            mix_g,
            proj_g,
            bias_g,
            idx_ptr,
            w_ptr,
            start,
            length,
            steps,
            t_mask,
            s,
            s_mask,
            ecol,
            ds_mask,
            Ht,
            Tt,
            Dt,
            Ds,
            PER_HEAD,
            HAS_BIAS,
            ACC_FP64,
            USE_DOT,
            DOT_MODE,
            BLOCK_S,
            BLOCK_T,
            BLOCK_K,
            NUM_K,
            BLOCK_DS,
        )
        row_valid = s_mask[:, None] & t_mask[None, :]
        valid = row_valid[:, :, None] & ds_mask[None, None, :]
        rows = (b * Hs + s[:, None, None]) * Ts + t[None, :, None]
        st = tl.load(st_g + rows * Ds + ecol[None, None, :], mask=valid, other=0.0)
        total += _distill_sum(o, st.to(acc_dtype), valid, row_valid, LOSS).to(tl.float64)
    tl.store(part_ptr + g * chunks + c + tl.arange(0, 1), total)


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
    NEED_MID: tl.constexpr,
    ALIGNED: tl.constexpr,
    ACC_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_MODE: tl.constexpr,
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
    """
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    x_g = _group_ptr(kv_table, g, kv_ptr, ALIGNED)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < Hs
    hcol = tl.arange(0, BLOCK_H).to(tl.int64)
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    ds_mask = ecol < Ds
    mix_g = mix_ptr + g * Hs * Ht
    bias_g = bias_ptr + g * Hs * Ds
    if PER_HEAD:
        proj_g = proj_ptr + g * Ht * Dt * Ds
    else:
        proj_g = proj_ptr + g * Dt * Ds
    if LOSS != 0:
        st_g = _group_ptr(st_table, g, st_ptr, ALIGNED)
        gst_g = _group_ptr(gst_table, g, gst_ptr, ALIGNED)
        scale = tl.load(scale_ptr + g).to(acc_dtype)
    gm = tl.zeros([BLOCK_S, BLOCK_H], dtype=acc_dtype)
    gb = tl.zeros([BLOCK_S, BLOCK_DS], dtype=acc_dtype)
    gp0 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp1 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp2 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp3 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    tiles = tl.cdiv(Ts, BLOCK_T)
    lo, hi = _item_range(c, chunks, B * tiles)
    for item in range(lo, hi):
        b = item // tiles
        t = (item - b * tiles) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        t_mask = t < Ts
        start, length, steps = _rows(ptr_ptr, t, t_mask)
        x_b = x_g + b * Ht * Tt * Dt
        row_valid = s_mask[:, None] & t_mask[None, :]
        valid = row_valid[:, :, None] & ds_mask[None, None, :]
        # Rows [b, s, t] of a [.., B, Hs, Ts, *] tensor, from group g's start.
        rows_bst = (b * Hs + s[:, None, None]) * Ts + t[None, :, None]
        tile_offs = rows_bst * Ds + ecol[None, None, :]
        if LOSS == 0:
            gt = tl.load(go_ptr + g * B * Hs * Ts * Ds + tile_offs, mask=valid, other=0.0)
            gt = gt.to(acc_dtype)
        else:
            o = _project_tile(
                x_b,
                mix_g,
                proj_g,
                bias_g,
                idx_ptr,
                w_ptr,
                start,
                length,
                steps,
                t_mask,
                s,
                s_mask,
                ecol,
                ds_mask,
                Ht,
                Tt,
                Dt,
                Ds,
                PER_HEAD,
                HAS_BIAS,
                ACC_FP64,
                USE_DOT,
                DOT_MODE,
                BLOCK_S,
                BLOCK_T,
                BLOCK_K,
                NUM_K,
                BLOCK_DS,
            )
            st = tl.load(st_g + tile_offs, mask=valid, other=0.0).to(acc_dtype)
            gt, gs = _distill_grad(o, st, valid, scale, LOSS)
            tl.store(
                gst_g + tile_offs,
                gs.to(gst_ptr.dtype.element_ty),
                mask=valid,
            )
        if HAS_BIAS:
            gb += tl.sum(gt, axis=1)
        if PER_HEAD:
            for h in range(0, Ht):
                hh = tl.cast(h, tl.int64)
                y = tl.zeros([BLOCK_T, BLOCK_DS], dtype=acc_dtype)
                for kc in range(0, NUM_K):
                    dcol, dt_mask = _k_cols(kc, Dt, BLOCK_K)
                    xr = _resample(
                        x_b + hh * Tt * Dt,
                        idx_ptr,
                        w_ptr,
                        start,
                        length,
                        steps,
                        t_mask,
                        dcol,
                        dt_mask,
                        Dt,
                        ACC_FP64,
                        BLOCK_T,
                        BLOCK_K,
                    )
                    pk = _load_proj(
                        proj_g + hh * Dt * Ds, dcol, dt_mask, ecol, ds_mask, Ds, ACC_FP64, DOT_MODE
                    )
                    y = _mm(y, xr, pk, USE_DOT, ACC_FP64, DOT_MODE)
                part = tl.sum(tl.sum(gt * y[None, :, :], axis=2), axis=1)
                gm += tl.where(hcol[None, :] == hh, part[:, None], 0.0)
                m = tl.load(mix_g + s * Ht + hh, mask=s_mask, other=0.0).to(acc_dtype)
                dy = tl.sum(m[:, None, None] * gt, axis=0)
                tl.store(
                    mid_ptr + (((g * B + b) * Ht + hh) * Ts + t[:, None]) * Ds + ecol[None, :],
                    dy,
                    mask=t_mask[:, None] & ds_mask[None, :],
                )
        else:
            g2 = tl.reshape(gt, [BLOCK_S * BLOCK_T, BLOCK_DS])
            for kc in tl.static_range(NUM_K):
                dcol, dt_mask = _k_cols(kc, Dt, BLOCK_K)
                pk = _load_proj(proj_g, dcol, dt_mask, ecol, ds_mask, Ds, ACC_FP64, DOT_MODE)
                dz = tl.zeros([BLOCK_S * BLOCK_T, BLOCK_K], dtype=acc_dtype)
                dz = tl.reshape(
                    _mm(dz, g2, tl.trans(pk), USE_DOT, ACC_FP64, DOT_MODE),
                    [BLOCK_S, BLOCK_T, BLOCK_K],
                )
                z = tl.zeros([BLOCK_S, BLOCK_T, BLOCK_K], dtype=acc_dtype)
                for h in range(0, Ht):
                    hh = tl.cast(h, tl.int64)
                    xr, z = _mix_head(
                        z,
                        x_b,
                        hh,
                        mix_g,
                        idx_ptr,
                        w_ptr,
                        start,
                        length,
                        steps,
                        t_mask,
                        s,
                        s_mask,
                        dcol,
                        dt_mask,
                        Ht,
                        Tt,
                        Dt,
                        ACC_FP64,
                        BLOCK_T,
                        BLOCK_K,
                    )
                    part = tl.sum(tl.sum(dz * xr[None, :, :], axis=2), axis=1)
                    gm += tl.where(hcol[None, :] == hh, part[:, None], 0.0)
                d = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
                d = _mm(
                    d,
                    tl.trans(tl.reshape(z, [BLOCK_S * BLOCK_T, BLOCK_K])),
                    g2,
                    USE_DOT,
                    ACC_FP64,
                    DOT_MODE,
                )
                if kc == 0:
                    gp0 += d
                elif kc == 1:
                    gp1 += d
                elif kc == 2:
                    gp2 += d
                else:
                    gp3 += d
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
        base = gp_part + unit * Dt * Ds
        krow = tl.arange(0, BLOCK_K).to(tl.int64)
        _store_rows(base, krow, ecol, gp0, Dt, Ds, BLOCK_K)
        if NUM_K > 1:
            _store_rows(base, BLOCK_K + krow, ecol, gp1, Dt, Ds, BLOCK_K)
        if NUM_K > 2:
            _store_rows(base, 2 * BLOCK_K + krow, ecol, gp2, Dt, Ds, BLOCK_K)
        if NUM_K > 3:
            _store_rows(base, 3 * BLOCK_K + krow, ecol, gp3, Dt, Ds, BLOCK_K)


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
    B,
    Ht,
    Tt,
    Dt,
    Hs,
    Ts,
    chunks,
    ALIGNED: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    """Shared P: ``grad_kv[g, b, h, j] = sum_s M[g,s,h] A[s, j]`` with
    ``A[s, j] = sum_{k in row j} w[t_edge[k]] dZ[g, b, s, t_col[k]]`` (the transposed rows,
    in their fixed order: deterministic). Program (c, g) owns tiles of BLOCK_J teacher
    steps x every head; grad_kv (G tensors ``[B, Ht, Tt, Dt]``, address table ``gkv``) in
    kv's dtype."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < Hs
    dcol = tl.arange(0, BLOCK_DT).to(tl.int64)
    dt_mask = dcol < Dt
    mix_g = mix_ptr + g * Hs * Ht
    gkv_g = _group_ptr(gkv_table, g, gkv_ptr, ALIGNED)
    tiles = tl.cdiv(Tt, BLOCK_J)
    lo, hi = _item_range(c, chunks, B * tiles)
    for item in range(lo, hi):
        b = item // tiles
        j = (item - b * tiles) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
        j_mask = j < Tt
        start, length, steps = _rows(t_ptr_ptr, j, j_mask)
        mid_b = mid_ptr + (g * B + b) * Hs * Ts * Dt
        a = tl.zeros([BLOCK_S, BLOCK_J, BLOCK_DT], dtype=acc_dtype)
        for i in range(0, steps):
            live = j_mask & (i < length)
            step = tl.load(t_col_ptr + start + i, mask=live, other=0)
            edge = tl.load(t_edge_ptr + start + i, mask=live, other=0)
            w = tl.load(w_ptr + edge, mask=live, other=0.0).to(acc_dtype)
            values = tl.load(
                mid_b + (s[:, None, None] * Ts + step[None, :, None]) * Dt + dcol[None, None, :],
                mask=s_mask[:, None, None] & live[None, :, None] & dt_mask[None, None, :],
                other=0.0,
            ).to(acc_dtype)
            a += w[None, :, None] * values
        out_mask = j_mask[:, None] & dt_mask[None, :]
        for h in range(0, Ht):
            hh = tl.cast(h, tl.int64)
            m = tl.load(mix_g + s * Ht + hh, mask=s_mask, other=0.0).to(acc_dtype)
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
    B,
    Ht,
    Tt,
    Dt,
    Ts,
    Ds,
    chunks,
    NEED_KV: tl.constexpr,
    ALIGNED: tl.constexpr,
    ACC_FP64: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """Per-head P, program (c, h, g) over tiles of BLOCK_J teacher steps of head h:
    ``A[j] = sum_{k in row j} w[t_edge[k]] dY[g, b, h, t_col[k]]`` (transposed rows, fixed
    order), then ``grad_kv[g, b, h, j] = A[j] @ P[g,h]^T`` (NEED_KV) and
    ``gp_part[g, c, h] += x[g][b, h, j]^T A[j]`` (x read in place, no gather), one
    accumulator per Dt chunk, stored once."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    x_g = _group_ptr(kv_table, g, kv_ptr, ALIGNED)
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    ds_mask = ecol < Ds
    proj_h = proj_ptr + (g * Ht + h) * Dt * Ds
    if NEED_KV:
        gkv_g = _group_ptr(gkv_table, g, gkv_ptr, ALIGNED)
    gp0 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp1 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp2 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    gp3 = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
    tiles = tl.cdiv(Tt, BLOCK_J)
    lo, hi = _item_range(c, chunks, B * tiles)
    for item in range(lo, hi):
        b = item // tiles
        j = (item - b * tiles) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
        j_mask = j < Tt
        start, length, steps = _rows(t_ptr_ptr, j, j_mask)
        mid_bh = mid_ptr + ((g * B + b) * Ht + h) * Ts * Ds
        a = tl.zeros([BLOCK_J, BLOCK_DS], dtype=acc_dtype)
        for i in range(0, steps):
            live = j_mask & (i < length)
            step = tl.load(t_col_ptr + start + i, mask=live, other=0)
            edge = tl.load(t_edge_ptr + start + i, mask=live, other=0)
            w = tl.load(w_ptr + edge, mask=live, other=0.0).to(acc_dtype)
            values = tl.load(
                mid_bh + step[:, None] * Ds + ecol[None, :],
                mask=live[:, None] & ds_mask[None, :],
                other=0.0,
            ).to(acc_dtype)
            a += w[:, None] * values
        x_bh = x_g + (b * Ht + h) * Tt * Dt
        for kc in tl.static_range(NUM_K):
            dcol, dt_mask = _k_cols(kc, Dt, BLOCK_K)
            rows = j[:, None] * Dt + dcol[None, :]
            rows_mask = j_mask[:, None] & dt_mask[None, :]
            if NEED_KV:
                pk = _load_proj(proj_h, dcol, dt_mask, ecol, ds_mask, Ds, ACC_FP64, DOT_MODE)
                gk = tl.zeros([BLOCK_J, BLOCK_K], dtype=acc_dtype)
                gk = _mm(gk, a, tl.trans(pk), USE_DOT, ACC_FP64, DOT_MODE)
                tl.store(
                    gkv_g + (b * Ht + h) * Tt * Dt + rows,
                    gk.to(gkv_ptr.dtype.element_ty),
                    mask=rows_mask,
                )
            x = tl.load(x_bh + rows, mask=rows_mask, other=0.0).to(acc_dtype)
            d = tl.zeros([BLOCK_K, BLOCK_DS], dtype=acc_dtype)
            d = _mm(d, tl.trans(x), a, USE_DOT, ACC_FP64, DOT_MODE)
            if kc == 0:
                gp0 += d
            elif kc == 1:
                gp1 += d
            elif kc == 2:
                gp2 += d
            else:
                gp3 += d
    base = gp_part + ((g * chunks + c) * Ht + h) * Dt * Ds
    krow = tl.arange(0, BLOCK_K).to(tl.int64)
    _store_rows(base, krow, ecol, gp0, Dt, Ds, BLOCK_K)
    if NUM_K > 1:
        _store_rows(base, BLOCK_K + krow, ecol, gp1, Dt, Ds, BLOCK_K)
    if NUM_K > 2:
        _store_rows(base, 2 * BLOCK_K + krow, ecol, gp2, Dt, Ds, BLOCK_K)
    if NUM_K > 3:
        _store_rows(base, 3 * BLOCK_K + krow, ecol, gp3, Dt, Ds, BLOCK_K)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


class _Geometry:
    """Shapes, accumulation settings and tile sizes of one call."""

    def __init__(self, kv, head_mix, dim_proj, ptr):
        self.G = len(kv)
        self.B, self.Ht, self.Tt, self.Dt = kv[0].shape
        self.Hs = head_mix.shape[1]
        self.Ts = ptr.numel() - 1
        self.Ds = dim_proj.shape[-1]
        self.per_head = dim_proj.dim() == 4
        dtype = kv[0].dtype
        self.fp64 = dtype == torch.float64
        self.acc = torch.float64 if self.fp64 else torch.float32
        self.use_dot = not self.fp64
        # float32: exact fp32 products; half kv: half operands (kv's type), fp32
        # accumulation.
        self.dot_mode = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "ieee")
        self.tile = TILE_FP64 if self.fp64 else TILE
        self.block_s = triton.next_power_of_2(max(self.Hs, 1))
        self.block_h = triton.next_power_of_2(max(self.Ht, 1))
        self.block_dt = max(16, triton.next_power_of_2(max(self.Dt, 1)))
        self.block_ds = max(16, triton.next_power_of_2(max(self.Ds, 1)))
        # Dt in NUM_K chunks of BLOCK_K columns: a P chunk [BLOCK_K, Ds] within PROJ_TILE.
        k_cap = max(16, PROJ_TILE // self.block_ds)
        self.block_k = min(self.block_dt, 1 << (k_cap.bit_length() - 1))
        self.num_k = triton.cdiv(self.block_dt, self.block_k)
        if self.num_k > MAX_K_CHUNKS:
            raise NotImplementedError(
                f"kv_project (triton): teacher head_dim {self.Dt} with student head_dim "
                f"{self.Ds} needs {self.num_k} chunks of {self.block_k} columns; at most "
                f"{MAX_K_CHUNKS} are supported"
            )
        if self.per_head:
            # [BLOCK_S, BLOCK_T, Ds] tiles; tl.dot rows: BLOCK_T >= 16.
            self.block_t = self._rows(self.block_s * self.block_ds, self.Ts, 16)
        else:
            # [BLOCK_S, BLOCK_T, BLOCK_K | Ds] tiles; tl.dot rows: BLOCK_S * BLOCK_T >= 16.
            width = max(self.block_k, self.block_ds)
            self.block_t = self._rows(self.block_s * width, self.Ts, max(1, 16 // self.block_s))
        self.tiles = triton.cdiv(self.Ts, self.block_t)
        self.items = self.B * self.tiles
        self.chunks = chunks_for(self.items, self.G)

    def _rows(self, per_row: int, steps: int, least: int) -> int:
        """A power-of-two row count: per_row elements a row within the tile, at most 64
        and the steps rounded up, at least ``least``."""
        rows = max(1, self.tile // per_row)
        rows = 1 << (rows.bit_length() - 1)
        rows = min(rows, 64, triton.next_power_of_2(max(steps, 1)))
        return max(rows, least)

    def common(self) -> dict:
        """The constexprs every projecting kernel takes."""
        return dict(
            ACC_FP64=self.fp64,
            USE_DOT=self.use_dot,
            DOT_MODE=self.dot_mode,
            BLOCK_K=self.block_k,
            NUM_K=self.num_k,
            BLOCK_DS=self.block_ds,
        )


def chunks_for(items: int, groups: int) -> int:
    """Programs per group of the chunked grids: a function of the shapes only."""
    return max(1, min(items, triton.cdiv(PROGRAMS, max(groups, 1))))


def _address_table(tensors) -> tuple[torch.Tensor, bool]:
    """The int64 addresses of ``tensors`` on their device, and whether all are 16-byte
    aligned."""
    addrs = [t.data_ptr() for t in tensors]
    table = torch.tensor(addrs, dtype=torch.int64, device=tensors[0].device)
    return table, all(a % 16 == 0 for a in addrs)


def kv_project_fwd(
    kv: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    max_row: int,
) -> torch.Tensor:
    """fastcore::kv_project: ``[G, B, Hs, Ts, Ds]`` in kv's dtype. ``max_row`` (the longest
    row) is part of the contract; the kernels loop to each tile's own longest row."""
    geo = _Geometry(kv, head_mix, dim_proj, ptr)
    out = torch.empty(
        (geo.G, geo.B, geo.Hs, geo.Ts, geo.Ds), dtype=kv[0].dtype, device=kv[0].device
    )
    if out.numel() == 0:
        return out
    table, aligned = _address_table(kv)
    mix = head_mix.contiguous()
    kv_project_fwd_kernel[(geo.chunks, geo.G)](
        table,
        kv[0],
        mix,
        dim_proj.contiguous(),
        mix if bias is None else bias.contiguous(),
        ptr.contiguous(),
        idx.contiguous(),
        weight.contiguous(),
        out,
        geo.B,
        geo.Ht,
        geo.Tt,
        geo.Dt,
        geo.Hs,
        geo.Ts,
        geo.Ds,
        geo.chunks,
        PER_HEAD=geo.per_head,
        HAS_BIAS=bias is not None,
        ALIGNED=aligned,
        BLOCK_S=geo.block_s,
        BLOCK_T=geo.block_t,
        num_warps=8,
        **geo.common(),
    )
    return out


def _loss_count(geo: _Geometry, loss: str) -> int:
    """N of a group's mean: every element (mse) or every row (cosine)."""
    rows = geo.B * geo.Hs * geo.Ts
    return rows * geo.Ds if loss == "mse" else rows


def kv_distill_fwd(
    kv: list[torch.Tensor],
    student: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    max_row: int,
    loss: str,
) -> torch.Tensor:
    """fastcore::kv_distill_loss: the per-group losses ``[G]`` (float32; float64 for
    float64 kv), each output tile recomputed and compared in registers; per-program
    float64 partial sums, then ``torch.sum``. An empty cache gives 0."""
    geo = _Geometry(kv, head_mix, dim_proj, ptr)
    count = _loss_count(geo, loss)
    if count == 0:
        return torch.zeros(geo.G, dtype=geo.acc, device=kv[0].device)
    part = torch.empty((geo.G, geo.chunks), dtype=torch.float64, device=kv[0].device)
    kv_table, kv_aligned = _address_table(kv)
    st_table, st_aligned = _address_table(student)
    mix = head_mix.contiguous()
    kv_distill_fwd_kernel[(geo.chunks, geo.G)](
        kv_table,
        kv[0],
        st_table,
        student[0],
        mix,
        dim_proj.contiguous(),
        mix if bias is None else bias.contiguous(),
        ptr.contiguous(),
        idx.contiguous(),
        weight.contiguous(),
        part,
        geo.B,
        geo.Ht,
        geo.Tt,
        geo.Dt,
        geo.Hs,
        geo.Ts,
        geo.Ds,
        geo.chunks,
        LOSS=LOSS_CODES[loss],
        PER_HEAD=geo.per_head,
        HAS_BIAS=bias is not None,
        ALIGNED=kv_aligned and st_aligned,
        BLOCK_S=geo.block_s,
        BLOCK_T=geo.block_t,
        num_warps=8,
        **geo.common(),
    )
    return (part.sum(1) / count).to(geo.acc)


def kv_project_bwd(
    grad_out: torch.Tensor | None,
    kv: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
    t_max_row: int,
    max_row: int,
    need_kv: bool,
    student: list[torch.Tensor] | None = None,
    loss_grad: torch.Tensor | None = None,
    loss: str = "",
) -> tuple[
    list[torch.Tensor] | None,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    list[torch.Tensor] | None,
]:
    """The backward of kv_project (``grad_out [G, B, Hs, Ts, Ds]``) or of kv_distill_loss
    (``grad_out`` None; ``student`` groups, ``loss_grad [G]``, ``loss`` "mse"/"cosine").

    Returns ``(grad_kv, grad_head_mix, grad_dim_proj, grad_bias, grad_student)``: grad_kv G
    tensors in kv's dtype when ``need_kv`` else None; parameter gradients in float32
    (float64 for float64 kv), grad_bias None without bias; grad_student G tensors in the
    student's dtype for a loss, else None. Deterministic (no atomics; per-program partial
    sums reduced by ``torch.sum``). ``max_row`` / ``t_max_row`` are part of the contract;
    the kernels loop to each tile's own longest row."""
    geo = _Geometry(kv, head_mix, dim_proj, ptr)
    G, B, Ht, Tt, Dt, Hs, Ts, Ds = geo.G, geo.B, geo.Ht, geo.Tt, geo.Dt, geo.Hs, geo.Ts, geo.Ds
    device, acc = kv[0].device, geo.acc
    code = 0 if grad_out is not None else LOSS_CODES[loss]
    chunks = geo.chunks
    gm_part = torch.empty((G, chunks, Hs, Ht), dtype=acc, device=device)
    gb_part = (
        torch.empty((G, chunks, Hs, Ds), dtype=acc, device=device) if bias is not None else gm_part
    )
    gp_part = (
        gm_part if geo.per_head else torch.empty((G, chunks, Dt, Ds), dtype=acc, device=device)
    )
    need_mid = geo.per_head or need_kv
    if not need_mid:
        mid = gm_part
    elif geo.per_head:
        mid = torch.empty((G, B, Ht, Ts, Ds), dtype=acc, device=device)
    else:
        mid = torch.empty((G, B, Hs, Ts, Dt), dtype=acc, device=device)
    kv_table, aligned = _address_table(kv)
    if code:
        st_table, st_aligned = _address_table(student)
        aligned = aligned and st_aligned
        st_first = student[0]
        grad_student = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in student]
        gst_table, gst_aligned = _address_table(grad_student)
        aligned = aligned and gst_aligned
        gst_first = grad_student[0]
        scale = (
            loss_grad.to(device=device, dtype=acc) / max(_loss_count(geo, loss), 1)
        ).contiguous()
        go = gm_part
    else:
        st_table, st_first, scale = kv_table, kv[0], gm_part
        gst_table, gst_first, grad_student = kv_table, gm_part, None
        go = grad_out.contiguous()
    mix = head_mix.contiguous()
    proj = dim_proj.contiguous()
    w = weight.contiguous()
    kv_project_bwd_kernel[(chunks, G)](
        kv_table,
        kv[0],
        st_table,
        st_first,
        go,
        scale,
        mix,
        proj,
        mix if bias is None else bias.contiguous(),
        ptr.contiguous(),
        idx.contiguous(),
        w,
        gst_table,
        gst_first,
        mid,
        gm_part,
        gp_part,
        gb_part,
        B,
        Ht,
        Tt,
        Dt,
        Hs,
        Ts,
        Ds,
        chunks,
        LOSS=code,
        PER_HEAD=geo.per_head,
        HAS_BIAS=bias is not None,
        NEED_MID=need_mid,
        ALIGNED=aligned,
        BLOCK_S=geo.block_s,
        BLOCK_H=geo.block_h,
        BLOCK_T=geo.block_t,
        num_warps=8,
        **geo.common(),
    )
    grad_kv = None
    gkv_table, gkv_first = kv_table, gm_part
    if need_kv:
        grad_kv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in kv]
        gkv_table, gkv_aligned = _address_table(grad_kv)
        aligned = aligned and gkv_aligned
        gkv_first = grad_kv[0]
    t_ptr, t_col, t_edge = t_ptr.contiguous(), t_col.contiguous(), t_edge.contiguous()
    if geo.per_head:
        # [BLOCK_J, Dt | Ds] tiles; tl.dot rows (and reduction): BLOCK_J >= 16.
        block_j = geo._rows(max(geo.block_k, geo.block_ds), Tt, 16)
        chunks_j = chunks_for(B * triton.cdiv(Tt, block_j), G * Ht)
        gp_part = torch.empty((G, chunks_j, Ht, Dt, Ds), dtype=acc, device=device)
        if gp_part.numel():
            kv_project_bwd_proj_kernel[(chunks_j, Ht, G)](
                kv_table,
                kv[0],
                mid,
                proj,
                w,
                t_ptr,
                t_col,
                t_edge,
                gkv_table,
                gkv_first,
                gp_part,
                B,
                Ht,
                Tt,
                Dt,
                Ts,
                Ds,
                chunks_j,
                NEED_KV=need_kv,
                ALIGNED=aligned,
                BLOCK_J=block_j,
                num_warps=8,
                **geo.common(),
            )
    elif need_kv and grad_kv[0].numel():
        block_j = geo._rows(geo.block_s * geo.block_dt, Tt, 1)
        chunks_j = chunks_for(B * triton.cdiv(Tt, block_j), G)
        kv_project_bwd_kv_kernel[(chunks_j, G)](
            mid,
            mix,
            w,
            t_ptr,
            t_col,
            t_edge,
            gkv_table,
            gkv_first,
            B,
            Ht,
            Tt,
            Dt,
            Hs,
            Ts,
            chunks_j,
            ALIGNED=aligned,
            ACC_FP64=geo.fp64,
            BLOCK_S=geo.block_s,
            BLOCK_J=block_j,
            BLOCK_DT=geo.block_dt,
            num_warps=8,
        )
    grad_mix = gm_part.sum(1)
    grad_proj = gp_part.sum(1).view(dim_proj.shape)
    grad_bias = gb_part.sum(1) if bias is not None else None
    return (
        grad_kv,
        grad_mix,
        grad_proj,
        grad_bias,
        grad_student,
    )
