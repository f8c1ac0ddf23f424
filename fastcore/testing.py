"""Helpers for testing fastcore ops against their references (used by tests/ and bench/).

The rule every op test follows: fresh seeded random inputs, outputs and gradients
compared with the float64 reference by ``||out - ref|| / ||ref||`` under a per-dtype
tolerance, NaN never passing.
"""

from __future__ import annotations

import torch

from fastcore import _backend, reference
from fastcore.models.basin import HierarchicalBasinModel
from fastcore.nn import SpatioTemporalBlock

# Relative-error bounds vs a float64 reference, by the dtype under test.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def backends_for(op: str, device: str | torch.device) -> list[str]:
    """The backends of ``op`` usable on ``device`` here (reference first)."""
    device_type = torch.device(device).type
    spec = _backend._OPS[op]
    return [b for b in _backend.BACKENDS if b in spec.backends and _backend.usable(b, device_type)]


def dtype_supported(backend: str, device: str | torch.device, dtype: torch.dtype) -> bool:
    """False only for half types on the Triton CPU interpreter, which has no bf16/fp16
    arithmetic (it returns wrong numbers without an error)."""
    interpreted = backend == "triton" and torch.device(device).type == "cpu"
    return not (interpreted and dtype in (torch.float16, torch.bfloat16))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if either holds NaN or shapes differ."""
    if out.shape != ref.shape:
        return float("inf")
    out64, ref64 = out.detach().double(), ref.detach().double()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    denom = ref64.norm()
    diff = (out64 - ref64).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert ``rel_error(out, ref)`` within :data:`TOLERANCE` for ``dtype``."""
    err = rel_error(out, ref)
    tol = TOLERANCE.get(dtype, 0.0)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({dtype})"


def randn(shape, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Seeded standard-normal tensor (generated in float64 on the CPU, then cast)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def randint(high: int, shape, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Seeded integers in ``[0, high)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(high, 1), shape, generator=g).to(device=device, dtype=dtype)


def backend_params(op: str) -> list:
    """pytest parameters ``(device, backend)`` for every backend of ``op``: the ones usable
    on the CPU here, and every GPU-capable one marked ``gpu`` (skipped without CUDA)."""
    import pytest

    spec = _backend._OPS[op]
    cases = [pytest.param("cpu", b, id=f"cpu-{b}") for b in backends_for(op, "cpu")]
    for b in ("reference", *spec.gpu_order):
        cases.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu))
    return cases


def backend_dtype_params(op: str, dtypes) -> list:
    """``(device, backend, dtype)`` pytest parameters: :func:`backend_params` crossed with
    ``dtypes``, leaving out what a backend cannot compute here (:func:`dtype_supported`)."""
    import pytest

    cases = []
    for p in backend_params(op):
        device, backend = p.values
        for dtype in dtypes:
            if dtype_supported(backend, device, dtype):
                name = str(dtype).removeprefix("torch.")
                cases.append(
                    pytest.param(device, backend, dtype, id=f"{p.id}-{name}", marks=p.marks)
                )
    return cases


def assert_same_across_threads(fn, counts=(1, 2, 3)) -> None:
    """Run ``fn()`` (a tuple of tensors) with each intra-op thread count in ``counts`` and
    assert every result is bit-identical to the first (the thread count is restored)."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(tuple(fn()))
    finally:
        torch.set_num_threads(threads)
    for n, other in zip(counts[1:], results[1:], strict=True):
        for i, (a, b) in enumerate(zip(results[0], other, strict=True)):
            assert torch.equal(a, b), f"result {i} with {n} threads differs from {counts[0]}"


class LoopLayersBasinModel(HierarchicalBasinModel):
    """:class:`~fastcore.models.HierarchicalBasinModel` on the original code's layers: every
    block the per-time-step loop :func:`fastcore.reference.spatiotemporal_block`, every
    per-variable MLP the composite :func:`fastcore.reference.feature_mlp`. Same constructor,
    parameters and results: the throughput benchmark's baseline and a test's oracle."""

    def block(self, block: SpatioTemporalBlock, h: torch.Tensor, level: int) -> torch.Tensor:
        river, causal = self.hierarchy.graphs(level)
        return reference.spatiotemporal_block(block, h, river, causal)

    def mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        m = self.mlps[index]
        return reference.feature_mlp(h, m.w1, m.b1, m.w2, m.b2)

    @classmethod
    def sharing(cls, model: HierarchicalBasinModel) -> LoopLayersBasinModel:
        """A twin of ``model`` on the loop layers that shares its parameters and buffers."""
        twin = cls.__new__(cls)
        twin.__dict__.update(model.__dict__)
        return twin
