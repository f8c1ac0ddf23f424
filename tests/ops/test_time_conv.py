"""fastcore.ops.time_conv (the time_conv / time_conv_weight_grad operators) against
fastcore.reference and against a plain loop over time."""

import pytest
import torch

from fastcore import ops, reference, use_backend
from fastcore.testing import (
    assert_close,
    assert_same_across_threads,
    backend_dtype_params,
    backend_params,
    backends_for,
    randn,
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    ((3, 9, 4, 6), 3),  # (B, T, N, C), K
    ((2, 5, 3, 2, 4), 7),  # 5-D, K > T
    ((2, 1, 3, 5), 4),  # T = 1: only the first tap
    ((1, 21, 215, 40), 7),  # the basin model's fine level, one sample
    ((2, 6, 5), 2),  # 3-D: no middle dims
    ((2, 7, 3, 13), 3),  # C = 13: float32 sums one vector of 8 channels, then 5 alone
    ((2, 14, 3, 12), 10),  # K = 10 > 8: the float32 weight gradient's taps in two groups
]
# the weight gradient's float32 tiles: taps in groups of up to 8, vectors of 8 channels
GRAD_SHAPES = [((3, 8, 5, 6), 4), ((2, 14, 3, 12), 10), ((2, 9, 7, 16), 3), ((2, 3, 4, 8), 5)]


def loop(x, weight, bias, reverse):
    """The definition, one output step at a time."""
    steps = x.shape[1]
    out = []
    for t in range(steps):
        y = torch.zeros_like(x[:, t]) if bias is None else bias.expand_as(x[:, t]).clone()
        for k in range(weight.shape[0]):
            s = t + k if reverse else t - k
            if 0 <= s < steps:
                y = y + weight[k] * x[:, s]
        out.append(y)
    return torch.stack(out, 1)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("shape", "taps"), SHAPES)
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("time_conv", FLOATS))
def test_matches_the_loop(device, backend, dtype, shape, taps, reverse):
    x = randn(shape, dtype, device, seed=1)
    w = randn((taps, shape[-1]), dtype, device, seed=2)
    b = randn((shape[-1],), dtype, device, seed=3)
    with use_backend(backend):
        out = ops.time_conv(x, w, b, reverse=reverse)
        no_bias = ops.time_conv(x, w, reverse=reverse)
    expected = loop(x.double(), w.double(), b.double(), reverse)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"time_conv {backend}")
    assert_close(no_bias, loop(x.double(), w.double(), None, reverse), dtype, "no bias")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("shape", "taps"), GRAD_SHAPES)
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("time_conv", FLOATS))
def test_gradients_match_the_reference(device, backend, dtype, shape, taps, reverse):
    x = randn(shape, dtype, device, seed=4).requires_grad_()
    w = randn((taps, shape[-1]), dtype, device, seed=5).requires_grad_()
    b = randn((shape[-1],), dtype, device, seed=6).requires_grad_()
    grad = randn(shape, dtype, device, seed=7)
    with use_backend(backend):
        got = torch.autograd.grad(ops.time_conv(x, w, b, reverse=reverse), (x, w, b), grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(loop(x64, w64, b64, reverse), (x64, w64, b64), grad.double())
    for name, g, e in zip(("x", "weight", "bias"), got, want, strict=True):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"grad {name}")


# the compiled operators always (make test builds them); the Triton ones where they run on
# CPU tensors (under the interpreter without a GPU)
OPERATOR_BACKENDS = ["cpu", *(["triton"] if "triton" in backends_for("time_conv", "cpu") else [])]


def _operators(backend):
    suffix = "_triton" if backend == "triton" else ""
    return (
        getattr(torch.ops.fastcore, f"time_conv{suffix}"),
        getattr(torch.ops.fastcore, f"time_conv_weight_grad{suffix}"),
    )


