"""fastcore.ops.gather (and its backward, the csr_sum operator) on every backend."""

import pytest
import torch

import fastcore
from fastcore import ops, reference, use_backend
from fastcore.ops import index_csr
from fastcore.testing import (
    assert_close,
    backend_dtype_params,
    backend_params,
    randint,
    randn,
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (src shape, dim, index length, index kind)
CASES = {
    "basins": ((2, 12, 400, 64), -2, 400, "random"),  # (B*T, N, H) with N = 400 fine basins
    "btnfh": ((3, 5, 123, 7, 16), -3, 41, "random"),  # (B, T, N, F, H), node dim -3
    "dim0": ((31, 6), 0, 29, "random"),
    "last_dim": ((5, 11, 3), -1, 17, "random"),  # inner = 1
    "one_d": ((7,), 0, 13, "random"),
    "single": ((13, 1), 0, 1, "random"),
    "sorted": ((3, 97, 5), 1, 131, "sorted"),
    "one_value": ((2, 3, 17, 5), 2, 64, "constant"),  # one huge segment, the rest empty
    "empty_index": ((4, 9, 3), 1, 0, "random"),
    "empty_outer": ((0, 5, 3), 1, 4, "random"),
    "empty_src": ((4, 0, 3), 1, 0, "random"),
}


def make_index(size, length, kind, dtype, device, seed):
    index = randint(size, (length,), dtype, device, seed)
    if kind == "sorted":
        index = index.sort().values
    elif kind == "constant" and length:
        index = torch.full_like(index, size // 2)
    return index


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("gather", FLOATS))
def test_matches_reference(device, backend, dtype, case, index_dtype):
    shape, dim, length, kind = CASES[case]
    src = randn(shape, dtype, device, seed=1).requires_grad_()
    index = make_index(shape[dim], length, kind, index_dtype, device, seed=2)
    with use_backend(backend):
        out = ops.gather(src, index, dim)
    # Forward is a copy: exact in every dtype.
    assert torch.equal(out, src.detach().index_select(dim, index.long()))

    upstream = randn(out.shape, dtype, device, seed=3)
    (grad,) = torch.autograd.grad(out, src, upstream)
    src64 = src.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference.gather(src64, index, dim), src64, upstream.double())
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, dtype, f"grad {backend} {case}")


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_integer_src(device, backend):
    src = randint(1000, (6, 23, 4), torch.int64, device, seed=4)
    index = randint(23, (31,), torch.int32, device, seed=5)
    with use_backend(backend):
        out = ops.gather(src, index, 1)
    assert torch.equal(out, src.index_select(1, index.long()))


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_non_contiguous(device, backend):
    src = randn((9, 6, 13), torch.float32, device, seed=6).transpose(0, 2)  # (13, 6, 9)
    index = randint(6, (40,), torch.int64, device, seed=7)[::2]  # strided index
    assert not src.is_contiguous() and not index.is_contiguous()
    src.requires_grad_()
    with use_backend(backend):
        out = ops.gather(src, index, 1)
    assert torch.equal(out, src.detach().index_select(1, index))
    upstream = randn(out.shape, torch.float32, device, seed=8)
    (grad,) = torch.autograd.grad(out, src, upstream)
    src64 = src.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(src64.index_select(1, index), src64, upstream.double())
    assert_close(grad, ref, torch.float32, "non-contiguous grad")


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_gradcheck_and_gradgradcheck(device, backend):
    src = randn((2, 5, 3), torch.float64, device, seed=9).requires_grad_()
    index = torch.tensor([4, 0, 4, 2, 4, 1], device=device)  # duplicates and a gap (row 3)
    with use_backend(backend):
        fn = lambda s: ops.gather(s, index, 1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (src,))
        assert torch.autograd.gradgradcheck(fn, (src,))


