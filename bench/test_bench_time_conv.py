"""The depthwise causal convolution along time (the first stage of every spatiotemporal
block): ``fastcore.ops.time_conv`` against what users write today.

``x (B, T, N, C)``, ``weight (K, C)``, ``bias (C)``; forward, and forward+backward
(gradients for x, weight and bias). Baselines: K shifted multiply-adds in place on one
output buffer (fastcore's block before this operator, and the shape of most hand-written
temporal convolutions), and ``torch.nn.functional.conv1d`` with ``groups=C`` after moving
time last and padding it (the layout cuDNN/oneDNN want). Shapes: the basin model's fine
level (215 basins, 5 variables x 8 hidden, lookback 21, kernel 7) and the block benchmark's
(400 nodes, 5 x 32, 96 steps, kernel 3).
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
CASES = [(16, 21, 215, 40, 7), (8, 96, 400, 160, 3)]  # B, T, N, C, K
_BACKENDS = [
    b
    for b in backends_for("time_conv", DEVICE)
    if b != "reference" and not (b == "triton" and DEVICE == "cpu")  # not the interpreter
]
PROVIDERS = [
    *(f"fastcore.{b}" for b in _BACKENDS),
    "shifted multiply-adds",
    "conv1d (groups=C)",
]


def shifted(x, weight, bias):
    steps = x.shape[1]
    y = torch.addcmul(bias, x, weight[0])
    for k in range(1, min(weight.shape[0], steps)):
        y[:, k:].addcmul_(x[:, : steps - k], weight[k])
    return y


def conv1d(x, weight, bias):
    b, t, n, c = x.shape
    taps = weight.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(b * n, c, t)
    # conv1d correlates: tap k of the causal filter meets x[t - k] at kernel position K-1-k
    kernel = weight.flip(0).t().unsqueeze(1)  # (C, 1, K)
    y = F.conv1d(F.pad(rows, (taps - 1, 0)), kernel, bias, groups=c)
    return y.reshape(b, n, c, t).permute(0, 3, 1, 2)


def label(case):
    b, t, n, c, k = case
    return f"B{b}xT{t}xN{n}xC{c}xK{k}"


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    ("case", "provider"),
    [pytest.param(c, p, id=f"{label(c)}-{p}") for c in CASES for p in PROVIDERS],
)
def test_time_conv(run, case, provider, direction):
    b, t, n, c, k = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, n, c, generator=g).to(DEVICE)
    weight = torch.randn(k, c, generator=g).to(DEVICE)
    bias = torch.randn(c, generator=g).to(DEVICE)
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")

        def forward():
            with fastcore.use_backend(backend):
                return ops.time_conv(x, weight, bias)

    else:
        impl = shifted if provider == "shifted multiply-adds" else conv1d

        def forward():
            return impl(x, weight, bias)

    with torch.no_grad():
        torch.testing.assert_close(forward(), shifted(x, weight, bias), rtol=1e-4, atol=1e-4)
    if direction == "fwd+bwd":
        params = [x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
        upstream = torch.randn_like(x)
        fn = lambda: torch.autograd.grad(forward(), params, upstream)  # noqa: E731
    else:
        fn = forward
    run(
        fn,
        DEVICE,
        op="time_conv",
        direction=direction,
        provider=provider,
        shape=label(case),
        # x read and the output written; with the backward, the output gradient read, x
        # read again and its gradient written
        bytes=(2 if direction == "fwd" else 5) * x.numel() * x.element_size(),
        baseline=provider != "fastcore.cpu" and not provider.startswith("fastcore."),
    )
