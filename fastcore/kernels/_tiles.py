"""Shared launch geometry for the Triton kernels: the folded view and the program tile."""

from __future__ import annotations

import torch
import triton

# The CUDA limit on grid.x; programs loop over the remaining tiles.
MAX_PROGRAMS = 2**31 - 1
# Elements per program tile: a compromise between occupancy on the GPU and the number
# of programs the interpreter has to step through on the CPU.
TILE = 4096


def fold(t: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """``(outer, size, inner)``: ``t`` viewed as ``[outer, t.shape[dim], inner]``."""
    outer = 1
    for s in t.shape[:dim]:
        outer *= s
    inner = 1
    for s in t.shape[dim + 1 :]:
        inner *= s
    return outer, t.shape[dim], inner


def block_shape(rows: int, inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): all of a row's columns up to 1024, rows to fill the tile."""
    block_c = min(triton.next_power_of_2(max(inner, 1)), 1024)
    block_r = max(1, min(TILE // block_c, triton.next_power_of_2(rows)))
    return block_r, block_c