@pytest.mark.parametrize("outer", [3, 1])
@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_backward_is_deterministic(device, backend, outer):
    # Many duplicates in float32: any change of summation order changes the bits. With
    # outer = 3 the CPU kernel sums by slab on one thread and by segment on two: both
    # orders must give the same bits.
    src = randn((outer, 50, 33), torch.float32, device, seed=10).requires_grad_()
    index = randint(5, (4000,), torch.int64, device, seed=11)
    upstream = randn((outer, 4000, 33), torch.float32, device, seed=12)
    grads = []
    threads = torch.get_num_threads()
    try:
        with use_backend(backend):
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                (grad,) = torch.autograd.grad(ops.gather(src, index, 1), src, upstream)
                grads.append(grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def _op_pairs(device):
    pairs = []
    for backend in fastcore.testing.backends_for("gather", device):
        if backend == "triton":
            pairs.append((torch.ops.fastcore.gather_triton, torch.ops.fastcore.csr_sum_triton))
        elif backend in ("cpu", "cuda"):
            pairs.append((torch.ops.fastcore.gather, torch.ops.fastcore.csr_sum))
    return pairs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    pairs = _op_pairs(device)
    assert pairs, "no compiled or Triton backend to check"
    src = randn((3, 7, 4), torch.float32, device, seed=13).requires_grad_()
    index = torch.tensor([6, 0, 3, 3], device=device)
    perm, ptr = index_csr(index, 7)
    grad = randn((3, 4, 4), torch.float32, device, seed=14).requires_grad_()
    for gather_op, csr_sum_op in pairs:
        torch.library.opcheck(gather_op, (src, index, 1, True))
        torch.library.opcheck(gather_op, (src, index.int(), 1, False))
        torch.library.opcheck(csr_sum_op, (grad, perm, ptr, 1, True))
        segments = torch.tensor([0, 1, 1, 4], device=device)
        torch.library.opcheck(csr_sum_op, (grad, None, segments, 1, True))


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    src = randn((2, 6, 11, 8), torch.float32, device, seed=15).requires_grad_()
    index = randint(11, (19,), torch.int64, device, seed=16)

    def loss(s):
        return (ops.gather(s, index, -2).sin() * 3).sum()

    # Inductor for the compiled kernels; aot_eager for the interpreted Triton path
    # (same graph capture, no C++ code generation around interpreted kernels).
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend=compiler)
        value = compiled(src)
        (grad,) = torch.autograd.grad(value, src)
        expected = loss(src)
        (expected_grad,) = torch.autograd.grad(expected, src)
    assert_close(value, expected, torch.float32, "compiled value")
    assert_close(grad, expected_grad, torch.float32, "compiled grad")


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_bad_index_values(device, backend):
    src = randn((3, 7, 4), torch.float32, device, seed=17)
    with use_backend(backend):
        with pytest.raises(IndexError, match=r"value 7 is out of range for dimension 1 of size 7"):
            ops.gather(src, torch.tensor([0, 7, 2], device=device), 1)
        with pytest.raises(IndexError, match=r"negative value -3"):
            ops.gather(src, torch.tensor([0, -3], device=device), -2)
        with pytest.raises(IndexError, match=r"value 0 is out of range for dimension 1 of size 0"):
            ops.gather(src[:, :0], torch.tensor([0], device=device), 1)


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_bad_arguments(device, backend):
    src = randn((3, 7, 4), torch.float32, device, seed=18)
    index = torch.tensor([1, 2], device=device)
    with use_backend(backend):
        with pytest.raises(TypeError, match=r"index must be int32 or int64, got torch\.float32"):
            ops.gather(src, index.float(), 1)
        with pytest.raises(ValueError, match=r"index must be 1-D, got shape \(1, 2\)"):
            ops.gather(src, index[None], 1)
        with pytest.raises(IndexError, match="dim 3 is out of range for a tensor of 3 dimensions"):
            ops.gather(src, index, 3)
        with pytest.raises(TypeError, match=r"src dtype torch\.complex64 is not supported"):
            ops.gather(src.to(torch.complex64), index, 1)
        with pytest.raises(TypeError, match="index must be a tensor, got list"):
            ops.gather(src, [1, 2], 1)


