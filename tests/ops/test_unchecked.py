"""Memory safety without checks, and the same clear errors eager or compiled.

With ``check=False`` the ops skip reading the index values; an index, pointer or
permutation entry outside its range must then never read or write outside the tensors,
on any backend: a gather reads a zero row for it (gather_add keeps ``base``), a scatter
value out of range joins no output row, a CSR pointer is read clamped to ``[0, M]``, a
``perm`` entry out of range takes part in nothing, valid rows stay exact and the
backward runs. With ``check=True`` the error is the same in eager and compiled code on
every backend, naming the value, and never aborts the process.
"""

import pytest
import torch

from fastcore import ops, reference, use_backend
from fastcore.testing import assert_close, backend_params, randn

REDUCES = ["sum", "mean", "max", "min"]
HUGE = 10**6


def _grad(out, inputs, seed):
    upstream = randn(out.shape, out.dtype, out.device, seed=seed)
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_gather_out_of_range_reads_zero_rows(device, backend, index_dtype):
    src = randn((3, 7, 5), torch.float64, device, seed=1).requires_grad_()
    index = torch.tensor([2, HUGE, 0, -1, 6, -(2**31), 2], dtype=index_dtype, device=device)
    valid = (index >= 0) & (index < 7)
    with use_backend(backend):
        out = ops.gather(src, index, 1, check=False)
        (grad,) = _grad(out, [src], seed=2)
    expected = src.index_select(1, index.clamp(0, 6).long()) * valid.view(1, -1, 1)
    assert_close(out, expected, torch.float64, "forward")
    (expected_grad,) = _grad(expected, [src], seed=2)
    assert_close(grad, expected_grad, torch.float64, "backward")
    assert out[:, ~valid].abs().max() == 0


@pytest.mark.parametrize(("device", "backend"), backend_params("gather_add"))
def test_gather_add_out_of_range_keeps_base(device, backend):
    src = randn((2, 4, 3), torch.float64, device, seed=3).requires_grad_()
    base = randn((2, 5, 3), torch.float64, device, seed=4).requires_grad_()
    index = torch.tensor([1, HUGE, 3, -7, 0], device=device)
    valid = (index >= 0) & (index < 4)
    with use_backend(backend):
        out = ops.gather_add(src, index, base, 1, check=False)
        grads = _grad(out, [src, base], seed=5)
    expected = base + src.index_select(1, index.clamp(0, 3)) * valid.view(1, -1, 1)
    assert_close(out, expected, torch.float64, "forward")
    for g, e in zip(grads, _grad(expected, [src, base], seed=5), strict=True):
        assert_close(g, e, torch.float64, "backward")


# outer = 16 slabs takes the CPU kernel's by-slab loop order, outer = 1 the by-segment one.
@pytest.mark.parametrize("outer", [1, 16])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_scatter_out_of_range_joins_no_row(device, backend, reduce, outer):
    src = randn((outer, 9, 4), torch.float64, device, seed=6).requires_grad_()
    index = torch.tensor([0, HUGE, 1, -4, 1, 2, -HUGE, 0, 2], device=device)
    keep = ((index >= 0) & (index < 3)).nonzero().flatten()
    with use_backend(backend):
        out = ops.scatter(src, index, 1, 3, reduce, check=False)
        (grad,) = _grad(out, [src], seed=7)
    expected = reference.scatter(src.index_select(1, keep), index[keep], 1, 3, reduce)
    assert_close(out, expected, torch.float64, "forward")
    (expected_grad,) = _grad(expected, [src], seed=7)
    assert_close(grad, expected_grad, torch.float64, "backward")


@pytest.mark.parametrize("outer", [1, 16])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_segment_pointer_out_of_range_is_clamped(device, backend, reduce, outer):
    """ptr read clamped to [0, M]: ptr = [-3, 2, 2, 5, HUGE] over M = 7 rows reduces rows
    0-1, nothing, 2-4 and 5-6."""
    src = randn((outer, 7, 3), torch.float64, device, seed=8).requires_grad_()
    ptr = torch.tensor([-3, 2, 2, 5, HUGE], device=device)
    with use_backend(backend):
        out = ops.segment(src, ptr, 1, reduce, check=False)
        (grad,) = _grad(out, [src], seed=9)
    valid_ptr = torch.tensor([0, 2, 2, 5, 7], device=device)
    expected = reference.segment(src, valid_ptr, 1, reduce)
    assert_close(out, expected, torch.float64, "forward")
    (expected_grad,) = _grad(expected, [src], seed=9)
    assert_close(grad, expected_grad, torch.float64, "backward")


