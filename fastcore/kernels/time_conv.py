"""Triton kernels of the depthwise convolution along time: ``time_conv`` (causal, or
anti-causal with ``REVERSE``) and its weight gradient.

``x`` is viewed as ``[outer, T, rows, C]`` (contiguous). A program owns a tile of
``BLOCK_R`` rows by ``BLOCK_C`` channels of one outer index and walks the T steps, so each
output element is written once and each weight vector is loaded per tap. The weight
gradient writes one ``(K, C)`` partial per program tile (rows reduced inside the tile);
the launcher adds the partials in tile order: deterministic, no atomics. Accumulation in
float32 (float64 for float64). The launchers trust their inputs: fastcore.ops validates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcore.kernels._tiles import MAX_PROGRAMS, TILE


@triton.jit
def _tile(tile, steps, rows, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program tile ``tile``: its channels (and their mask), the element mask, the offsets
    within one time step, the time-step stride and the base offset of its outer index."""
    row_tiles = tl.cdiv(rows, BLOCK_R)
    chan_tiles = tl.cdiv(channels, BLOCK_C)
    o = tl.cast(tile // (row_tiles * chan_tiles), tl.int64)
    rest = tile % (row_tiles * chan_tiles)
    row = (rest // chan_tiles) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    chan = (rest % chan_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    chan_mask = chan < channels
    mask = (row < rows)[:, None] & chan_mask[None, :]
    offset = row[:, None] * channels + chan[None, :]
    step = tl.cast(rows, tl.int64) * channels
    return chan, chan_mask, mask, offset, step, o * steps * step


@triton.jit
def time_conv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    outer,
    steps,
    rows,
    channels,
    taps,
    HAS_BIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    num_tiles = outer * tl.cdiv(rows, BLOCK_R) * tl.cdiv(channels, BLOCK_C)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        chan, chan_mask, mask, offset, step, base = _tile(
            tile, steps, rows, channels, BLOCK_R, BLOCK_C
        )
        if HAS_BIAS:
            bias = tl.load(b_ptr + chan, mask=chan_mask, other=0).to(acc_dtype)
        for t in range(steps):
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_dtype)
            if HAS_BIAS:
                acc += bias[None, :]
            for k in range(taps):
                if REVERSE:
                    s = t + k
                else:
                    s = t - k
                if (s >= 0) & (s < steps):
                    w = tl.load(w_ptr + k * channels + chan, mask=chan_mask, other=0)
                    xs = tl.load(x_ptr + base + s * step + offset, mask=mask, other=0)
                    acc += w.to(acc_dtype)[None, :] * xs.to(acc_dtype)
            tl.store(
                out_ptr + base + t * step + offset, acc.to(out_ptr.dtype.element_ty), mask=mask
            )


@triton.jit
def time_conv_weight_grad_kernel(
    g_ptr,
    x_ptr,
    part_ptr,
    outer,
    steps,
    rows,
    channels,
    taps,
    REVERSE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """part[tile, k, c] = sum over t and the tile's rows of g[o, t, r, c] x[o, t -+ k, r, c]."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    num_tiles = outer * tl.cdiv(rows, BLOCK_R) * tl.cdiv(channels, BLOCK_C)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        chan, chan_mask, mask, offset, step, base = _tile(
            tile, steps, rows, channels, BLOCK_R, BLOCK_C
        )
        part_row = tl.cast(tile, tl.int64) * taps * channels
        for k in range(taps):
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_dtype)
            for t in range(steps):
                if REVERSE:
                    s = t + k
                else:
                    s = t - k
                if (s >= 0) & (s < steps):
                    g = tl.load(g_ptr + base + t * step + offset, mask=mask, other=0)
                    xs = tl.load(x_ptr + base + s * step + offset, mask=mask, other=0)
                    acc += g.to(acc_dtype) * xs.to(acc_dtype)
            tl.store(part_ptr + part_row + k * channels + chan, tl.sum(acc, axis=0), mask=chan_mask)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    outer, steps, channels = x.shape[0], x.shape[1], x.shape[-1]
    rows = x.numel() // max(outer * steps * channels, 1)
    block_c = min(triton.next_power_of_2(max(channels, 1)), 256)
    block_r = max(1, min(TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    return outer, steps, rows, channels, block_r, block_c


def time_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool
) -> torch.Tensor:
    """``out[:, t] = bias + sum_k weight[k] x[:, t -+ k]`` over dim 1 of ``x (B, T, ..., C)``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    outer, steps, rows, channels, block_r, block_c = _geometry(x)
    tiles = outer * triton.cdiv(rows, block_r) * triton.cdiv(channels, block_c)
    time_conv_kernel[(min(tiles, MAX_PROGRAMS),)](
        x,
        weight.contiguous(),
        out if bias is None else bias.contiguous(),
        out,
        outer,
        steps,
        rows,
        channels,
        weight.shape[0],
        HAS_BIAS=bias is not None,
        REVERSE=reverse,
        ACC_FP64=x.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


def time_conv_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, kernel_size: int, reverse: bool
) -> torch.Tensor:
    """``out[k, c] = sum grad[:, t, ..., c] x[:, t -+ k, ..., c]``: ``(K, C)`` in x's dtype."""
    x = x.contiguous()
    grad = grad.contiguous()
    outer, steps, rows, channels, block_r, block_c = _geometry(x)
    if x.numel() == 0:
        return x.new_zeros(kernel_size, channels)
    tiles = outer * triton.cdiv(rows, block_r) * triton.cdiv(channels, block_c)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = torch.zeros(tiles, kernel_size, channels, dtype=acc, device=x.device)
    time_conv_weight_grad_kernel[(min(tiles, MAX_PROGRAMS),)](
        grad,
        x,
        parts,
        outer,
        steps,
        rows,
        channels,
        kernel_size,
        REVERSE=reverse,
        ACC_FP64=x.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return parts.sum(0).to(x.dtype)