@pytest.mark.gpu
def test_device_mismatch():
    src = randn((3, 7, 4), torch.float32, "cuda", seed=19)
    with pytest.raises(ValueError, match="index is on cpu but src is on cuda"):
        ops.gather(src, torch.tensor([1, 2]), 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_operators_validate_before_running(device):
    """The registered operators check their own inputs (check=True) with clear errors."""
    src = randn((2, 6, 3), torch.float32, device, seed=20)
    for gather_op, csr_sum_op in _op_pairs(device):
        with pytest.raises(IndexError, match="value 6 is out of range"):
            gather_op(src, torch.tensor([6], device=device), 1, True)
        perm = torch.tensor([0, 1, 2, 3, 4, 5], device=device)
        cases = [
            (torch.tensor([1, 6], device=device), perm, r"ptr\[0\] must be 0, got 1"),
            (
                torch.tensor([0, 4, 2, 6], device=device),
                perm,
                r"non-decreasing, got ptr\[1\]=4 > ptr\[2\]=2",
            ),
            (
                torch.tensor([0, 5], device=device),
                perm,
                r"ptr\[-1\] must equal the size 6 of dimension 1, got 5",
            ),
            (torch.tensor([0, 6], device=device), perm.flip(0)[:5], "perm must be 1-D of length 6"),
            (torch.tensor([0, 6], device=device), perm.clamp(max=4), "perm must be a permutation"),
        ]
        for ptr, p, message in cases:
            with pytest.raises(ValueError, match=message):
                csr_sum_op(src, p, ptr, 1, True)
        with pytest.raises(IndexError, match="perm value 9 is out of range"):
            csr_sum_op(
                src,
                torch.tensor([0, 1, 2, 3, 4, 9], device=device),
                torch.tensor([0, 6], device=device),
                1,
                True,
            )


@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("gather", FLOATS))
def test_csr_sum_matches_reference(device, backend, dtype):
    """The backward operator on its own, including empty segments and no permutation."""
    op = torch.ops.fastcore.csr_sum_triton if backend == "triton" else torch.ops.fastcore.csr_sum
    if backend == "reference":
        op = lambda s, p, q, d, c: reference.csr_sum(s, p, q, d)  # noqa: E731
    src = randn((3, 29, 10), dtype, device, seed=21)
    ptr = torch.tensor([0, 0, 5, 5, 6, 20, 29, 29], device=device)
    perm = torch.randperm(29, generator=torch.Generator().manual_seed(22)).to(device)
    for p in (perm, None):
        out = op(src, p, ptr, 1, True)
        rows = src.double() if p is None else src.double().index_select(1, p)
        expected = torch.stack(
            [rows[:, a:b].sum(1) for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True)],
            1,
        )
        assert_close(out, expected, dtype, f"csr_sum {backend} perm={p is not None}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("outer", [1, 3])
def test_cpu_large_output_paths(outer, dtype):
    # Outputs of 32 MB or more are written with streaming stores: exactly index_select's
    # rows (zeros where an unchecked index is out of range), one slab or several.
    src = randn((outer, 20_000, 64), dtype, "cpu", seed=31)
    rows = (36 << 20) // (outer * 64 * src.element_size())  # output of at least 32 MB
    index = randint(20_000, (rows,), torch.int64, "cpu", seed=32)
    index[::997] = 20_000  # out of range (check=False): zero rows
    with use_backend("cpu"):
        out = ops.gather(src, index, 1, check=False)
    expected = src.index_select(1, index.clamp_max(19_999))
    expected[:, index == 20_000] = 0
    assert out.nbytes >= 32 << 20 and torch.equal(out, expected)


def test_int64_addressing():
    """More than 2**31 elements: offsets past 2**31 must not wrap (CPU kernel)."""
    torch.use_deterministic_algorithms(False)  # no NaN fill of 4 GiB
    rows, width = 2**20 + 3, 2048  # 2**31 + 6144 float16 elements, 4 GiB
    src = torch.empty(rows, width, dtype=torch.float16)  # pages stay untouched but for:
    src[-2:] = randn((2, width), torch.float16, "cpu", seed=23)
    src[:1] = randn((1, width), torch.float16, "cpu", seed=24)
    index = torch.tensor([rows - 1, 0, rows - 2, rows - 1])
    with use_backend("cpu"):
        out = ops.gather(src, index, 0)
        assert torch.equal(out, torch.stack([src[rows - 1], src[0], src[rows - 2], src[rows - 1]]))
        grad = torch.ops.fastcore.csr_sum(out, *index_csr(index, rows), 0, False)
    assert torch.equal(grad[rows - 1], (src[rows - 1].float() * 2).half())
    assert torch.equal(grad[rows - 2], src[rows - 2]) and torch.equal(grad[0], src[0])
    assert not grad[1 : rows - 2].any()


@pytest.mark.parametrize(
    "case", ["basins", "btnfh", "dim0", "last_dim", "one_value", "empty_index"]
)
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("gather_add", FLOATS))
def test_gather_add_matches_reference(device, backend, dtype, case):
    shape, dim, length, kind = CASES[case]
    src = randn(shape, dtype, device, seed=30).requires_grad_()
    index = make_index(shape[dim], length, kind, torch.int64, device, seed=31)
    out_shape = list(shape)
    out_shape[dim] = length
    base = randn(out_shape, dtype, device, seed=32).requires_grad_()
    with use_backend(backend):
        out = ops.gather_add(src, index, base, dim)
    expected = base.detach().double() + src.detach().double().index_select(dim, index)
    assert_close(out, expected, dtype, f"gather_add {backend} {case}")
    if out.numel():
        upstream = randn(out.shape, dtype, device, seed=33)
        grad_src, grad_base = torch.autograd.grad(out, (src, base), upstream)
        assert torch.equal(grad_base, upstream)
        src64 = src.detach().double().requires_grad_()
        (ref,) = torch.autograd.grad(src64.index_select(dim, index), src64, upstream.double())
        assert_close(grad_src, ref, dtype, f"gather_add grad {backend} {case}")


