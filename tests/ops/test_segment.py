"""fastcore.ops.scatter / segment (the segment_reduce and segment_arg_scatter operators)
on every backend, against fastcore.reference."""

import itertools

import pytest
import torch

import fastcore
from fastcore import ops, reference, use_backend
from fastcore.testing import (
    assert_close,
    backend_dtype_params,
    backend_params,
    randint,
    randn,
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
REDUCES = ["sum", "mean", "max", "min"]

# (src shape, dim, dim_size, index kind)
CASES = {
    "basins": ((2, 12, 400, 16), -2, 80, "random"),  # (B*T, N, H): 400 fine -> 80 parents
    "btnfh": ((2, 3, 41, 5, 8), -3, 9, "random"),  # (B, T, N, F, H), node dim -3
    "dim0": ((31, 6), 0, 7, "random"),
    "last_dim": ((4, 3, 37), -1, 5, "random"),  # inner = 1
    "one_d": ((29,), 0, 4, "random"),
    "sparse": ((3, 20, 4), 1, 53, "random"),  # most slots receive nothing
    "one_huge": ((2, 300, 5), 1, 7, "constant"),  # one huge segment, the rest empty
    "sorted": ((3, 97, 5), 1, 11, "sorted"),
    "empty_src": ((3, 0, 4), 1, 5, "random"),
    "empty_outer": ((0, 6, 4), 1, 3, "random"),
    "no_slots": ((3, 0, 4), 1, 0, "random"),
}


def make_index(dim_size, length, kind, dtype, device, seed):
    index = randint(dim_size, (length,), dtype, device, seed)
    if kind == "sorted":
        index = index.sort().values
    elif kind == "constant" and length:
        index = torch.full_like(index, dim_size // 2)
    return index


def reference_grad(src, index, dim, dim_size, reduce, upstream):
    src64 = src.detach().double().requires_grad_()
    out = reference.scatter(src64, index, dim, dim_size, reduce)
    (grad,) = torch.autograd.grad(out, src64, upstream.double())
    return out, grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("segment", FLOATS))
def test_scatter_matches_reference(device, backend, dtype, reduce, case):
    shape, dim, dim_size, kind = CASES[case]
    src = randn(shape, dtype, device, seed=1).requires_grad_()
    index = make_index(dim_size, shape[dim], kind, torch.int64, device, seed=2)
    with use_backend(backend):
        out = ops.scatter(src, index, dim, dim_size, reduce)
    upstream = randn(out.shape, dtype, device, seed=3)
    ref, ref_grad = reference_grad(src, index, dim, dim_size, reduce, upstream)
    assert out.dtype == dtype
    if reduce in ("max", "min"):  # a selection: exact in every dtype
        assert torch.equal(out.double(), ref)
    else:
        assert_close(out, ref, dtype, f"{reduce} {backend} {case}")
    if out.numel():
        (grad,) = torch.autograd.grad(out, src, upstream)
        assert grad.dtype == dtype
        assert_close(grad, ref_grad, dtype, f"grad {reduce} {backend} {case}")


SEGMENTS = {  # (src shape, dim, ptr)
    "empty_and_huge": ((3, 40, 6), 1, [0, 0, 1, 1, 38, 40, 40]),
    "all_empty_but_one": ((2, 9, 3, 5), 1, [0, 0, 0, 9, 9]),
    "one_segment": ((4, 13), 1, [0, 13]),
    "no_rows": ((3, 0, 2), 1, [0, 0, 0]),
    "no_segments": ((3, 0, 2), 1, [0]),
    "dim0": ((12, 3, 2), 0, [0, 5, 5, 12]),
}


@pytest.mark.parametrize("case", list(SEGMENTS))
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("segment", FLOATS))
def test_segment_matches_reference(device, backend, dtype, reduce, case):
    shape, dim, ptr_list = SEGMENTS[case]
    src = randn(shape, dtype, device, seed=4).requires_grad_()
    ptr = torch.tensor(ptr_list, device=device)
    with use_backend(backend):
        out = ops.segment(src, ptr, dim, reduce)
    src64 = src.detach().double().requires_grad_()
    ref = reference.segment(src64, ptr, dim, reduce)
    if reduce in ("max", "min"):
        assert torch.equal(out.double(), ref)
    else:
        assert_close(out, ref, dtype, f"{reduce} {backend} {case}")
    if out.numel():
        upstream = randn(out.shape, dtype, device, seed=5)
        (grad,) = torch.autograd.grad(out, src, upstream)
        (ref_grad,) = torch.autograd.grad(ref, src64, upstream.double())
        assert_close(grad, ref_grad, dtype, f"grad {reduce} {backend} {case}")


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_int32_index_and_ptr(device, backend, reduce):
    src = randn((4, 50, 7), torch.float32, device, seed=6)
    index = randint(12, (50,), torch.int32, device, seed=7)
    ptr = torch.tensor([0, 3, 3, 20, 50], dtype=torch.int32, device=device)
    with use_backend(backend):
        scattered = ops.scatter(src, index, 1, 12, reduce)
        segmented = ops.segment(src, ptr, 1, reduce)
    assert_close(scattered, reference.scatter(src.double(), index, 1, 12, reduce), torch.float32)
    assert_close(segmented, reference.segment(src.double(), ptr, 1, reduce), torch.float32)


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_ties_go_to_the_first_element(device, backend, reduce):
    # Three distinct values over many rows: almost every slot has ties.
    src = randint(3, (2, 300, 9), torch.float32, device, seed=8).requires_grad_()
    index = randint(17, (300,), torch.int64, device, seed=9)
    upstream = randn((2, 17, 9), torch.float32, device, seed=10)
    with use_backend(backend):
        out = ops.scatter(src, index, 1, 17, reduce)
    (grad,) = torch.autograd.grad(out, src, upstream)
    arg = reference.scatter_arg(src.detach(), index, 1, 17, reduce)
    expected = torch.zeros_like(src).scatter_(1, arg.clamp(max=299), upstream)
    assert torch.equal(grad, expected)
    assert torch.count_nonzero(grad) == torch.count_nonzero(upstream)  # one element per slot