@pytest.mark.parametrize("outer", [1, 16])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_segment_csr_perm_out_of_range_takes_no_part(device, backend, reduce, outer):
    src = randn((outer, 6, 3), torch.float64, device, seed=10).requires_grad_()
    # segment 0: rows 4, (HUGE); segment 1: (-1), 0, 2; segment 2: (7) only.
    perm = torch.tensor([4, HUGE, -1, 0, 2, 7], device=device)
    ptr = torch.tensor([0, 2, 5, 6], device=device)
    with use_backend(backend):
        out = ops.segment_csr(src, perm, ptr, 1, reduce, check=False)
        (grad,) = _grad(out, [src], seed=11)
    index = torch.tensor([1, 3, 1, 3, 0, 3], device=device)  # rows 1, 3, 5 in no segment
    expected = reference.scatter(src, index, 1, 4, reduce).narrow(1, 0, 3)
    assert_close(out, expected, torch.float64, "forward")
    (expected_grad,) = _grad(expected, [src], seed=11)
    assert_close(grad, expected_grad, torch.float64, "backward")


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_malformed_pointer_never_crashes(device, backend):
    """A decreasing or wildly out-of-range ptr gives some finite result, never a crash or
    a read outside src (its values are not specified beyond that)."""
    src = randn((5, 8, 2), torch.float32, device, seed=12).requires_grad_()
    for ptr in ([0, 6, 3, 8], [HUGE, -HUGE, HUGE], [8, 0], [-5, -2]):
        for reduce in REDUCES:
            with use_backend(backend):
                out = ops.segment(src, torch.tensor(ptr, device=device), 1, reduce, check=False)
                (grad,) = _grad(out, [src], seed=13)
            assert out.shape == (5, len(ptr) - 1, 2) and bool(out.isfinite().all())
            assert grad.shape == src.shape and bool(grad.isfinite().all())


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_csr_shapes_are_checked_without_values(device, backend):
    src = randn((2, 6, 3), torch.float32, device, seed=14)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"perm must be 1-D of length 6 .*got shape \(4,\)"):
            ops.segment_csr(
                src,
                torch.arange(4, device=device),
                torch.tensor([0, 6], device=device),
                1,
                check=False,
            )
        with pytest.raises(ValueError, match=r"ptr must be 1-D with at least one entry"):
            ops.segment(src, torch.zeros(0, dtype=torch.long, device=device), 1, check=False)


def _compiled(fn, compiler):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=compiler)


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_compiled_errors_match_eager(device, backend):
    # Inductor cannot compile the interpreter's launches; aot_eager still traces the ops.
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    src = randn((3, 4, 2), torch.float32, device, seed=15)
    cases = [
        (
            lambda s, i: ops.gather(s, i, 1),
            [0, 9, 1],
            IndexError,
            "index value 9 is out of range for dimension 1 of size 4",
        ),
        (
            lambda s, i: ops.gather(s, i, 1),
            [0, -2, 1],
            IndexError,
            "index contains the negative value -2",
        ),
        (
            lambda s, i: ops.scatter(s, i, 1, 3),
            [0, 5, 1, 2],
            IndexError,
            "index value 5 is out of range for dimension 1 of size 3",
        ),
        (
            lambda s, i: ops.scatter(s, i, 1, 3, "max"),
            [0, -1, 1, 2],
            IndexError,
            "negative value -1",
        ),
        (
            lambda s, i: ops.segment(s, i, 1),
            [0, 2, 5],
            ValueError,
            r"ptr\[-1\] must equal the size 4 of dimension 1, got 5",
        ),
        (
            lambda s, i: ops.spmm(s, torch.stack([i, i.flip(0)]), dim=1),
            [0, 7, 1],
            IndexError,
            r"Graph: edge index 7 >= num_nodes 4 \(edge 1, source\)",
        ),
        (
            lambda s, i: ops.safe_time_resample(s, i.double() / 0, 1),
            [0, 1],
            ValueError,
            "indices contain NaN",
        ),
    ]
    with use_backend(backend):
        for fn, index, error, message in cases:
            index = torch.tensor(index, device=device)
            with pytest.raises(error, match=message):
                fn(src, index)
            with pytest.raises(error, match=message):
                _compiled(fn, compiler)(src, index)


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_compiled_unchecked_matches_eager(device, backend):
    """check=False under torch.compile: the eager result, no abort (the reference backend's
    index_select used to end the process from inductor's bounds assert)."""
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    src = randn((3, 4, 2), torch.float32, device, seed=16)
    index = torch.tensor([0, HUGE, 3, -1], device=device)

    def fn(s, i):
        return ops.gather(s, i, 1, check=False).sum(1) + ops.scatter(
            s, i, 1, 4, "max", check=False
        ).sum(1)

    with use_backend(backend):
        expected = fn(src, index)
        out = _compiled(fn, compiler)(src, index)
    assert_close(out, expected, torch.float32)
