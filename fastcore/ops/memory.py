"""Where fastcore's CPU operators put their outputs: blocks their earlier outputs freed.

On the CPU, glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so an operator whose output is that large pays a page fault
for every 4 KiB of it on each call: at 10k nodes and more those faults cost more than the
kernel that fills the output (unpooling ``[16, 100k, 64]`` float32: 148 ms with the cache
below off, 17 ms with it on, in one run; ``docs/benchmarks.md``, "The operators' output
cache").

So fastcore's CPU operators (pooling, gathers, spmm, time_conv, feature_mlp,
linear_norm_residual, kv_project; forward and backward) allocate their outputs from a cache
of freed blocks (``csrc/cpu/cpu_cache.cpp``), on by default in every process: a block of
256 KiB or more that one of their outputs freed is handed to the next output it fits (best
fit, at most 1/8 larger), up to a limit of freed memory held (min(4 GiB, RAM / 4)); the
block cached longest ago goes first when it is full. Values never depend on it (only
addresses do), and other tensors are untouched: the training layer's allocator setting
(:mod:`fastcore.train.allocator`) extends the same cache to every CPU tensor of a run.

Switches: ``FASTCORE_CPU_CACHE=0`` (read at import: ``0``, ``off``, ``false`` or ``no``
turn it off; ``1``, ``on``, ``true``, ``yes``, empty or unset leave it on) or
:func:`cache_outputs` ``(False)``; :func:`empty_cache` hands the held blocks back.
Without the compiled extension the operators run their references and none of this applies.

Examples:
    >>> import torch, fastcore
    >>> from fastcore.ops import memory
    >>> was = memory.outputs_cached()
    >>> memory.cache_outputs(False)
    False
    >>> memory.cache_outputs(was) == was
    True
"""

from __future__ import annotations

import os

from fastcore import _backend

ENV = "FASTCORE_CPU_CACHE"
MIN_BLOCK = 256 << 10
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def default_limit() -> int:
    """min(4 GiB, a quarter of the RAM): the bytes of freed blocks the cache holds at most."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return min(4 << 30, ram // 4)


def extension():
    """The compiled extension where it has the block cache, else None."""
    c = _backend._C
    return c if c is not None and hasattr(c, "cpu_cache_outputs") else None


def check_limits(limit: int, min_block: int, where: str) -> None:
    if limit < 0 or min_block < 1:
        raise ValueError(
            f"{where}: limit must be >= 0 and min_block >= 1 bytes, got {limit}, {min_block}"
        )


def cache_outputs(
    enabled: bool = True, limit: int | None = None, min_block: int = MIN_BLOCK
) -> bool:
    """Allocate the CPU operators' outputs from the cache of freed blocks (``enabled``), or
    with the process's allocator. ``limit``: bytes of freed blocks held at most (default
    :func:`default_limit`); blocks under ``min_block`` bytes are not cached. Turning it off
    frees the cached blocks unless the training layer's setting still uses them. Returns
    whether it is on now (always False without the compiled extension)."""
    limit = default_limit() if limit is None else int(limit)
    check_limits(limit, min_block, "cache_outputs")
    ext = extension()
    if ext is None:
        return False
    ext.cpu_cache_outputs(bool(enabled), limit, int(min_block))
    return outputs_cached()


def outputs_cached() -> bool:
    """Whether the CPU operators allocate their outputs from the cache now."""
    ext = extension()
    return ext is not None and bool(ext.cpu_cache_outputs_active())


def empty_cache() -> int:
    """Free the blocks the cache holds (bytes released; 0 without the extension)."""
    ext = extension()
    return int(ext.cpu_cache_empty()) if ext is not None else 0


def cache_stats() -> dict[str, int] | None:
    """``hits``, ``misses`` (allocations of cacheable size served from / not from the
    cache), ``cached_bytes``, ``cached_blocks``, ``live_bytes`` (cacheable blocks in use);
    None without the compiled extension."""
    ext = extension()
    return dict(ext.cpu_cache_stats()) if ext is not None else None


def _from_environment() -> None:
    value = os.environ.get(ENV, "").strip().lower() or "1"
    if value not in _ON + _OFF:
        raise ValueError(
            f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(_ON + _OFF)} "
            "(on: the CPU operators reuse the blocks their outputs freed; off: they do not)"
        )
    cache_outputs(value in _ON)


_from_environment()