@pytest.mark.parametrize("reduce", ["max", "min"])
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_nan_propagates_to_the_first_nan(device, backend, reduce):
    src = randn((2, 30, 4), torch.float32, device, seed=11)
    index = torch.arange(30, device=device) % 5  # slot s: rows s, s+5, s+10, ...
    src[:, 7, 1] = float("nan")  # slot 2: first NaN at row 7 ...
    src[:, 17, 1] = float("nan")  # ... not the later one
    src[:, 25, 2] = float("nan")  # slot 0, the last member
    src.requires_grad_()
    with use_backend(backend):
        out = ops.scatter(src, index, 1, 5, reduce)
    nan = torch.isnan(out)
    assert nan[:, 2, 1].all() and nan[:, 0, 2].all() and nan.sum() == 4
    (grad,) = torch.autograd.grad(out, src, torch.ones_like(out))
    assert (
        (grad[:, 7, 1] == 1).all() and (grad[:, 17, 1] == 0).all() and (grad[:, 25, 2] == 1).all()
    )
    torch.testing.assert_close(
        out, reference.scatter(src.detach(), index, 1, 5, reduce), equal_nan=True
    )


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_non_contiguous(device, backend, reduce):
    src = randn((9, 26, 13), torch.float32, device, seed=12).transpose(0, 2)  # (13, 26, 9)
    index = randint(6, (52,), torch.int64, device, seed=13)[::2]  # strided index
    assert not src.is_contiguous() and not index.is_contiguous()
    src.requires_grad_()
    with use_backend(backend):
        out = ops.scatter(src, index, 1, 6, reduce)
    upstream = randn(out.shape, torch.float32, device, seed=14)
    ref, ref_grad = reference_grad(src, index, 1, 6, reduce, upstream)
    assert_close(out, ref, torch.float32, "non-contiguous")
    (grad,) = torch.autograd.grad(out, src, upstream)
    assert_close(grad, ref_grad, torch.float32, "non-contiguous grad")


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_gradcheck_and_gradgradcheck(device, backend, reduce):
    src = randn((2, 7, 3), torch.float64, device, seed=15).requires_grad_()
    index = torch.tensor([4, 0, 4, 2, 4, 1, 0], device=device)  # duplicates, an empty slot (3)
    ptr = torch.tensor([0, 2, 2, 7], device=device)
    with use_backend(backend):
        for fn in (
            lambda s: ops.scatter(s, index, 1, 6, reduce),
            lambda s: ops.segment(s, ptr, 1, reduce),
        ):
            assert torch.autograd.gradcheck(fn, (src,))
            assert torch.autograd.gradgradcheck(fn, (src,))


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("outer", [6, 1])
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_deterministic(device, backend, outer, reduce):
    # Long float32 segments: any change of summation order changes the bits. With
    # outer = 6 the CPU kernel reduces by slab on one and two threads; with outer = 1 by
    # segment, with the work split differently: every run must give the same bits.
    src = randn((outer, 3000, 33), torch.float32, device, seed=16).requires_grad_()
    index = randint(7, (3000,), torch.int64, device, seed=17)
    upstream = randn((outer, 7, 33), torch.float32, device, seed=18)
    results = []
    threads = torch.get_num_threads()
    try:
        with use_backend(backend):
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                out = ops.scatter(src, index, 1, 7, reduce)
                (grad,) = torch.autograd.grad(out, src, upstream)
                results.append((out, grad))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("order", ["ascending", "reversed"])
