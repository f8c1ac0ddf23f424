"""The allocator setting of the training layer: freed CPU blocks kept for reuse (no page
faults on the next step's activations), on by default for a run, off with a switch, the
previous allocator back afterwards, and the same bits either way."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

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
