"""The process's CPU memory allocator, tuned for training: keep large freed buffers.

glibc's ``malloc`` serves every block over its mmap threshold (at most 32 MiB on 64-bit,
128 KiB to start with) with a fresh ``mmap`` and gives it back with ``munmap`` on free. A
training step that allocates and frees the same large activations every iteration then pays
a page fault for every 4 KiB of every such buffer on first touch: on the 2-core CPU a
pooling output over 32 MB cost more in page faults than the kernel that filled it
(``docs/benchmarks.md``, "Allocator").

:func:`keep_freed_memory` installs fastcore's caching CPU allocator (``csrc/cpu/
cpu_cache.cpp``, through ``c10::SetCPUAllocator``): a freed block of 256 KiB or more is
kept (up to a limit, 4 GiB or a quarter of the RAM, whichever is smaller) and handed to the
next allocation it fits (best fit, at most 1/8 larger), so the next step reuses pages that
are already mapped: 0 page faults instead of 16,384 for a 64 MiB tensor allocated again.
Smaller blocks go to the default allocator. The cost: up to the limit stays held while
free (:func:`release_freed_memory` or :func:`empty_cache` hands it back). Without the
compiled extension, glibc is told the same through ``mallopt`` (``M_MMAP_MAX = 0``, no
heap trim), which helps less reliably: small allocations split the freed heap blocks.

The training layer switches this on for a run (``train.keep_freed_memory``, on by default)
and puts the previous allocator back afterwards; :func:`keep_freed_memory` does the same in
a loop of your own. Values never depend on it (only addresses do).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

from fastcore.ops import memory

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_TRIM_THRESHOLD = 64 << 30  # 64 GiB: never trim the heap in practice
DEFAULT_MMAP_MAX = 65536  # glibc's defaults, put back by release_freed_memory
DEFAULT_TRIM_THRESHOLD = 128 * 1024

_state = {"kept": False}


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc's ``mallopt`` and ``malloc_trim``, or None on another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
        gnu = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    gnu.restype = ctypes.c_char_p
    return mallopt, trim, gnu().decode()


def keep_freed_memory(limit: int | None = None, min_block: int = 256 << 10) -> str:
    """Keep large freed CPU blocks for reuse: fastcore's caching CPU allocator (``limit``
    bytes held while free, default min(4 GiB, RAM / 4); blocks under ``min_block`` bytes
    not cached), or glibc's ``mallopt`` without the extension. Returns a line saying what
    was done, for the log. Idempotent; affects the blocks allocated from now on.

    Examples:
        >>> from fastcore.train.allocator import keep_freed_memory, release_freed_memory
        >>> keep_freed_memory().startswith(("fastcore CPU block cache", "glibc", "not glibc"))
        True
        >>> _ = release_freed_memory()
    """
    limit = memory.default_limit() if limit is None else int(limit)
    memory.check_limits(limit, min_block, "keep_freed_memory")
    ext = memory.extension()
    if ext is not None:
        if ext.cpu_cache_enable(limit, min_block):
            _state["kept"] = "cache"
            return (
                f"fastcore CPU block cache: freed blocks of {min_block >> 10} KiB or more are "
                f"kept for reuse (up to {limit / 2**30:.1f} GiB)"
            )
        return "another CPU allocator is installed at a higher priority: left as it is"
    libc = _libc()
    if libc is None:
        return "not glibc and no compiled extension: the allocator is left as it is"
    mallopt, _, version = libc
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)):
        return f"glibc {version}: mallopt refused the settings; the allocator is left as it is"
    _state["kept"] = "mallopt"
    return (
        f"glibc {version}: large freed buffers are kept for reuse (M_MMAP_MAX=0, "
        "M_TRIM_THRESHOLD=64 GiB; no compiled extension for the block cache)"
    )


def release_freed_memory() -> str:
    """Undo :func:`keep_freed_memory`: the previous CPU allocator back and the cache freed
    (or glibc's default thresholds back, ``M_MMAP_MAX = 65536``, trim threshold 128 KiB,
    and ``malloc_trim(0)``)."""
    how, _state["kept"] = _state["kept"], False
    if how == "cache":
        memory.extension().cpu_cache_disable()
        return "fastcore CPU block cache removed and emptied"
    libc = _libc()
    if how != "mallopt" or libc is None:
        return "allocator unchanged"
    mallopt, trim, version = libc
    mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    trim(0)
    return f"glibc {version}: default allocator thresholds restored"


empty_cache = memory.empty_cache
cache_stats = memory.cache_stats


def is_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in effect (set by this module)."""
    return bool(_state["kept"])


@contextlib.contextmanager
def kept_freed_memory(enabled: bool = True) -> Iterator[str]:
    """:func:`keep_freed_memory` for the block (yields its log line), the defaults back
    afterwards unless it was already on; ``enabled=False`` changes nothing."""
    if not enabled:
        yield "allocator left as it is (train.keep_freed_memory = false)"
        return
    was_kept = is_kept()
    line = keep_freed_memory()
    try:
        yield line
    finally:
        if not was_kept:
            release_freed_memory()