@pytest.mark.parametrize("size", [3000, 12000])
def test_cpu_loop_orders_same_bits(order, reduce, size):
    # The CPU kernel reduces by slab (streaming the source rows) when there are slabs for
    # every thread, their accumulators fit the cache budget (12000 rows -> 3000 segments of
    # 64 floats: 768 KB, over the former 512 KB limit) and every segment lists its members
    # ascending; otherwise by segment. One slab at a time always goes by segment: the 8
    # slabs at once must give exactly its bits, whichever order the CSR lists (reversed
    # members keep the by-segment order, in which the sum's bits differ).
    segments = size // 4
    src = randn((8, size, 64), torch.float32, "cpu", seed=21)
    index = randint(segments, (size,), torch.int64, "cpu", seed=22)
    perm, ptr = ops.index_csr(index, segments)
    if order == "reversed":
        bounds = ptr.tolist()
        perm = torch.cat([perm[a:b].flip(0) for a, b in itertools.pairwise(bounds)])
    threads = torch.get_num_threads()
    try:
        with use_backend("cpu"):
            for n in (1, 2):
                torch.set_num_threads(n)
                together = ops.segment_csr(src, perm, ptr, 1, reduce)
                alone = torch.stack([ops.segment_csr(s, perm, ptr, 0, reduce) for s in src])
                assert torch.equal(together, alone)
    finally:
        torch.set_num_threads(threads)
    if order == "reversed" and reduce != "max":
        ascending = ops.segment_csr(src, *ops.index_csr(index, segments), 1, reduce)
        assert not torch.equal(together, ascending)  # the order shows in the bits


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cpu_streamed_output(reduce):
    # A by-segment reduction whose output is 32 MB or more is accumulated row by row and
    # streamed out. Small integer values keep every sum exact, so the result must equal
    # index_add_'s bit for bit (and the mean its division), empty segments zero.
    segments, size = 140_000, 200_000  # 140k x 64 float32 = 36 MB out
    src = randint(8, (1, size, 64), torch.int64, "cpu", seed=41).float()
    index = randint(segments, (size,), torch.int64, "cpu", seed=42)
    perm, ptr = ops.index_csr(index, segments)
    with use_backend("cpu"):
        out = ops.segment_csr(src, perm, ptr, 1, reduce)
    expected = torch.zeros(1, segments, 64).index_add_(1, index, src)
    if reduce == "mean":
        expected /= torch.bincount(index, minlength=segments).clamp_min(1)[:, None]
    assert out.nbytes >= 32 << 20 and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("width", [64, 96, 200])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cpu_wide_rows_by_segment_same_bits_as_by_slab(dtype, width, reduce):
    # By segment, the CPU kernel sums a row 256 bytes of accumulator at a time in registers
    # (64 float32 / 32 float64 columns; float16 and bfloat16 accumulate in float32) and any
    # remaining columns in memory; by slab (8 slabs here), every column in memory. The same
    # terms in the same order: the same bits, for widths with and without a remainder.
    size, segments = 3000, 750
    src = randn((8, size, width), dtype, "cpu", seed=51)
    index = randint(segments, (size,), torch.int64, "cpu", seed=52)
    perm, ptr = ops.index_csr(index, segments)
    with use_backend("cpu"):
        by_slab = ops.segment_csr(src, perm, ptr, 1, reduce)
        by_segment = torch.stack([ops.segment_csr(s, perm, ptr, 0, reduce) for s in src])
    assert torch.equal(by_slab, by_segment)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cpu_wide_rows_skip_out_of_range_members(reduce):
    # check=False with members outside the source rows: the register-block loop skips them
    # and a mean divides by the members it did sum (small integers: exact sums).
    size, segments, width = 400, 50, 96
    src = randint(8, (2, size, width), torch.int64, "cpu", seed=53).float()
    index = randint(segments, (size,), torch.int64, "cpu", seed=54)
    perm, ptr = ops.index_csr(index, segments)
    bad = perm.clone()
    bad[::7] = size + 3
    bad[3::11] = -1
    with use_backend("cpu"):
        out = ops.segment_csr(src, bad, ptr, 1, reduce, check=False)
    valid = (bad >= 0) & (bad < size)
    segment_of = torch.repeat_interleave(torch.arange(segments), ptr.diff())[valid]
    expected = torch.zeros(2, segments, width).index_add_(1, segment_of, src[:, bad[valid]])
    if reduce == "mean":
        expected /= torch.bincount(segment_of, minlength=segments).clamp_min(1)[:, None]
    assert (~valid).sum() > 50 and torch.equal(out, expected)