@pytest.mark.parametrize("backend", OPERATOR_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_to_second_order(backend, reverse):
    # the Triton interpreter pays per launch: a smaller problem for it
    shape = (2, 6, 3, 4) if backend == "cpu" else (1, 4, 1, 2)
    x = randn(shape, torch.float64, "cpu", seed=8).requires_grad_()
    w = randn((3, shape[-1]), torch.float64, "cpu", seed=9).requires_grad_()
    b = randn((shape[-1],), torch.float64, "cpu", seed=10).requires_grad_()

    def fn(x, w, b):
        return ops.time_conv(x, w, b, reverse=reverse)

    with use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", OPERATOR_BACKENDS)
def test_weight_grad_operator_matches_the_reference(backend):
    weight_grad = _operators(backend)[1]
    g = randn((2, 9, 4, 5), torch.float64, "cpu", seed=11)
    x = randn((2, 9, 4, 5), torch.float64, "cpu", seed=12)
    for reverse in (False, True):
        for taps in (1, 3, 12):
            got = weight_grad(g, x, taps, reverse)
            want = reference.time_conv_weight_grad(g, x, taps, reverse)
            assert_close(got, want, torch.float64, f"weight grad K={taps} reverse={reverse}")


@pytest.mark.parametrize("backend", OPERATOR_BACKENDS)
def test_opcheck(backend):
    conv, weight_grad = _operators(backend)
    x = randn((2, 7, 3, 4), torch.float32, "cpu", seed=13).requires_grad_()
    w = randn((3, 4), torch.float32, "cpu", seed=14).requires_grad_()
    b = randn((4,), torch.float32, "cpu", seed=15).requires_grad_()
    grad = randn((2, 7, 3, 4), torch.float32, "cpu", seed=16).requires_grad_()
    for reverse in (False, True):
        torch.library.opcheck(conv, (x, w, b, reverse))
        torch.library.opcheck(conv, (x, w, None, reverse))
        torch.library.opcheck(weight_grad, (grad, x, 3, reverse))


def test_deterministic_whatever_the_thread_count():
    x = randn((4, 21, 215, 40), torch.float32, "cpu", seed=17).requires_grad_()
    w = randn((7, 40), torch.float32, "cpu", seed=18).requires_grad_()
    grad = randn((4, 21, 215, 40), torch.float32, "cpu", seed=19)

    def run():
        with use_backend("cpu"):
            out = ops.time_conv(x, w)
            return (out, *torch.autograd.grad(out, (x, w), grad))

    assert_same_across_threads(run)


@pytest.mark.parametrize(("device", "backend"), backend_params("time_conv"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    x = randn((2, 6, 3, 4), torch.float32, device, seed=20).requires_grad_()
    w = randn((3, 4), torch.float32, device, seed=21).requires_grad_()

    def loss(x, w):
        return ops.time_conv(x, w).square().sum()

    with use_backend(backend):
        value = torch.compile(loss, fullgraph=True)(x, w)
        grads = torch.autograd.grad(value, (x, w))
        eager = loss(x, w)
        expected = torch.autograd.grad(eager, (x, w))
    assert_close(value, eager, torch.float32, "compiled value")
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, torch.float32, "compiled grad")


def test_bad_input_is_named():
    x = randn((2, 5, 3, 4), torch.float32, "cpu", seed=22)
    w = randn((3, 4), torch.float32, "cpu", seed=23)
    with pytest.raises(ValueError, match=r"at least 3-D, got \(5, 4\)"):
        ops.time_conv(x[0, :, 0], w)
    with pytest.raises(ValueError, match="weight has 3 channels but x's last dim is 4"):
        ops.time_conv(x, w[:, :3])
    with pytest.raises(ValueError, match=r"weight must be \(K >= 1, C\), got \(0, 4\)"):
        ops.time_conv(x, w[:0])
    with pytest.raises(ValueError, match=r"bias must be \(4,\), got \(3,\)"):
        ops.time_conv(x, w, w[0, :3])
    with pytest.raises(TypeError, match=r"weight dtype torch\.float64 must equal"):
        ops.time_conv(x, w.double())
    with pytest.raises(TypeError, match="time_conv"):
        ops.time_conv(x.long(), w)
