"""Benchmark conventions (pytest-benchmark).

Every benchmark records ``extra_info``: ``op``, ``direction`` (fwd / bwd / fwd+bwd),
``provider``, ``shape``, ``bytes`` (the minimum the operation must move), ``device``,
``baseline`` (True for what users run today) and ``allocator_env`` (the allocator settings
of the process: glibc's ``MALLOC_*``, ``FASTCORE_CPU_CACHE``). ``bench/compare.py`` turns a run into ratios
against the baseline of the same group and into fractions of the copy bandwidth measured
in the same run (``test_copy_bandwidth``).
"""

import os

import pytest
import torch
from compare import allocator_env  # bench/compare.py

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def run(benchmark):
    """``run(fn, device=..., **extra_info)``: benchmark ``fn`` (synchronised on GPU)."""

    def go(fn, device, **info):
        # the allocator settings this process ran under (compare.py reports them)
        benchmark.extra_info.update(device=device, allocator_env=allocator_env(), **info)
        benchmark.group = f"{info['op']}-{info['direction']}-{info['shape']}"

        def timed():
            fn()
            sync(device)

        timed()  # warm-up: compilation, allocator, thread pool
        benchmark(timed)

    return go
