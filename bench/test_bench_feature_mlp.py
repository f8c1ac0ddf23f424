"""The basin model's per-feature residual MLP: ``fastcore.ops.feature_mlp`` against the
composite it replaces.

``h + gelu(einsum(h, W1_f) + b1_f) @ W2_f + b2_f`` on ``(B, T, N, F, H)`` with K = 2H;
forward, and forward+backward (gradients for h and the four parameters). Baselines: the
composite as the basin model ran it before this operator (two einsums and the GELU) and
``torch.compile`` of it (Inductor fuses the elementwise work around the matmuls). Shapes:
the basin model's fine level (215 basins, 5 variables, hidden 8, lookback 21) and a wider
one (400 nodes, 5 x 16, 24 steps).
"""

from __future__ import annotations

import pytest
import torch

import fastcore
from fastcore import ops, reference
from fastcore.testing import backends_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [(16, 21, 215, 5, 8), (8, 24, 400, 5, 16)]  # B, T, N, F, H
_BACKENDS = [b for b in backends_for("feature_mlp", DEVICE) if b != "reference"]
PROVIDERS = [*(f"fastcore.{b}" for b in _BACKENDS), "composite", "torch.compile(composite)"]


def label(case):
    b, t, n, f, h = case
    return f"B{b}xT{t}xN{n}xF{f}xH{h}"


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    ("case", "provider"),
    [pytest.param(c, p, id=f"{label(c)}-{p}") for c in CASES for p in PROVIDERS],
)
def test_feature_mlp(run, case, provider, direction):
    b, t, n, f, hidden = case
    inner = 2 * hidden
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, t, n, f, hidden, generator=g).to(DEVICE)
    w1 = (torch.randn(f, hidden, inner, generator=g) * hidden**-0.5).to(DEVICE)
    w2 = (torch.randn(f, inner, hidden, generator=g) * inner**-0.5).to(DEVICE)
    b1, b2 = (torch.randn(f, k, generator=g).to(DEVICE) for k in (inner, hidden))
    args = [h, w1, b1, w2, b2]
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")

        def forward():
            with fastcore.use_backend(backend):
                return ops.feature_mlp(*args)

    else:
        composite = reference.feature_mlp
        impl = (
            torch.compile(composite, dynamic=False) if provider.startswith("torch.") else composite
        )

        def forward():
            return impl(*args)

    with torch.no_grad():
        torch.testing.assert_close(forward(), reference.feature_mlp(*args), rtol=1e-4, atol=1e-4)
    if direction == "fwd+bwd":
        for a in args:
            a.requires_grad_()
        upstream = torch.randn_like(h)
        fn = lambda: torch.autograd.grad(forward(), args, upstream)  # noqa: E731
    else:
        fn = forward
    run(
        fn,
        DEVICE,
        op="feature_mlp",
        direction=direction,
        provider=provider,
        shape=label(case),
        # h read and the output written; with the backward, the output gradient and h
        # read again and h's gradient written
        bytes=(2 if direction == "fwd" else 5) * h.numel() * h.element_size(),
        baseline=not provider.startswith("fastcore."),
    )
