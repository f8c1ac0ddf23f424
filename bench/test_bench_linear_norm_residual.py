"""The spatiotemporal block's tail: ``fastcore.ops.linear_norm_residual`` against the
composite it replaces.

``x + res_scale * (gamma * LayerNorm_H(einsum(h, W_f) + b_f) + beta)`` on ``(B, T, N, F,
H)``; forward, and forward+backward (gradients for h, x and the four parameters).
Baselines: the composite as fastcore's block ran it before this operator (einsum, bias,
``layer_norm``, affine, residual on ``(B, T, N, F*H)`` views) and ``torch.compile`` of it
(Inductor fuses the elementwise work). Shapes: the basin model's fine level (215 basins,
5 variables, hidden 8, lookback 21) and the block benchmark's (400 nodes, 5 x 32, 24 steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcore
from fastcore import ops
from fastcore.testing import backends_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [(16, 21, 215, 5, 8), (8, 24, 400, 5, 32)]  # B, T, N, F, H
_BACKENDS = [b for b in backends_for("linear_norm_residual", DEVICE) if b != "reference"]
PROVIDERS = [*(f"fastcore.{b}" for b in _BACKENDS), "composite", "torch.compile(composite)"]


def composite(h, x, weight, bias, gamma, beta, res_scale=0.5):
    shape = h.shape
    flat = (*shape[:-2], shape[-2] * shape[-1])
    z = torch.einsum("btnfh,fhk->btnfk", h, weight).reshape(flat) + bias.flatten()
    z = F.layer_norm(z.view(shape), (shape[-1],)).view(flat)
    z = torch.addcmul(beta.flatten(), z, gamma.flatten())
    return torch.add(x.reshape(flat), z, alpha=res_scale).view(shape)


def label(case):
    b, t, n, f, h = case
    return f"B{b}xT{t}xN{n}xF{f}xH{h}"


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    ("case", "provider"),
    [pytest.param(c, p, id=f"{label(c)}-{p}") for c in CASES for p in PROVIDERS],
)
def test_linear_norm_residual(run, case, provider, direction):
    b, t, n, f, hidden = case
    g = torch.Generator().manual_seed(0)
    h, x = (torch.randn(b, t, n, f, hidden, generator=g).to(DEVICE) for _ in range(2))
    weight = (torch.randn(f, hidden, hidden, generator=g) * hidden**-0.5).to(DEVICE)
    bias, gamma, beta = (torch.randn(f, hidden, generator=g).to(DEVICE) for _ in range(3))
    args = [h, x, weight, bias, gamma, beta]
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")

        def forward():
            with fastcore.use_backend(backend):
                return ops.linear_norm_residual(*args, 0.5)

    else:
        impl = (
            torch.compile(composite, dynamic=False) if provider.startswith("torch.") else composite
        )

        def forward():
            return impl(*args)

    with torch.no_grad():
        torch.testing.assert_close(forward(), composite(*args), rtol=1e-4, atol=1e-4)
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
        op="linear_norm_residual",
        direction=direction,
        provider=provider,
        shape=label(case),
        # h and x read, the output written; with the backward, the output gradient and h
        # read again and h's gradient written
        bytes=(3 if direction == "fwd" else 6) * h.numel() * h.element_size(),
        baseline=not provider.startswith("fastcore."),
    )
