"""The @triton.jit pieces of the kv_project kernels (kv_project_fwd.py, kv_project_bwd.py):
program setup, CSR row tiles, resampling, the projected output tile and the loss terms.
The algorithm is described in kv_project.py (the launchers).

``MODE`` (a constexpr string) sets the arithmetic of a call: ``"fp64"`` (float64 kv:
float64 accumulation, products by broadcast multiply-and-sum, since ``tl.dot`` has no
float64 on older GPU backends), ``"ieee"`` (float32 kv: exact fp32 ``tl.dot``), ``"bf16"`` /
``"fp16"`` (half kv: ``tl.dot`` on half operands, fp32 accumulation).

A row tile is ``(src, w, length, steps)``: per lane (student or teacher step) the pointers
to its CSR entries' column indices and weights, its row length (0 for a masked lane) and
the tile's longest row. Address arithmetic is int64 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------
# Program setup
# ----------------------------------------------------------------------------------------


@triton.jit
def group_ptr(table_ptr, g, like_ptr, ALIGNED: tl.constexpr):
    """Group g's base pointer, from the int64 address table, typed as ``like_ptr``."""
    addr = tl.load(table_ptr + g)
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
    return addr.to(tl.pointer_type(like_ptr.dtype.element_ty))


@triton.jit
def group_setup(
    kv_table,
    kv_ptr,
    mix_ptr,
    proj_ptr,
    bias_ptr,
    Ht,
    Dt,
    Hs,
    Ds,
    PER_HEAD: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Program (c, g)'s group: ``g`` and group g's kv, head_mix, dim_proj and bias bases."""
    g = tl.program_id(1).to(tl.int64)
    x_g = group_ptr(kv_table, g, kv_ptr, ALIGNED)
    mix_g = mix_ptr + g * Hs * Ht
    bias_g = bias_ptr + g * Hs * Ds
    if PER_HEAD:
        proj_g = proj_ptr + g * Ht * Dt * Ds
    else:
        proj_g = proj_ptr + g * Dt * Ds
    return g, x_g, mix_g, proj_g, bias_g


@triton.jit
def chunk_items(chunks, B, steps, BLOCK: tl.constexpr):
    """Program c's work items ``[lo, hi)`` (int64) of the ``B x tiles`` items (tiles of
    BLOCK of ``steps``): the fixed range ``[items * c / chunks, items * (c + 1) / chunks)``.
    Returns ``(c, tiles, lo, hi)``."""
    c = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(steps, BLOCK)
    items = B * tiles
    return c, tiles, items * c // chunks, items * (c + 1) // chunks


@triton.jit
def tile_rows(item, tiles, ptr_ptr, ptr_stride, src_ptr, w_ptr, steps, BLOCK: tl.constexpr):
    """Work item -> ``(b, t, t_mask, src, w, length, longest)``: its batch row, its BLOCK
    steps (and mask) and their CSR row tile (``ptr``/``src``/``w``: the rows' offsets and
    the entries' two columns). ``ptr_stride``: 0 for rows shared by the batch, ``steps + 1``
    for per-example rows (``ptr [B, steps+1]`` with global offsets)."""
    b = item // tiles
    t = (item - b * tiles) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    t_mask = t < steps
    ptr_b = ptr_ptr + b * ptr_stride
    start = tl.load(ptr_b + t, mask=t_mask, other=0)
    length = tl.load(ptr_b + t + 1, mask=t_mask, other=0) - start
    return b, t, t_mask, src_ptr + start, w_ptr + start, length, tl.max(length, axis=0)


@triton.jit
def live_rows(mask_ptr, b, t, t_mask, length, steps, Ts, HAS_MASK: tl.constexpr):
    """The loss's row mask on a row tile: ``(live, length, longest)``, a masked row (mask
    ``[B, Ts]`` 0) dead and given no entries, so its teacher steps are never read."""
    if HAS_MASK:
        live = t_mask & (tl.load(mask_ptr + b * Ts + t, mask=t_mask, other=0) != 0)
        length = tl.where(live, length, 0)
        longest = tl.max(length, axis=0)
    else:
        live = t_mask
        longest = steps
    return live, length, longest


@triton.jit
def lanes(Hs, Ds, BLOCK_S: tl.constexpr, BLOCK_DS: tl.constexpr):
    """The student-head and Ds lanes of an output tile and their masks:
    ``(s, s_mask, ecol, ds_mask)`` (computed once per program, outside the item loop)."""
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    return s, s < Hs, ecol, ecol < Ds


@triton.jit
def out_tile(b, t, t_mask, s, s_mask, ds_mask, Hs, Ts):
    """Tile (b, t) of a ``[B, Hs, Ts, Ds]`` tensor: ``(rows, valid, row_valid)``, the row
    indices ``[BLOCK_S, BLOCK_T, 1]`` (element ``rows * Ds + ecol``) and the masks."""
    row_valid = s_mask[:, None] & t_mask[None, :]
    valid = row_valid[:, :, None] & ds_mask[None, None, :]
    rows = (b * Hs + s[:, None, None]) * Ts + t[None, :, None]
    return rows, valid, row_valid


# ----------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------


@triton.jit
def dot_operand(x, MODE: tl.constexpr):
    """``x`` as a matrix-product operand: kv's half type for "bf16" / "fp16", else the
    accumulation type."""
    if MODE == "bf16":
        return x.to(tl.bfloat16)
    elif MODE == "fp16":
        return x.to(tl.float16)
    elif MODE == "fp64":
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def mm(acc, a, b, MODE: tl.constexpr):
    """``acc + a @ b`` in acc's type: ``tl.dot`` (operands as :func:`dot_operand`; "ieee":
    exact fp32 products), or a broadcast multiply-and-sum for "fp64"."""
    if MODE == "fp64":
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        a = dot_operand(a, MODE)
        b = dot_operand(b, MODE)
        if MODE == "ieee":
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def k_cols(kc, Dt, BLOCK_K: tl.constexpr):
    """Columns of Dt chunk kc and their mask."""
    dcol = tl.cast(kc, tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    return dcol, dcol < Dt


@triton.jit
def resample(
    x_head,
    src,
    w,
    length,
    steps,
    col,
    col_mask,
    width,
    MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """``xr[t, :] = sum_k w[k] * x_head[src[k], col]`` over each row of the tile (a row
    tile), in CSR order (``x_head``: one teacher head ``[Tt, width]``) ->
    ``[BLOCK_T, BLOCK_W]``, 0 where masked."""
    acc_dtype = tl.float64 if MODE == "fp64" else tl.float32
    xr = tl.zeros([BLOCK_T, BLOCK_W], dtype=acc_dtype)
    # Loads in the tile's 2-D layout ([BLOCK_T, 1] columns): Triton 3.6 (sm_90) fails to
    # compile a 1-D masked load whose mask also feeds a 2-D one.
    for j in range(0, steps):
        live = (j < length)[:, None]
        step = tl.load((src + j)[:, None], mask=live, other=0)
        wj = tl.load((w + j)[:, None], mask=live, other=0.0).to(acc_dtype)
        values = tl.load(
            x_head + step * width + col[None, :], mask=live & col_mask[None, :], other=0.0
        ).to(acc_dtype)
        xr += wj * values
    return xr


@triton.jit
def mix_column(mix_g, h, Ht, Hs, MODE: tl.constexpr, BLOCK_S: tl.constexpr):
    """``M[:, h]`` of group g's head_mix ``[Hs, Ht]`` -> ``[BLOCK_S]`` (0-padded)."""
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    m = tl.load(mix_g + s * Ht + h, mask=s < Hs, other=0.0)
    return m.to(tl.float64 if MODE == "fp64" else tl.float32)


