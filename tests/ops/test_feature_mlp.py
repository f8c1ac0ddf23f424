"""fastcore.ops.feature_mlp (the feature_mlp operator and its backward) against
fastcore.reference and torch's own layers."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastcore import ops, reference, use_backend
from fastcore.testing import (
    assert_close,
    assert_same_across_threads,
    backend_dtype_params,
    backend_params,
    randn,
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (..., F, H) and K: the compiled widths (H 8 and 16 with K = 2H, 4H), a width that runs
# the general loops (H 5, H 4), K neither 2H nor 4H, row counts that leave a remainder
# after the blocks of rows, and the basin model's fine level
SHAPES = [
    ((3, 4, 5, 8), 16),
    ((2, 7, 3, 8), 32),
    ((5, 2, 16), 32),
    ((3, 16), 64),
    ((2, 7, 3, 5), 10),
    ((6, 2, 4), 8),
    ((5, 3, 8), 24),
    ((1, 21, 33, 5, 8), 16),
]


def inputs(shape, inner, dtype, device="cpu", seed=0):
    feats, hidden = shape[-2:]
    h = randn(shape, dtype, device, seed)
    w1 = randn((feats, hidden, inner), dtype, device, seed + 1) * hidden**-0.5
    b1 = randn((feats, inner), dtype, device, seed + 2)
    w2 = randn((feats, inner, hidden), dtype, device, seed + 3) * inner**-0.5
    b2 = randn((feats, hidden), dtype, device, seed + 4)
    return [h, w1, b1, w2, b2]


def by_layers(h, w1, b1, w2, b2):
    """The definition with torch's matmul and GELU, one feature at a time."""
    out = []
    for f in range(h.shape[-2]):
        u = F.gelu(h[..., f, :] @ w1[f] + b1[f])
        out.append(h[..., f, :] + u @ w2[f] + b2[f])
    return torch.stack(out, -2)


@pytest.mark.parametrize(("shape", "inner"), SHAPES)
@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("feature_mlp", FLOATS)
)
def test_matches_torch_layers(device, backend, dtype, shape, inner):
    args = inputs(shape, inner, dtype, device)
    with use_backend(backend):
        out = ops.feature_mlp(*args)
    expected = by_layers(*(a.double() for a in args))
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"feature_mlp {backend}")


@pytest.mark.parametrize(("shape", "inner"), SHAPES[:6])
@pytest.mark.parametrize(
    ("device", "backend", "dtype"),
    backend_dtype_params("feature_mlp", [torch.float64, torch.float32]),
)
def test_gradients_match_torch_layers(device, backend, dtype, shape, inner):
    args = [a.requires_grad_() for a in inputs(shape, inner, dtype, device, seed=7)]
    grad = randn(shape, dtype, device, seed=20)
    with use_backend(backend):
        got = torch.autograd.grad(ops.feature_mlp(*args), args, grad)
    ref = [a.detach().double().requires_grad_() for a in args]
    want = torch.autograd.grad(by_layers(*ref), ref, grad.double())
    for name, g, e in zip(("h", "w1", "b1", "w2", "b2"), got, want, strict=True):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"grad {name}")


@pytest.mark.parametrize("hidden", [1, 8])
def test_gelu_matches_torch_over_its_range(hidden):
    """The kernel's float32 erf and exp (its own vectorisable ones) against torch's GELU,
    from deep in the negative tail (exp underflows) to large positive values, with the
    weights set so that the hidden layer is the input itself: H = 1 runs the general
    loops, H = 8 (K = 16) the vector kernels, whose second half of the hidden layer
    repeats the first and is read by no output."""
    z = torch.linspace(-30.0, 30.0, 20000)
    h = z.reshape(-1, 1, hidden)
    eye = torch.eye(hidden)
    w1 = eye[None] if hidden == 1 else torch.cat([eye, eye], 1)[None]
    w2 = eye[None] if hidden == 1 else torch.cat([eye, torch.zeros(hidden, hidden)], 0)[None]
    inner = w1.shape[2]
    args = [h.requires_grad_(), w1, torch.zeros(1, inner), w2, torch.zeros(1, hidden)]
    grad = torch.ones_like(h)
    with use_backend("cpu"):
        out = ops.feature_mlp(*args)
        (d_h,) = torch.autograd.grad(out, [h], grad)
    zd = z.double().requires_grad_()
    gelu = F.gelu(zd)
    (slope,) = torch.autograd.grad(gelu.sum(), [zd])
    assert_close((out - h).flatten().detach(), gelu, torch.float32, "gelu")
    assert_close((d_h - 1).flatten(), slope, torch.float32, "gelu slope")
    assert torch.isfinite(d_h).all()


