"""The whole spatiotemporal block: fastcore vs the per-time-step loop it replaces.

``SpatioTemporalBlock`` on ``(B, T, N, F, H)``, forward and forward+backward (gradients for
the input and every parameter), against the per-time-step loop of the original design
(``fastcore.reference.spatiotemporal_block``, the baseline), the block on the reference
backend (index_select + index_add_ messages) and ``torch.compile`` of each. fastcore's
ops are ``torch.compile``-clean, so ``torch.compile(fastcore.<backend>)`` is the block as a
user compiles it: Inductor fuses the elementwise work around the spmm kernels.
"""

from __future__ import annotations

import pytest
import torch

import fastcore
from fastcore import Graph, reference
from fastcore.nn import SpatioTemporalBlock
from fastcore.testing import backends_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (B, T, N, F, H); the grid is cut to these on the CPU (see test_bench_spmm.py).
BLOCK_CASES = [(8, 24, 400, 5, 32), (8, 96, 400, 5, 32)]
if CUDA:
    BLOCK_CASES += [(32, 96, 1_000, 10, 64)]

_BACKENDS = [
    b
    for b in backends_for("spmm", DEVICE)
    if b != "reference" and not (b == "triton" and DEVICE == "cpu")
]
BLOCK_PROVIDERS = [
    *(f"fastcore.{b}" for b in _BACKENDS),
    *(f"torch.compile(fastcore.{b})" for b in _BACKENDS),
    "fastcore.reference",
    "torch.compile(fastcore.reference)",
    "loop over time steps",
]


def block_label(case):
    b, t, n, f, h = case
    return f"B{b}xT{t}xN{n}xF{f}xH{h}"


def block_fn(provider, block, x, river, causal):
    if provider == "loop over time steps":
        return lambda: reference.spatiotemporal_block(block, x, river, causal)
    compiled = provider.startswith("torch.compile(")
    backend = provider.removeprefix("torch.compile(").removesuffix(")").removeprefix("fastcore.")
    model = torch.compile(block, dynamic=False) if compiled else block

    def run():
        with fastcore.use_backend(backend):
            return model(x, river, causal)

    return run


def make_block_inputs(case):
    b, t, n, f, h = case
    g = torch.Generator().manual_seed(2)
    river_edges = torch.randint(0, n, (2, 3 * n), generator=g)
    river = Graph(river_edges, n, edge_attr=torch.rand(3 * n, 3, generator=g)).to(DEVICE)
    causal = Graph(torch.randint(0, n * f, (2, 4 * n * f), generator=g), n * f).to(DEVICE)
    torch.manual_seed(4)
    block = SpatioTemporalBlock(f, h, river_edge_dim=3).to(DEVICE)
    x = torch.randn(b, t, n, f, h, generator=g).to(DEVICE)
    return block, x, river, causal


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    ("case", "provider"),
    [pytest.param(c, p, id=f"{block_label(c)}-{p}") for c in BLOCK_CASES for p in BLOCK_PROVIDERS],
)
def test_block(run, case, provider, direction):
    block, x, river, causal = make_block_inputs(case)
    forward = block_fn(provider, block, x, river, causal)
    if direction == "fwd+bwd":
        x.requires_grad_()
        params = [x, *block.parameters()]
        upstream = torch.randn_like(x)
        fn = lambda: torch.autograd.grad(forward(), params, upstream)  # noqa: E731
    else:
        fn = forward
    run(
        fn,
        DEVICE,
        op="block",
        direction=direction,
        provider=provider,
        shape=block_label(case),
        # the input read and the output written (fwd), three times over with the backward
        bytes=(2 if direction == "fwd" else 6) * x.numel() * x.element_size(),
        baseline=provider == "loop over time steps",
    )