@pytest.mark.parametrize(("device", "backend"), backend_params("gather_add"))
def test_gather_add_checks_and_compiles(device, backend):
    torch._dynamo.reset()
    src = randn((2, 7, 3), torch.float64, device, seed=34).requires_grad_()
    index = torch.tensor([6, 0, 6, 2], device=device)
    base = randn((2, 4, 3), torch.float64, device, seed=35).requires_grad_()
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with use_backend(backend):
        fn = lambda s, b: ops.gather_add(s, index, b, 1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (src, base))
        assert torch.autograd.gradgradcheck(fn, (src, base))
        compiled = torch.compile(
            lambda s, b: fn(s, b).sin().sum(), fullgraph=True, backend=compiler
        )
        assert_close(compiled(src, base), fn(src, base).sin().sum(), torch.float64, "compiled")
        with pytest.raises(IndexError, match="value 7 is out of range for dimension 1 of size 7"):
            ops.gather_add(src, torch.tensor([7, 0, 1, 2], device=device), base, 1)
        with pytest.raises(ValueError, match=r"base has shape \(2, 3, 3\), expected \(2, 4, 3\)"):
            ops.gather_add(src, index, base[:, :3], 1)
        with pytest.raises(TypeError, match=r"base \(torch\.float32 on \w+\) must match src"):
            ops.gather_add(src, index, base.float(), 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gather_add_opcheck(device):
    src = randn((3, 7, 4), torch.float32, device, seed=36).requires_grad_()
    base = randn((3, 4, 4), torch.float32, device, seed=37).requires_grad_()
    index = torch.tensor([6, 0, 3, 3], device=device)
    ops_here = [torch.ops.fastcore.gather_add_triton] if fastcore._backend.HAS_TRITON else []
    if device == "cpu" and fastcore._backend._C is not None:
        ops_here.append(torch.ops.fastcore.gather_add)
    assert ops_here, "no compiled or Triton backend to check"
    for op in ops_here:
        torch.library.opcheck(op, (src, index, base, 1, True))
        torch.library.opcheck(op, (src, index.int(), base, 1, False))