@pytest.mark.parametrize("inner", [16, 32])
def test_rows_same_bits_in_a_block_or_alone(inner):
    # float32 with H = 8 runs in blocks of 4 (K = 16) or 2 (K = 32) rows forward, 2 or 1
    # backward (on AVX-512: 8 or 4 forward, 6 or 3 backward), the rows left over one at a
    # time: a row must give the same bits either way, forward and backward (where a block
    # starts depends on the thread count's split of the rows).
    h, w1, b1, w2, b2 = inputs((11, 3, 8), inner, torch.float32, seed=70)
    grad = randn((11, 3, 8), torch.float32, "cpu", 71)
    backward = torch.ops.fastcore.feature_mlp_backward.default
    with use_backend("cpu"):
        out = ops.feature_mlp(h, w1, b1, w2, b2)
        dh = backward(grad, h, w1, b1, w2)[0]
        for m in range(11):
            one = ops.feature_mlp(h[m : m + 1], w1, b1, w2, b2)
            assert torch.equal(out[m : m + 1], one), m
            assert torch.equal(
                dh[m : m + 1], backward(grad[m : m + 1], h[m : m + 1], w1, b1, w2)[0]
            ), m


_BOTH_WIDTHS = """
import sys, torch
from fastcore import use_backend
g = torch.Generator().manual_seed(5)
out = []
for shape, inner in [((4, 21, 33, 5, 8), 16), ((13, 3, 8), 32), ((7, 2, 8), 16), ((9, 4, 8), 8)]:
    feats = shape[-2]
    h = torch.randn(shape, generator=g) * 2
    w1, b1 = torch.randn(feats, 8, inner, generator=g), torch.randn(feats, inner, generator=g)
    w2, b2 = torch.randn(feats, inner, 8, generator=g), torch.randn(feats, 8, generator=g)
    grad = torch.randn(shape, generator=g)
    with use_backend("cpu"):
        out.append(torch.ops.fastcore.feature_mlp(h, w1, b1, w2, b2))
        out.extend(torch.ops.fastcore.feature_mlp_backward(grad, h, w1, b1, w2))
torch.save(out, sys.argv[1])
"""


def test_avx512_kernels_same_bits_as_avx2(tmp_path):
    # On a CPU with AVX-512 the float32 H = 8 kernels with K a multiple of 16 hold 16 lanes
    # of K per register; FASTCORE_AVX512=0 keeps the 8-lane kernels. Every lane does the same
    # arithmetic in the same order: the same bits, forward and backward (on a CPU without
    # AVX-512 both runs take the 8-lane kernels).
    results = []
    for name, env in (("narrow", {"FASTCORE_AVX512": "0"}), ("default", {})):
        environment = {k: v for k, v in os.environ.items() if k != "FASTCORE_AVX512"}
        environment.update(env)
        path = tmp_path / f"{name}.pt"
        proc = subprocess.run(
            [sys.executable, "-c", _BOTH_WIDTHS, str(path)],
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        results.append(torch.load(path))
    narrow, default = results
    assert len(narrow) == len(default) == 4 * 6
    for a, b in zip(narrow, default, strict=True):
        assert torch.equal(a, b)


def test_gradcheck_to_second_order():
    args = [a.requires_grad_() for a in inputs((2, 3, 3, 4), 6, torch.float64, seed=9)]
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.feature_mlp, args)
        assert torch.autograd.gradgradcheck(ops.feature_mlp, args)


