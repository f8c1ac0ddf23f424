"""Benchmark conventions (pytest-benchmark).

Every benchmark records ``extra_info``: ``op``, ``direction`` (fwd / bwd / fwd+bwd),
``provider``, ``shape``, ``bytes`` (the minimum the operation must move), ``device`` and
``baseline`` (True for what users run today). ``bench/compare.py`` turns a run into ratios
against the baseline of the same group and into fractions of the copy bandwidth measured
in the same run (``test_copy_bandwidth``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def run(benchmark):
    """``run(fn, device=..., **extra_info)``: benchmark ``fn`` (synchronised on GPU)."""

    def go(fn, device, **info):
        benchmark.extra_info.update(device=device, **info)
        benchmark.group = f"{info['op']}-{info['direction']}-{info['shape']}"

        def timed():
            fn()
            sync(device)

        timed()  # warm-up: compilation, allocator, thread pool
        benchmark(timed)

    return go
