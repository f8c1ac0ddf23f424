"""gather: every fastcore backend vs what users run today.

Shapes from the basin model: unpooling parents (N/5 of them) back to N fine basins over
B*T folded rows, ``src (B*T, N/5, H) -> out (B*T, N, H)`` with ``index [N]``.
Forward baseline: ``torch.index_select``; backward baseline: ``index_add_`` (what
``index_select``'s autograd runs); fwd+bwd baseline: ``index_select`` with autograd.
"""

import pytest
import torch

import fastcore
from fastcore import ops, reference
from fastcore.testing import backends_for

# (B*T, N fine basins, H)
SHAPES = [(96, 400, 64), (96, 1000, 320), (768, 400, 64)]
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def fastcore_providers(device):
    # The Triton interpreter is a correctness tool, not a benchmark subject.
    return [b for b in backends_for("gather", device) if not (b == "triton" and device == "cpu")]


def make(shape, dtype, device):
    bt, n, h = shape
    g = torch.Generator().manual_seed(0)
    src = torch.randn(bt, n // 5, h, generator=g).to(device=device, dtype=dtype)
    index = torch.randint(0, n // 5, (n,), generator=g).to(device)
    return src, index


def label(shape, dtype):
    return f"BT{shape[0]}xN{shape[1]}xH{shape[2]}-{str(dtype).removeprefix('torch.')}"


def providers(device, direction):
    baseline = "torch.index_select" if direction != "bwd" else "torch.index_add_"
    return [
        *(f"fastcore.{b}" for b in fastcore_providers(device)),
        "torch.compile(reference)",
        baseline,
    ]


def cases(direction):
    return [
        pytest.param(d, s, t, p, id=f"{d}-{label(s, t)}-{p}")
        for d in DEVICES
        for s in SHAPES
        for t in DTYPES
        for p in providers(d, direction)
    ]


def forward_fn(provider, src, index):
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")
        return lambda s=src: _with(backend, ops.gather, s, index, -2)
    if provider == "torch.compile(reference)":
        compiled = torch.compile(reference.gather, dynamic=False)
        return lambda s=src: compiled(s, index, -2)
    return lambda s=src: torch.index_select(s, -2, index)


def _with(backend, fn, *args):
    with fastcore.use_backend(backend):
        return fn(*args)


@pytest.mark.parametrize(("device", "shape", "dtype", "provider"), cases("fwd"))
def test_forward(run, device, shape, dtype, provider):
    src, index = make(shape, dtype, device)
    moved = 2 * shape[0] * shape[1] * shape[2] * src.element_size() + index.nbytes
    fn = forward_fn(provider, src, index)
    run(
        fn,
        device,
        op="gather",
        direction="fwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider == "torch.index_select",
    )


@pytest.mark.parametrize(("device", "shape", "dtype", "provider"), cases("bwd"))
def test_backward(run, device, shape, dtype, provider):
    src, index = make(shape, dtype, device)
    grad = torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)
    # Read the gradient once, write the source gradient once, read the index.
    moved = (grad.numel() + src.numel()) * src.element_size() + index.nbytes
    if provider == "torch.index_add_":
        fn = lambda: torch.zeros_like(src).index_add_(-2, index, grad)  # noqa: E731
    else:
        src.requires_grad_()
        out = forward_fn(provider, src, index)()
        fn = lambda: torch.autograd.grad(out, src, grad, retain_graph=True)  # noqa: E731
    run(
        fn,
        device,
        op="gather",
        direction="bwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider == "torch.index_add_",
    )


@pytest.mark.parametrize(("device", "shape", "dtype", "provider"), cases("fwd+bwd"))
def test_forward_backward(run, device, shape, dtype, provider):
    src, index = make(shape, dtype, device)
    src.requires_grad_()
    grad = torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)
    forward = forward_fn(provider, src, index)
    # Forward: read + write the output; backward: read its gradient, write src's.
    moved = (3 * grad.numel() + src.numel()) * src.element_size()
    run(
        lambda: torch.autograd.grad(forward(), src, grad),
        device,
        op="gather",
        direction="fwd+bwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider == "torch.index_select",
    )
