"""fastcore.ops.linear_norm_residual (the linear_norm_residual operator and its backward)
against fastcore.reference and torch's own layers."""

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
SHAPES = [(3, 4, 5, 8), (2, 7, 3, 5), (6, 2, 16), (4, 32), (1, 21, 33, 5, 8)]  # (..., F, H)


def inputs(shape, dtype, device="cpu", seed=0):
    feats, hidden = shape[-2:]
    h = randn(shape, dtype, device, seed)
    x = randn(shape, dtype, device, seed + 1)
    weight = randn((feats, hidden, hidden), dtype, device, seed + 2) * hidden**-0.5
    bias, gamma, beta = (randn((feats, hidden), dtype, device, seed + i) for i in (3, 4, 5))
    return [h, x, weight, bias, gamma, beta]


def by_layers(h, x, weight, bias, gamma, beta, res_scale, eps=1e-5):
    """The definition with torch's per-feature matmul and layer_norm, one feature at a time."""
    out = []
    for f in range(h.shape[-2]):
        z = h[..., f, :] @ weight[f] + bias[f]
        y = F.layer_norm(z, (h.shape[-1],), eps=eps) * gamma[f] + beta[f]
        out.append(x[..., f, :] + res_scale * y)
    return torch.stack(out, -2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("linear_norm_residual", FLOATS)
)
def test_matches_torch_layers(device, backend, dtype, shape):
    args = inputs(shape, dtype, device)
    with use_backend(backend):
        out = ops.linear_norm_residual(*args, 0.5)
    expected = by_layers(*(a.double() for a in args), 0.5)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, f"linear_norm_residual {backend}")


@pytest.mark.parametrize("shape", [(3, 4, 5, 8), (2, 6, 3, 5)])
@pytest.mark.parametrize(
    ("device", "backend", "dtype"),
    backend_dtype_params("linear_norm_residual", [torch.float64, torch.float32]),
)
def test_gradients_match_torch_layers(device, backend, dtype, shape):
    args = [a.requires_grad_() for a in inputs(shape, dtype, device, seed=7)]
    grad = randn(shape, dtype, device, seed=20)
    with use_backend(backend):
        got = torch.autograd.grad(ops.linear_norm_residual(*args, 0.7), args, grad)
    ref = [a.detach().double().requires_grad_() for a in args]
    want = torch.autograd.grad(by_layers(*ref, 0.7), ref, grad.double())
    for name, g, e in zip(("h", "x", "weight", "bias", "gamma", "beta"), got, want, strict=True):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"grad {name}")


def test_gradcheck_to_second_order():
    args = [a.requires_grad_() for a in inputs((2, 3, 3, 4), torch.float64, seed=9)]

    def fn(*a):
        return ops.linear_norm_residual(*a, 0.5)

    with use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_opcheck():
    args = [a.requires_grad_() for a in inputs((2, 3, 4, 8), torch.float32, seed=11)]
    torch.library.opcheck(torch.ops.fastcore.linear_norm_residual, (*args, 0.5, 1e-5))
    grad = randn((2, 3, 4, 8), torch.float32, "cpu", seed=12)
    # the backward operator is not differentiated itself: a create_graph backward of the
    # forward differentiates the reference composite instead
    h, _, weight, bias, gamma, _ = (a.detach() for a in args)
    torch.library.opcheck(
        torch.ops.fastcore.linear_norm_residual_backward, (grad, h, weight, bias, gamma, 0.5, 1e-5)
    )


def test_deterministic_whatever_the_thread_count():
    args = [a.requires_grad_() for a in inputs((4, 21, 215, 5, 8), torch.float32, seed=13)]
    grad = randn((4, 21, 215, 5, 8), torch.float32, "cpu", seed=14)

    def run():
        with use_backend("cpu"):
            out = ops.linear_norm_residual(*args, 0.5)
            return (out, *torch.autograd.grad(out, args, grad))

    assert_same_across_threads(run)


@pytest.mark.parametrize(("device", "backend"), backend_params("linear_norm_residual"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    args = [a.requires_grad_() for a in inputs((2, 3, 4, 8), torch.float32, device, seed=15)]

    def loss(*a):
        return ops.linear_norm_residual(*a, 0.5).square().sum()

    with use_backend(backend):
        value = torch.compile(loss, fullgraph=True)(*args)
        grads = torch.autograd.grad(value, args)
        eager = loss(*args)
        expected = torch.autograd.grad(eager, args)
    assert_close(value, eager, torch.float32, "compiled value")
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, torch.float32, "compiled grad")


def test_reference_is_the_definition():
    args = inputs((3, 2, 4, 6), torch.float64, seed=16)
    assert_close(
        reference.linear_norm_residual(*args, 0.3),
        by_layers(*args, 0.3),
        torch.float64,
        "reference",
    )


def test_bad_input_is_named():
    h, x, weight, bias, gamma, beta = inputs((2, 3, 4, 8), torch.float32, seed=17)
    with pytest.raises(ValueError, match=r"weight must be \(4, 8, 8\), got \(4, 8, 4\)"):
        ops.linear_norm_residual(h, x, weight[..., :4], bias, gamma, beta, 0.5)
    with pytest.raises(ValueError, match=r"x must be \(2, 3, 4, 8\)"):
        ops.linear_norm_residual(h, x[:1], weight, bias, gamma, beta, 0.5)
    with pytest.raises(ValueError, match=r"beta must be \(4, 8\), got \(8,\)"):
        ops.linear_norm_residual(h, x, weight, bias, gamma, beta[0], 0.5)
    with pytest.raises(TypeError, match=r"gamma dtype torch\.float64 must equal"):
        ops.linear_norm_residual(h, x, weight, bias, gamma.double(), beta, 0.5)
    with pytest.raises(ValueError, match=r"h must be \(\.\.\., F, H\)"):
        ops.linear_norm_residual(h[0, 0, 0], x, weight, bias, gamma, beta, 0.5)


def test_rows_same_bits_in_a_block_or_alone():
    # float32 with H = 8 goes through transposed kernels in blocks of 8 rows, the rows left
    # over one at a time: a row must give the same bits either way, forward and backward
    # (where a block starts depends on the thread count's split of the rows).
    h, x, weight, bias, gamma, beta = inputs((11, 5, 8), torch.float32, seed=60)
    grad = randn((11, 5, 8), torch.float32, "cpu", 67)
    backward = torch.ops.fastcore.linear_norm_residual_backward.default
    with use_backend("cpu"):
        out = ops.linear_norm_residual(h, x, weight, bias, gamma, beta, 0.5)
        dh = backward(grad, h, weight, bias, gamma, 0.5, 1e-5)[0]
        for m in range(11):
            one = ops.linear_norm_residual(
                h[m : m + 1], x[m : m + 1], weight, bias, gamma, beta, 0.5
            )
            assert torch.equal(out[m : m + 1], one), m
            one_dh = backward(grad[m : m + 1], h[m : m + 1], weight, bias, gamma, 0.5, 1e-5)[0]
            assert torch.equal(dh[m : m + 1], one_dh), m