def _operators(device):
    ops_here = []
    for backend in fastcore.testing.backends_for("segment", device):
        if backend == "triton":
            ops_here.append(
                (
                    torch.ops.fastcore.segment_reduce_triton,
                    torch.ops.fastcore.segment_arg_scatter_triton,
                )
            )
        elif backend in ("cpu", "cuda"):
            ops_here.append(
                (torch.ops.fastcore.segment_reduce, torch.ops.fastcore.segment_arg_scatter)
            )
    return ops_here


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    operators = _operators(device)
    assert operators, "no compiled or Triton backend to check"
    src = randn((3, 7, 4), torch.float32, device, seed=19).requires_grad_()
    perm, ptr = ops.index_csr(torch.tensor([2, 0, 2, 3, 0, 2, 2], device=device), 5)
    for reduce_op, arg_scatter_op in operators:
        for reduce in REDUCES:
            torch.library.opcheck(reduce_op, (src, perm, ptr, 1, reduce, True))
            torch.library.opcheck(
                reduce_op, (src, None, torch.tensor([0, 3, 7], device=device), 1, reduce, False)
            )
        grad = randn((3, 5, 4), torch.float32, device, seed=20).requires_grad_()
        arg = reduce_op(src, perm, ptr, 1, "max", False)[1]
        torch.library.opcheck(arg_scatter_op, (grad, arg, 1, 7))


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_compile_fullgraph(device, backend, reduce):
    torch._dynamo.reset()
    src = randn((2, 6, 23, 8), torch.float32, device, seed=21).requires_grad_()
    index = randint(5, (23,), torch.int64, device, seed=22)
    ptr = torch.tensor([0, 4, 4, 23], device=device)

    def loss(s):
        pooled = ops.scatter(s, index, -2, 5, reduce)
        segmented = ops.segment(s.sin(), ptr, -2, reduce)
        return (pooled.cos() * 3).sum() + segmented.square().sum()

    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend=compiler)
        value = compiled(src)
        (grad,) = torch.autograd.grad(value, src)
        expected = loss(src)
        (expected_grad,) = torch.autograd.grad(expected, src)
    assert_close(value, expected, torch.float32, "compiled value")
    assert_close(grad, expected_grad, torch.float32, "compiled grad")


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_bad_index_values(device, backend):
    src = randn((3, 4, 2), torch.float32, device, seed=23)
    with use_backend(backend):
        with pytest.raises(IndexError, match=r"value 5 is out of range for dimension 1 of size 5"):
            ops.scatter(src, torch.tensor([0, 5, 2, 1], device=device), 1, 5)
        with pytest.raises(IndexError, match=r"negative value -1"):
            ops.scatter(src, torch.tensor([0, -1, 2, 1], device=device), 1)
        with pytest.raises(
            ValueError, match=r"ptr\[-1\] must equal the size 4 of dimension 1, got 5"
        ):
            ops.segment(src, torch.tensor([0, 2, 5], device=device), 1)
        with pytest.raises(ValueError, match=r"non-decreasing, got ptr\[1\]=3 > ptr\[2\]=2"):
            ops.segment(src, torch.tensor([0, 3, 2, 4], device=device), 1)
        with pytest.raises(ValueError, match=r"ptr\[0\] must be 0, got 1"):
            ops.segment(src, torch.tensor([1, 4], device=device), 1)


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_bad_arguments(device, backend):
    src = randn((3, 4, 2), torch.float32, device, seed=24)
    index = torch.tensor([0, 1, 1, 0], device=device)
    with use_backend(backend):
        with pytest.raises(
            ValueError, match="reduce must be one of sum, mean, max, min; got 'prod'"
        ):
            ops.scatter(src, index, 1, 2, "prod")
        with pytest.raises(ValueError, match="reduce must be one of"):
            ops.segment(src, torch.tensor([0, 4], device=device), 1, "avg")
        with pytest.raises(
            ValueError, match="index has 3 entries but src has 4 rows along dimension 1"
        ):
            ops.scatter(src, index[:3], 1, 2)
        with pytest.raises(ValueError, match="dim_size must be a non-negative int, got -2"):
            ops.scatter(src, index, 1, -2)
        with pytest.raises(TypeError, match=r"src dtype torch\.int64 is not supported"):
            ops.scatter(src.long(), index, 1, 2)
        with pytest.raises(TypeError, match=r"index must be int32 or int64, got torch\.float32"):
            ops.scatter(src, index.float(), 1, 2)
        with pytest.raises(ValueError, match=r"ptr must be 1-D, got shape \(1, 2\)"):
            ops.segment(src, torch.tensor([[0, 4]], device=device), 1)
        with pytest.raises(IndexError, match="dim -4 is out of range for a tensor of 3 dimensions"):
            ops.scatter(src, index, -4, 2)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_unchecked_out_of_range_is_memory_safe(device, backend, reduce):
    """check=False skips the value check; values outside [0, dim_size) join no slot."""
    src = randn((2, 6, 3), torch.float64, device, seed=25)
    index = torch.tensor([0, 9, 1, -4, 1, 2], device=device)
    keep = torch.tensor([0, 2, 4, 5], device=device)
    with use_backend(backend):
        out = ops.scatter(src, index, 1, 3, reduce, check=False)
    expected = reference.scatter(src.index_select(1, keep), index[keep], 1, 3, reduce)
    assert_close(out, expected, torch.float64)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_operators_validate_before_running(device):
    src = randn((2, 6, 3), torch.float32, device, seed=26)
    perm = torch.arange(6, device=device)
    for reduce_op, _ in _operators(device):
        with pytest.raises(
            ValueError, match="reduce must be one of sum, mean, max, min; got 'prod'"
        ):
            reduce_op(src, perm, torch.tensor([0, 6], device=device), 1, "prod", True)
        with pytest.raises(ValueError, match="perm must be a permutation"):
            reduce_op(src, perm.clamp(max=4), torch.tensor([0, 6], device=device), 1, "max", True)
        with pytest.raises(ValueError, match=r"ptr\[-1\] must equal the size 6"):
            reduce_op(src, None, torch.tensor([0, 7], device=device), 1, "sum", True)


@pytest.mark.slow
def test_int64_addressing():
    """More than 2**31 elements: offsets and arg values past 2**31 must not wrap (CPU)."""
    torch.use_deterministic_algorithms(False)  # no NaN fill of 4 GiB
    rows, width = 2**20 + 3, 2048  # 2**31 + 6144 float16 elements, 4 GiB
    src = torch.zeros(rows, width, dtype=torch.float16)
    src[-2:] = randn((2, width), torch.float16, "cpu", seed=27)
    ptr = torch.tensor([0, rows - 2, rows - 1, rows])
    with use_backend("cpu"):
        src.requires_grad_()
        out = ops.segment(src, ptr, 0, "max")
        assert torch.equal(out[1], src[rows - 2]) and torch.equal(out[2], src[rows - 1])
        (grad,) = torch.autograd.grad(out, src, torch.ones_like(out))
    assert (grad[rows - 2 :] == 1).all()
    assert int(grad[: rows - 2].sum()) == width  # one element per column in segment 0
