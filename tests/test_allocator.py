"""The allocator setting of the training layer: freed CPU blocks kept for reuse (no page
faults on the next step's activations), on by default for a run, off with a switch, the
previous allocator back afterwards, and the same bits either way."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcore import ops
from fastcore.ops import memory
from fastcore.train import allocator
from fastcore.train import checkpoint as ckpt_io
from fastcore.train.cli import resolve_config, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "log.progress=false",
    "log.tensorboard=false",
    "train.epochs=1",
    "train.threads=1",
    "data.steps=300",
    "model.hidden=8",
]
NEEDS_CACHE = pytest.mark.skipif(
    allocator.cache_stats() is None, reason="the compiled extension is not built"
)


def _faults_per_allocation(rounds: int = 3) -> list[int]:
    """Minor page faults of allocating and filling a 64 MiB tensor, per round."""
    out = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 << 20).fill_(1.0)
        small = torch.ones(100)  # a small allocation in between, as in a real step
        del x, small
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


@NEEDS_CACHE
def test_the_cache_removes_the_page_faults_of_a_reused_buffer():
    assert not allocator.is_kept()
    plain = _faults_per_allocation()
    assert min(plain) > 8000  # a fresh mapping: one fault per 4 KiB page (16,384)
    line = allocator.keep_freed_memory()
    try:
        assert line.startswith("fastcore CPU block cache") and allocator.is_kept()
        allocator.empty_cache()
        kept = _faults_per_allocation()
        assert kept[0] > 8000 and max(kept[1:]) < 200  # first touch only
        stats = allocator.cache_stats()
        assert stats["hits"] >= 2 and stats["cached_bytes"] >= 64 << 20
        assert allocator.empty_cache() >= 64 << 20
        assert allocator.cache_stats()["cached_bytes"] == 0
    finally:
        allocator.release_freed_memory()
    assert not allocator.is_kept()
    assert min(_faults_per_allocation()) > 8000  # the default allocator again


@NEEDS_CACHE
def test_the_limit_bounds_what_is_kept():
    allocator.keep_freed_memory(limit=32 << 20)
    try:
        allocator.empty_cache()  # blocks earlier operators' outputs left
        x = torch.empty(16 << 20)  # 64 MiB: over the limit, freed for real
        del x
        assert allocator.cache_stats()["cached_bytes"] == 0
        y = torch.empty(4 << 20)  # 16 MiB: kept
        del y
        assert allocator.cache_stats()["cached_bytes"] == 16 << 20
    finally:
        allocator.release_freed_memory()
    allocator.keep_freed_memory(limit=40 << 20)
    try:
        allocator.empty_cache()
        a, b, c = torch.empty(4 << 20), torch.empty(17 << 18), torch.empty(5 << 20)
        del a  # 16 MiB cached
        del b  # + 17 MiB
        assert allocator.cache_stats()["cached_bytes"] == 33 << 20
        del c  # 20 MiB: over the limit, so the block cached longest ago (a) goes
        stats = allocator.cache_stats()
        assert stats["cached_bytes"] == 37 << 20 and stats["cached_blocks"] == 2
    finally:
        allocator.release_freed_memory()
    with pytest.raises(ValueError, match="limit must be >= 0"):
        allocator.keep_freed_memory(limit=-1)


def test_a_run_keeps_freed_memory_by_default_and_restores_the_allocator(tmp_path):
    on = resolve_config(
        str(ROOT / "configs" / "example.yaml"), [f"run_dir={tmp_path / 'on'}", *SMALL]
    )
    off = resolve_config(
        str(ROOT / "configs" / "example.yaml"),
        [f"run_dir={tmp_path / 'off'}", *SMALL, "train.keep_freed_memory=false"],
    )
    assert on.train.keep_freed_memory and not off.train.keep_freed_memory
    run(on)
    assert not allocator.is_kept()  # put back after the run
    run(off)
    log_on = (tmp_path / "on" / "train.log").read_text()
    log_off = (tmp_path / "off" / "train.log").read_text()
    want = "fastcore CPU block cache" if allocator.cache_stats() is not None else "glibc"
    assert f"[ALLOC] {want}" in log_on
    assert "[ALLOC] allocator left as it is (train.keep_freed_memory = false)" in log_off
    # Addresses change, values do not: the same weights bit for bit.
    (a_path,) = ckpt_io.step_checkpoints(tmp_path / "on" / "checkpoints")[-1:]
    (b_path,) = ckpt_io.step_checkpoints(tmp_path / "off" / "checkpoints")[-1:]
    assert a_path.name == b_path.name
    a, b = ckpt_io.load(a_path)["model"], ckpt_io.load(b_path)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _op_faults(fn, rounds: int = 3) -> tuple[list[int], list[torch.Tensor]]:
    """Minor page faults of each call of ``fn`` (its output freed before the next), and the
    outputs' values (copied into memory allocated before the count)."""
    faults, values = [], []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = fn()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        values.append(y.clone())
        del y
    return faults, values