@triton.jit
def load_proj(proj_h, dcol, dt_mask, Ds, MODE: tl.constexpr, BLOCK_DS: tl.constexpr):
    """Rows dcol of one projection matrix ``[Dt, Ds]`` -> ``[BLOCK_K, BLOCK_DS]``
    (0-padded), as a matrix-product operand."""
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    p = tl.load(
        proj_h + dcol[:, None] * Ds + ecol[None, :],
        mask=dt_mask[:, None] & (ecol < Ds)[None, :],
        other=0.0,
    )
    return dot_operand(p, MODE)


# ----------------------------------------------------------------------------------------
# The projected output tile
# ----------------------------------------------------------------------------------------


@triton.jit
def head_projection(
    x_h,
    proj_h,
    src,
    w,
    length,
    steps,
    Dt,
    Ds,
    MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """Per-head P: ``Y = xr @ P_h`` ``[BLOCK_T, BLOCK_DS]`` of one teacher head ``x_h``
    ``[Tt, Dt]`` (resampled over the row tile), Dt in NUM_K chunks."""
    y = tl.zeros([BLOCK_T, BLOCK_DS], dtype=tl.float64 if MODE == "fp64" else tl.float32)
    for kc in range(0, NUM_K):
        dcol, dt_mask = k_cols(kc, Dt, BLOCK_K)
        xr = resample(x_h, src, w, length, steps, dcol, dt_mask, Dt, MODE, BLOCK_T, BLOCK_K)
        y = mm(y, xr, load_proj(proj_h, dcol, dt_mask, Ds, MODE, BLOCK_DS), MODE)
    return y


@triton.jit
def project_tile(
    x_b,
    mix_g,
    proj_g,
    bias_g,
    src,
    w,
    length,
    steps,
    Ht,
    Tt,
    Dt,
    Hs,
    Ds,
    PER_HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """The output tile ``[BLOCK_S, BLOCK_T, BLOCK_DS]`` of a row tile in the accumulation
    type, bias included (``x_b``: kv[g][b]; ``mix_g``, ``proj_g``, ``bias_g``: group g's).
    Shared P mixes the heads first (``Z[s] = sum_h M[s,h] xr[h]``, then ``Z @ P``)."""
    acc_dtype = tl.float64 if MODE == "fp64" else tl.float32
    if PER_HEAD:
        o = tl.zeros([BLOCK_S, BLOCK_T, BLOCK_DS], dtype=acc_dtype)
        for h in range(0, Ht):
            hh = tl.cast(h, tl.int64)
            y = head_projection(
                x_b + hh * Tt * Dt, proj_g + hh * Dt * Ds, src, w, length, steps, Dt, Ds,
                MODE, BLOCK_T, BLOCK_K, NUM_K, BLOCK_DS,
            )  # fmt: skip
            o += mix_column(mix_g, hh, Ht, Hs, MODE, BLOCK_S)[:, None, None] * y[None, :, :]
    else:
        o2 = tl.zeros([BLOCK_S * BLOCK_T, BLOCK_DS], dtype=acc_dtype)
        for kc in range(0, NUM_K):
            dcol, dt_mask = k_cols(kc, Dt, BLOCK_K)
            z = tl.zeros([BLOCK_S, BLOCK_T, BLOCK_K], dtype=acc_dtype)
            for h in range(0, Ht):
                hh = tl.cast(h, tl.int64)
                xr = resample(
                    x_b + hh * Tt * Dt, src, w, length, steps, dcol, dt_mask, Dt, MODE,
                    BLOCK_T, BLOCK_K,
                )  # fmt: skip
                z += mix_column(mix_g, hh, Ht, Hs, MODE, BLOCK_S)[:, None, None] * xr[None, :, :]
            pk = load_proj(proj_g, dcol, dt_mask, Ds, MODE, BLOCK_DS)
            o2 = mm(o2, tl.reshape(z, [BLOCK_S * BLOCK_T, BLOCK_K]), pk, MODE)
        o = tl.reshape(o2, [BLOCK_S, BLOCK_T, BLOCK_DS])
    if HAS_BIAS:
        s = tl.arange(0, BLOCK_S).to(tl.int64)
        ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
        bias = tl.load(
            bias_g + s[:, None] * Ds + ecol[None, :],
            mask=(s < Hs)[:, None] & (ecol < Ds)[None, :],
            other=0.0,
        ).to(acc_dtype)
        o += bias[:, None, :]
    return o


# ----------------------------------------------------------------------------------------
# Losses and gradient accumulators
# ----------------------------------------------------------------------------------------


@triton.jit
def distill_sum(o, st, valid, row_valid, LOSS: tl.constexpr):
    """A tile's loss terms, summed: ``(o - st)^2`` over elements (LOSS 1) or
    ``1 - cos(o, st)`` over rows (LOSS 2, each norm clamped below at 1e-8)."""
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
def distill_grad(o, st, valid, scale, LOSS: tl.constexpr):
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
def add_chunk(kc: tl.constexpr, d, gp0, gp1, gp2, gp3):
    """Add ``d`` to the grad_dim_proj accumulator of Dt chunk kc (a static index)."""
    if kc == 0:
        gp0 += d
    elif kc == 1:
        gp1 += d
    elif kc == 2:
        gp2 += d
    else:
        gp3 += d
    return gp0, gp1, gp2, gp3


@triton.jit
def store_rows(base, rows, cols, values, Dt, Ds):
    """Store a ``[BLOCK_K, BLOCK_DS]`` grad_dim_proj chunk at ``base`` (a ``[Dt, Ds]``
    matrix)."""
    tl.store(
        base + rows[:, None] * Ds + cols[None, :],
        values,
        mask=(rows[:, None] < Dt) & (cols[None, :] < Ds),
    )


@triton.jit
def store_chunks(
    base,
    gp0,
    gp1,
    gp2,
    gp3,
    Dt,
    Ds,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """Store the NUM_K grad_dim_proj chunk accumulators as one ``[Dt, Ds]`` matrix."""
    krow = tl.arange(0, BLOCK_K).to(tl.int64)
    ecol = tl.arange(0, BLOCK_DS).to(tl.int64)
    store_rows(base, krow, ecol, gp0, Dt, Ds)
    if NUM_K > 1:
        store_rows(base, BLOCK_K + krow, ecol, gp1, Dt, Ds)
    if NUM_K > 2:
        store_rows(base, 2 * BLOCK_K + krow, ecol, gp2, Dt, Ds)
    if NUM_K > 3:
        store_rows(base, 3 * BLOCK_K + krow, ecol, gp3, Dt, Ds)