def test_opcheck():
    args = [a.requires_grad_() for a in inputs((2, 3, 4, 8), 16, torch.float32, seed=11)]
    torch.library.opcheck(torch.ops.fastcore.feature_mlp, tuple(args))
    grad = randn((2, 3, 4, 8), torch.float32, "cpu", seed=12)
    # the backward operator is not differentiated itself: a create_graph backward of the
    # forward differentiates the reference composite instead
    h, w1, b1, w2, _ = (a.detach() for a in args)
    torch.library.opcheck(torch.ops.fastcore.feature_mlp_backward, (grad, h, w1, b1, w2))


@pytest.mark.parametrize(("shape", "inner"), [((4, 21, 215, 5, 8), 16), ((3, 50, 5, 7), 9)])
def test_deterministic_whatever_the_thread_count(shape, inner):
    args = [a.requires_grad_() for a in inputs(shape, inner, torch.float32, seed=13)]
    grad = randn(shape, torch.float32, "cpu", seed=14)

    def run():
        with use_backend("cpu"):
            out = ops.feature_mlp(*args)
            return (out, *torch.autograd.grad(out, args, grad))

    assert_same_across_threads(run)


@pytest.mark.parametrize(("device", "backend"), backend_params("feature_mlp"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    args = [a.requires_grad_() for a in inputs((2, 3, 4, 8), 16, torch.float32, device, seed=15)]

    def loss(*a):
        return ops.feature_mlp(*a).square().sum()

    with use_backend(backend):
        value = torch.compile(loss, fullgraph=True)(*args)
        grads = torch.autograd.grad(value, args)
        eager = loss(*args)
        expected = torch.autograd.grad(eager, args)
    assert_close(value, eager, torch.float32, "compiled value")
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, torch.float32, "compiled grad")


def test_reference_is_the_definition():
    args = inputs((3, 2, 4, 6), 12, torch.float64, seed=16)
    assert_close(reference.feature_mlp(*args), by_layers(*args), torch.float64, "reference")


def test_empty_rows():
    args = [a.requires_grad_() for a in inputs((0, 3, 8), 16, torch.float32, seed=18)]
    with use_backend("cpu"):
        out = ops.feature_mlp(*args)
        grads = torch.autograd.grad(out.sum(), args)
    assert out.shape == (0, 3, 8)
    for g in grads[1:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_bad_input_is_named():
    h, w1, b1, w2, b2 = inputs((2, 3, 4, 8), 16, torch.float32, seed=17)
    with pytest.raises(ValueError, match=r"w1 must be \(4, 8, K\), got \(4, 8\)"):
        ops.feature_mlp(h, w1[..., 0], b1, w2, b2)
    with pytest.raises(ValueError, match=r"w1 must be \(4, 8, 16\), got \(3, 8, 16\)"):
        ops.feature_mlp(h, w1[:3], b1, w2, b2)
    with pytest.raises(ValueError, match=r"b1 must be \(4, 16\), got \(4, 8\)"):
        ops.feature_mlp(h, w1, b1[:, :8], w2, b2)
    with pytest.raises(ValueError, match=r"w2 must be \(4, 16, 8\), got \(4, 8, 16\)"):
        ops.feature_mlp(h, w1, b1, w1, b2)
    with pytest.raises(ValueError, match=r"b2 must be \(4, 8\), got \(8,\)"):
        ops.feature_mlp(h, w1, b1, w2, b2[0])
    with pytest.raises(TypeError, match=r"w2 dtype torch\.float64 must equal"):
        ops.feature_mlp(h, w1, b1, w2.double(), b2)
    with pytest.raises(ValueError, match=r"h must be \(\.\.\., F, H\)"):
        ops.feature_mlp(h[0, 0, 0], w1, b1, w2, b2)
    with pytest.raises(TypeError, match=r"src dtype torch\.int64"):
        ops.feature_mlp(h.long(), w1, b1, w2, b2)
