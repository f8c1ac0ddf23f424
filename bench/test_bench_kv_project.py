"""KV-cache projection (kv_project) and distillation loss (kv_distill_loss): fastcore vs
the unfused three steps users write today.

Every layer of a 28-layer teacher, K and V (56 groups): Ht = 12 -> Hs = 2 heads,
Dt = 128 -> Ds = 64, Tt in {512, 4096} teacher steps linearly resampled to Ts = Tt +- 10%,
a shared head_dim projection with a bias. Baselines (``baseline=True``): the reference
(resample, project every teacher head, mix) run group by group in eager mode, and the same
per-group function under ``torch.compile``. Directions:

* ``fwd``: the projected cache, no gradients;
* ``fwd+bwd``: the projected cache and the parameter gradients (the teacher is frozen);
* ``distill``: the loss against a student cache, forward and backward (parameter and
  student gradients).

Each benchmark also records its peak extra memory (``peak_bytes``): the CUDA allocator's
peak above the inputs on a GPU; on the CPU the peak of live allocations above the inputs,
from the profiler's memory timeline (allocations and frees of the calling thread).

On the CPU, B = 8 with Tt = 4096 is left out: its fp32 teacher cache alone is 11 GB.
Half precision (bf16) runs on the GPU only.
"""

from __future__ import annotations

import pytest
import torch

import fastcore
from fastcore import Resample, ops
from fastcore.reference import kv_project as reference
from fastcore.testing import backends_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
LAYERS, HT, DT, HS, DS = 28, 12, 128, 2, 64

# (B, Tt, Ts)
KV_CASES = [(1, 512, 563), (1, 512, 461), (8, 512, 563), (1, 4096, 4506)]
if CUDA:
    KV_CASES += [(1, 4096, 3686), (8, 4096, 4506), (8, 4096, 3686)]

PROVIDERS = [
    *(
        f"fastcore.{b}"
        for b in backends_for("kv_project", DEVICE)
        if b != "reference" and not (b == "triton" and DEVICE == "cpu")
    ),
    "reference (eager)",
    "torch.compile(reference)",
]
BASELINES = ("reference (eager)", "torch.compile(reference)")


def label(case) -> str:
    b, tt, ts = case
    return f"L{LAYERS}xB{b}xH{HT}to{HS}xD{DT}to{DS}xT{tt}to{ts}"


def make_inputs(case, student: bool):
    b, tt, ts = case
    g = torch.Generator().manual_seed(0)
    groups = 2 * LAYERS
    kv = [torch.randn(b, HT, tt, DT, generator=g).to(DEVICE, DTYPE) for _ in range(groups)]
    head_mix = (torch.rand(groups, HS, HT, generator=g) / HT).to(DEVICE).requires_grad_()
    dim_proj = (torch.randn(groups, DT, DS, generator=g) / DT**0.5).to(DEVICE).requires_grad_()
    bias = torch.zeros(groups, HS, DS, device=DEVICE, requires_grad=True)
    students = None
    if student:
        students = [
            torch.randn(b, HS, ts, DS, generator=g).to(DEVICE, DTYPE).requires_grad_()
            for _ in range(groups)
        ]
    return kv, head_mix, dim_proj, bias, Resample.linear(tt, ts, DEVICE), students


def project_fn(provider, kv, head_mix, dim_proj, bias, resample):
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")

        def run():
            with fastcore.use_backend(backend):
                return ops.kv_project(kv, head_mix, dim_proj, resample, bias)

        return run
    group = reference.kv_project_group
    if provider == "torch.compile(reference)":
        group = torch.compile(reference.kv_project_group, dynamic=False)
    weight = resample.weight.float()
    return lambda: torch.stack(
        [
            group(x, head_mix[i], dim_proj[i], bias[i], resample.ptr, resample.idx, weight)
            for i, x in enumerate(kv)
        ]
    )


def distill_fn(provider, kv, students, head_mix, dim_proj, bias, resample):
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")

        def run():
            with fastcore.use_backend(backend):
                return ops.kv_distill_loss(kv, students, head_mix, dim_proj, resample, bias)

        return run

    def group_loss(x, m, p, b, ptr, idx, w, s):
        projected = reference.kv_project_group(x, m, p, b, ptr, idx, w)
        return reference.distill_group_loss(projected, s, "mse")

    if provider == "torch.compile(reference)":
        group_loss = torch.compile(group_loss, dynamic=False)
    weight = resample.weight.float()
    return lambda: sum(
        group_loss(x, head_mix[i], dim_proj[i], bias[i], resample.ptr, resample.idx, weight, s)
        for i, (x, s) in enumerate(zip(kv, students, strict=True))
    )


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was live before it."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def cases():
    return [pytest.param(c, p, id=f"{label(c)}-{p}") for c in KV_CASES for p in PROVIDERS]


def group_bytes(case, student: bool) -> int:
    """The minimum traffic: read the teacher cache once, write (or read) the student-sized
    result once."""
    b, tt, ts = case
    size = torch.tensor([], dtype=DTYPE).element_size()
    teacher = 2 * LAYERS * b * HT * tt * DT * size
    out = 2 * LAYERS * b * HS * ts * DS * size
    return teacher + out * (2 if student else 1)


@pytest.mark.parametrize(("case", "provider"), cases())
def test_kv_project_forward(run, case, provider):
    kv, head_mix, dim_proj, bias, resample, _ = make_inputs(case, student=False)
    fn = project_fn(provider, kv, head_mix, dim_proj, bias, resample)

    def forward():
        with torch.no_grad():
            return fn()

    forward()  # compile / warm up before measuring memory
    run(
        forward,
        DEVICE,
        op="kv_project",
        direction="fwd",
        provider=provider,
        shape=label(case),
        bytes=group_bytes(case, False),
        baseline=provider in BASELINES,
        peak_bytes=peak_extra_bytes(forward),
    )


@pytest.mark.parametrize(("case", "provider"), cases())
def test_kv_project_forward_backward(run, case, provider):
    kv, head_mix, dim_proj, bias, resample, _ = make_inputs(case, student=False)
    fn = project_fn(provider, kv, head_mix, dim_proj, bias, resample)
    params = (head_mix, dim_proj, bias)

    def step():
        out = fn()
        return torch.autograd.grad(out, params, torch.ones_like(out))

    step()
    run(
        step,
        DEVICE,
        op="kv_project",
        direction="fwd+bwd",
        provider=provider,
        shape=label(case),
        bytes=group_bytes(case, True),
        baseline=provider in BASELINES,
        peak_bytes=peak_extra_bytes(step),
    )


@pytest.mark.parametrize(("case", "provider"), cases())
def test_kv_distill_loss(run, case, provider):
    kv, head_mix, dim_proj, bias, resample, students = make_inputs(case, student=True)
    fn = distill_fn(provider, kv, students, head_mix, dim_proj, bias, resample)
    params = (head_mix, dim_proj, bias, *students)

    def step():
        return torch.autograd.grad(fn(), params)

    step()
    run(
        step,
        DEVICE,
        op="kv_distill_loss",
        direction="fwd+bwd",
        provider=provider,
        shape=label(case),
        bytes=group_bytes(case, True),
        baseline=provider in BASELINES,
        peak_bytes=peak_extra_bytes(step),
    )
