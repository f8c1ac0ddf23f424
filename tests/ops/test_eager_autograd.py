"""The operators' eager autograd path (fastcore.ops._autograd.call) against torch.library's
registration: the same outputs and gradients, bit for bit, and gradients of gradients."""

from __future__ import annotations

import pytest
import torch

from fastcore import Graph, ops, use_backend
from fastcore.ops import _autograd


def _f64(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def _cases():
    graph = Graph(torch.tensor([[0, 1, 2, 4, 3], [1, 2, 0, 0, 4]]), num_nodes=5)
    index = torch.tensor([0, 4, 2, 2, 1, 0, 3])
    return {
        "spmm": (lambda x, w: ops.spmm(x, graph, w, dim=2, residual=True), ((2, 3, 5, 4), (5,))),
        "time_conv": (lambda x, w, b: ops.time_conv(x, w, b), ((2, 6, 3, 4), (3, 4), (4,))),
        "linear_norm_residual": (
            lambda h, x, w, b, g, be: ops.linear_norm_residual(h, x, w, b, g, be, 0.5),
            ((2, 3, 2, 4), (2, 3, 2, 4), (2, 4, 4), (2, 4), (2, 4), (2, 4)),
        ),
        "feature_mlp": (ops.feature_mlp, ((2, 3, 2, 4), (2, 4, 8), (2, 8), (2, 8, 4), (2, 4))),
        "gather": (lambda s: ops.gather(s, index, dim=1), ((2, 5, 3),)),
        "gather_add": (lambda s, b: ops.gather_add(s, index, b, dim=1), ((2, 5, 3), (2, 7, 3))),
        "scatter": (lambda s: ops.scatter(s, index, dim=1, dim_size=6), ((2, 7, 3),)),
    }


CASES = _cases()


def _run(fn, shapes):
    inputs = [_f64(*s, seed=i) for i, s in enumerate(shapes)]
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return out, torch.autograd.grad(out, inputs, upstream), type(out.grad_fn).__name__


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_path_is_the_registration_bit_for_bit(name, monkeypatch):
    fn, shapes = CASES[name]
    with use_backend("cpu"):
        out, grads, node = _run(fn, shapes)
        monkeypatch.setattr(_autograd, "_EAGER", {})  # every call through the registration
        want, want_grads, registered = _run(fn, shapes)
    assert node.startswith("Eager_") and not registered.startswith("Eager_"), (node, registered)
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("name", ["spmm", "time_conv", "gather_add"])
def test_eager_path_has_gradients_of_gradients(name):
    fn, shapes = CASES[name]
    inputs = [_f64(*s, seed=i) for i, s in enumerate(shapes)]
    with use_backend("cpu"):
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_no_grad_and_inputs_without_grad_call_the_operator():
    x = torch.randn(2, 6, 3, 4)
    w = torch.randn(3, 4, requires_grad=True)
    with use_backend("cpu"):
        assert ops.time_conv(x, w.detach()).grad_fn is None
        with torch.no_grad():
            assert ops.time_conv(x, w).grad_fn is None
        assert type(ops.time_conv(x, w).grad_fn).__name__.startswith("Eager_")