@pytest.fixture
def outputs_cached():
    """The operators' cache on for the test (it is by default; FASTCORE_CPU_CACHE=0 in the
    environment turns it off), and the process's state back afterwards."""
    was = memory.outputs_cached()
    memory.cache_outputs(True)
    yield
    memory.cache_outputs(was)


@NEEDS_CACHE
def test_operator_outputs_reuse_freed_blocks_in_a_plain_process(outputs_cached):
    """Without the training layer's setting, a 64 MiB output of a fastcore operator is
    written into the block the previous call's output freed: no page faults after the
    first call, the same values, and nothing else of the process goes through the cache."""
    assert not allocator.is_kept() and memory.outputs_cached()
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(4, 1000, 64, generator=g)
    index = torch.randint(0, 1000, (65536,), generator=g)  # output [4, 65536, 64]: 64 MiB
    x = torch.randn(4, 65536, 64, generator=g)
    perm, ptr = ops.index_csr(index, 1000)

    def unpool():
        return ops.gather(pooled, index, 1)

    memory.empty_cache()
    before = memory.cache_stats()
    faults, cached = _op_faults(unpool)
    assert faults[0] > 8000 and max(faults[1:]) < 200, faults
    stats = memory.cache_stats()
    assert stats["hits"] - before["hits"] >= 2 and stats["cached_bytes"] >= 64 << 20
    # Backward outputs too: the gradient of the unpooling is a pooling into `pooled`'s shape,
    # and pooling's output ([4, 1000, 64], 1 MiB) comes from the cache after the first call.
    faults_pool, _ = _op_faults(lambda: ops.segment_csr(x, perm, ptr, 1, "sum"))
    assert max(faults_pool[1:]) < 64, faults_pool
    assert min(_faults_per_allocation()) > 8000  # torch.empty: the default allocator still

    memory.cache_outputs(False)
    try:
        assert not memory.outputs_cached() and memory.cache_stats()["cached_bytes"] == 0
        faults_off, plain = _op_faults(unpool)
        assert min(faults_off) > 8000, faults_off
        assert memory.cache_stats()["cached_bytes"] == 0  # freed for real while off
    finally:
        memory.cache_outputs(True)
    assert all(torch.equal(a, b) for a, b in zip(cached, plain, strict=True))


@NEEDS_CACHE
def test_the_training_setting_gives_the_operators_their_configuration_back(outputs_cached):
    """keep_freed_memory(limit=...) reconfigures the shared cache; releasing it puts back
    the operators' own limit, so their 64 MiB outputs are kept again."""
    allocator.keep_freed_memory(limit=32 << 20)
    allocator.release_freed_memory()
    assert memory.outputs_cached()
    memory.empty_cache()
    y = ops.gather(torch.randn(4, 10, 64), torch.zeros(65536, dtype=torch.long), 1)
    del y
    assert memory.cache_stats()["cached_bytes"] >= 64 << 20
    assert memory.empty_cache() >= 64 << 20


@pytest.mark.parametrize(
    ("value", "expect"),
    [("0", "False"), ("off", "False"), ("on", "True"), ("", "True"), ("later", "ValueError")],
)
def test_the_environment_switch(value, expect):
    code = (
        "import fastcore\n"
        "from fastcore.ops import memory\n"
        "print(memory.outputs_cached() or memory.cache_stats() is None)"
    )
    env = {**os.environ, "FASTCORE_CPU_CACHE": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if expect == "ValueError":
        assert out.returncode != 0 and "FASTCORE_CPU_CACHE='later': expected one of" in out.stderr
    elif expect == "True":
        assert out.stdout.strip() == "True", out.stderr
    elif memory.cache_stats() is not None:  # off, where the extension exists
        assert out.stdout.strip() == "False", out.stderr
