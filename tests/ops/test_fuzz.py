"""Seeded fuzzing of the public index ops on every backend available.

Each case draws a shape (empty and one-long dimensions included), a float dtype, an
index dtype, an index range that is valid or not (negative values, values past the end,
values past int32) and the ``check`` flag, then asserts one of two outcomes: a clear
error naming the offending value (``check=True`` with a bad index), or the oracle's
result, forward and backward. The oracle is plain PyTorch written here from the
documented semantics (an unchecked index out of range reads a zero row / joins no
output row / takes part in nothing). Nothing may crash, hang or abort.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastcore import ops, use_backend
from fastcore.testing import backend_params, dtype_supported

CASES_PER_OP = 64
FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _shape(rng: random.Random, size_at_dim: int) -> tuple[list[int], int]:
    ndim = rng.randint(1, 4)
    shape = [
        rng.choice([0, 1, 2, 3, 5]) if rng.random() < 0.15 else rng.randint(1, 4)
        for _ in range(ndim)
    ]
    dim = rng.randrange(ndim)
    shape[dim] = size_at_dim
    return shape, dim


def _index(rng: random.Random, length: int, bound: int, valid: bool, gen: torch.Generator):
    dtype = rng.choice([torch.int64, torch.int32])
    if valid or length == 0:
        high = max(bound, 1)
        index = torch.randint(0, high, (length,), generator=gen) if bound else torch.zeros(length)
        return index.to(dtype), dtype
    index = torch.randint(0, max(bound, 1), (length,), generator=gen)
    bad = torch.tensor(
        rng.choice([[-1], [bound], [bound + 7], [-(2**31)], [2**31 - 1], [10**6, -3]]),
        dtype=torch.int64,
    )
    if dtype == torch.int64 and rng.random() < 0.3:
        bad = bad * (2**20)  # past int32
    positions = torch.randint(0, length, (bad.numel(),), generator=gen)
    index[positions] = bad
    return index.to(dtype), dtype


def _close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == expected.shape, (
        f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    )
    assert out.dtype == expected.dtype or out.dtype == dtype, f"{what}: dtype {out.dtype}"
    if out.numel() == 0:
        return
    out64, exp64 = out.double(), expected.double()
    assert not bool(out64.isnan().any()), f"{what}: NaN"
    err = (out64 - exp64).norm() / exp64.norm().clamp(min=1e-30)
    assert err <= TOLERANCE[dtype] or (out64 - exp64).abs().max() <= TOLERANCE[dtype], (
        f"{what}: rel err {err}"
    )


def _along(t: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = t.numel()
    return t.view(shape)


def _oracle_gather(src, index, dim):
    """index_select from src with a zero row appended, which every bad index reads."""
    size = src.shape[dim]
    zero_row = list(src.shape)
    zero_row[dim] = 1
    padded = torch.cat([src.double(), src.new_zeros(zero_row, dtype=torch.float64)], dim)
    valid = (index >= 0) & (index < size)
    return padded.index_select(dim, torch.where(valid, index.long(), size))


def _oracle_scatter(src, index, dim, size, reduce):
    """sum / mean / max / min over the rows whose index is in [0, size); 0 elsewhere."""
    index = index.long()
    keep = (index >= 0) & (index < size)
    src64 = src.double().index_select(dim, keep.nonzero().flatten())
    index = index[keep]
    shape = list(src.shape)
    shape[dim] = size
    expanded = _along(index, dim, src.dim()).expand_as(src64)
    if reduce in ("sum", "mean"):
        out = src64.new_zeros(shape).scatter_add(dim, expanded, src64)
        if reduce == "mean":
            count = torch.zeros(size, dtype=torch.float64).index_add(
                0, index, torch.ones(index.numel(), dtype=torch.float64)
            )
            out = out / _along(count.clamp(min=1), dim, src.dim())
        return out
    amax = "amax" if reduce == "max" else "amin"
    return src64.new_zeros(shape).scatter_reduce(dim, expanded, src64, amax, include_self=False)


def _run(backend, fn, *args, **kwargs):
    with use_backend(backend):
        return fn(*args, **kwargs)


def _grads(out, inputs, gen):
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True), upstream


def _cases(op: str, device: str, backend: str):
    seed = sum(map(ord, f"{op}/{backend}"))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for case in range(CASES_PER_OP):
        dtype = rng.choice([d for d in FLOATS if dtype_supported(backend, device, d)])
        yield case, rng, gen, dtype, rng.random() < 0.5, rng.random() < 0.5


def _check_error(error: Exception, index: torch.Tensor, bound: int, what: str) -> None:
    """A clear error: IndexError/ValueError naming one of the values out of range."""
    assert isinstance(error, (IndexError, ValueError)), f"{what}: {type(error).__name__}: {error}"
    bad = index[(index < 0) | (index >= bound)].unique().tolist()
    assert any(str(v) in str(error) for v in bad), f"{what}: no bad value is named: {error}"


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_fuzz_gather(device, backend):
    for case, rng, gen, dtype, valid, check in _cases("gather", device, backend):
        size = rng.choice([0, 1, 3, 7])
        shape, dim = _shape(rng, size)
        src = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        index, _ = _index(rng, rng.choice([0, 1, 4, 9]), size, valid, gen)
        what = f"case {case}: shape {shape} dim {dim} {dtype} index {index.tolist()} check {check}"
        bad = index.numel() and not bool(((index >= 0) & (index < size)).all())
        if bad and check:
            with pytest.raises((IndexError, ValueError)) as info:
                _run(backend, ops.gather, src, index, dim)
            _check_error(info.value, index, size, what)
            continue
        out = _run(backend, ops.gather, src, index, dim, check=check)
        expected = _oracle_gather(src.detach(), index, dim)
        _close(out, expected, dtype, what)
        if out.numel():
            (grad,), upstream = _grads(out, [src], gen)
            src64 = src.detach().double().requires_grad_()
            (expected_grad,) = torch.autograd.grad(
                _oracle_gather(src64, index, dim), src64, upstream.double()
            )
            _close(grad, expected_grad, dtype, what + " grad")


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_fuzz_scatter(device, backend, reduce):
    for case, rng, gen, dtype, valid, check in _cases(f"scatter-{reduce}", device, backend):
        rows = rng.choice([0, 1, 5, 12])
        size = rng.choice([0, 1, 4, 9])
        shape, dim = _shape(rng, rows)
        src = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        index, _ = _index(rng, rows, size, valid, gen)
        what = f"case {case}: shape {shape} dim {dim} {dtype} index {index.tolist()} size {size} check {check}"
        bad = index.numel() and not bool(((index >= 0) & (index < size)).all())
        if bad and check:
            with pytest.raises((IndexError, ValueError)) as info:
                _run(backend, ops.scatter, src, index, dim, size, reduce)
            _check_error(info.value, index, size, what)
            continue
        out = _run(backend, ops.scatter, src, index, dim, size, reduce, check=check)
        expected = _oracle_scatter(src.detach(), index, dim, size, reduce)
        _close(out, expected, dtype, what)
        if out.numel() and src.numel():
            (grad,), _ = _grads(out, [src], gen)
            assert grad.shape == src.shape and not bool(grad.isnan().any()), what
            keep = ~((index >= 0) & (index < size))
            if keep.any():  # rows that joined no output get no gradient
                assert grad.index_select(dim, keep.nonzero().flatten()).abs().max() == 0, what


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_fuzz_segment_pointer(device, backend):
    for case, rng, gen, dtype, valid, check in _cases("segment", device, backend):
        rows = rng.choice([0, 1, 6, 11])
        segments = rng.choice([0, 1, 3, 5])
        shape, dim = _shape(rng, rows)
        src = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        cuts = sorted(rng.randint(0, rows) for _ in range(max(segments - 1, 0)))
        ptr = torch.tensor([0, *cuts, rows][: segments + 1] if segments else [0])
        ptr[-1] = rows
        if not valid:
            ptr[rng.randrange(ptr.numel())] = rng.choice([-2, rows + 3, 10**6])
        ptr = ptr.to(rng.choice([torch.int64, torch.int32]))
        reduce = rng.choice(["sum", "mean", "max", "min"])
        what = f"case {case}: shape {shape} dim {dim} {dtype} ptr {ptr.tolist()} {reduce} check {check}"
        p = ptr.long()
        good = int(p[0]) == 0 and int(p[-1]) == rows and bool((p.diff() >= 0).all())
        if check and not good:
            with pytest.raises(ValueError, match="ptr"):
                _run(backend, ops.segment, src, ptr, dim, reduce)
            continue
        out = _run(backend, ops.segment, src, ptr, dim, reduce, check=check)
        if bool((p.clamp(0, rows).diff() >= 0).all()):  # clamped, still a CSR: exact result
            bounds = p.clamp(0, rows)
            position = torch.arange(rows)
            segment = torch.searchsorted(bounds, position, right=True) - 1
            segment = torch.where((segment < 0) | (segment >= ptr.numel() - 1), 10**9, segment)
            expected = _oracle_scatter(src.detach(), segment, dim, ptr.numel() - 1, reduce)
            _close(out, expected, dtype, what)
        else:
            assert out.shape[dim] == ptr.numel() - 1 and bool(out.isfinite().all()), what
        if out.numel() and src.numel():
            (grad,), _ = _grads(out, [src], gen)
            assert grad.shape == src.shape and bool(grad.isfinite().all()), what


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_fuzz_spmm_edge_index(device, backend):
    for case, rng, gen, dtype, valid, _ in _cases("spmm", device, backend):
        nodes = rng.choice([1, 4, 9])
        shape, dim = _shape(rng, nodes)
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        edges = rng.choice([0, 1, 6, 15])
        src_index, _ = _index(rng, edges, nodes, valid, gen)
        dst_index = torch.randint(0, nodes, (edges,), generator=gen).to(src_index.dtype)
        edge_index = torch.stack([src_index, dst_index])
        what = f"case {case}: shape {shape} dim {dim} {dtype} edges {edge_index.tolist()}"
        bad = edges and not bool(((src_index >= 0) & (src_index < nodes)).all())
        if bad:
            with pytest.raises((IndexError, ValueError)) as info:
                _run(backend, ops.spmm, x, edge_index, None, dim)
            _check_error(info.value, src_index, nodes, what)
            continue
        out = _run(backend, ops.spmm, x, edge_index, None, dim)
        gathered = x.detach().double().index_select(dim, src_index.long())
        expected = _oracle_scatter(gathered, dst_index, dim, nodes, "sum")
        _close(out, expected, dtype, what)


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_fuzz_segment_csr_perm(device, backend):
    for case, rng, gen, dtype, valid, check in _cases("segment_csr", device, backend):
        rows = rng.choice([1, 6, 11])
        segments = rng.choice([1, 3, 5])
        shape, dim = _shape(rng, rows)
        src = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        index = torch.randint(0, segments, (rows,), generator=gen)
        perm, ptr = ops.index_csr(index, segments)
        if not valid:  # entries out of range, or a repeated row
            k = rng.randrange(rows)
            perm[k] = rng.choice([-1, rows, 10**6, int(perm[(k + 1) % rows])])
        perm = perm.to(rng.choice([torch.int64, torch.int32]))
        reduce = rng.choice(["sum", "mean", "max", "min"])
        what = f"case {case}: shape {shape} dim {dim} {dtype} perm {perm.tolist()} ptr {ptr.tolist()} {reduce}"
        good = bool((perm.sort().values == torch.arange(rows)).all())
        if check and not good:
            with pytest.raises((IndexError, ValueError), match="perm"):
                _run(backend, ops.segment_csr, src, perm, ptr, dim, reduce)
            continue
        out = _run(backend, ops.segment_csr, src, perm, ptr, dim, reduce, check=check)
        # entry k of segment r names row perm[k]; rows named by no valid entry join nothing
        entry_segment = torch.repeat_interleave(torch.arange(segments), ptr.diff())
        member = torch.full((rows,), 10**9)
        p = perm.long()
        ok = (p >= 0) & (p < rows)
        if bool((p[ok].bincount(minlength=rows) <= 1).all()):  # no row listed twice
            member[p[ok]] = entry_segment[ok]
            expected = _oracle_scatter(src.detach(), member, dim, segments, reduce)
            _close(out, expected, dtype, what)
        else:
            assert bool(out.isfinite().all()), what
        if out.numel() and src.numel():
            (grad,), _ = _grads(out, [src], gen)
            assert grad.shape == src.shape and bool(grad.isfinite().all()), what


@pytest.mark.parametrize(("device", "backend"), backend_params("gather_add"))
def test_fuzz_gather_add(device, backend):
    for case, rng, gen, dtype, valid, check in _cases("gather_add", device, backend):
        size = rng.choice([0, 1, 3, 7])
        shape, dim = _shape(rng, size)
        src = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        index, _ = _index(rng, rng.choice([0, 1, 4, 9]), size, valid, gen)
        out_shape = list(shape)
        out_shape[dim] = index.numel()
        base = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
        what = f"case {case}: shape {shape} dim {dim} {dtype} index {index.tolist()} check {check}"
        bad = index.numel() and not bool(((index >= 0) & (index < size)).all())
        if bad and check:
            with pytest.raises((IndexError, ValueError)) as info:
                _run(backend, ops.gather_add, src, index, base, dim)
            _check_error(info.value, index, size, what)
            continue
        out = _run(backend, ops.gather_add, src, index, base, dim, check=check)
        _close(out, base.double() + _oracle_gather(src.detach(), index, dim), dtype, what)
