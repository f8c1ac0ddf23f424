"""The Triton kv_project kernels (fastcore.kernels.kv_project: forward, both backward
modes, the fused distillation loss) against fastcore.reference.kv_project in float64,
with reference gradients from torch.autograd. Without a GPU they run under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), float32 and float64 only."""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastcore import Resample
from fastcore.kernels import kv_project as kernels
from fastcore.reference import kv_project as reference
from fastcore.testing import TOLERANCE, dtype_supported, randn, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    d
    for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    if dtype_supported("triton", DEVICE, d)
]
LAYOUTS = ["shared", "per_head"]


def segments_rows(device):
    """Uneven rows over 10 teacher steps: an empty row, repeated sources, a 5-long row,
    signed weights."""
    ptr = torch.tensor([0, 3, 3, 8, 9, 11, 12])
    idx = torch.tensor([0, 0, 4, 9, 1, 2, 2, 7, 5, 3, 8, 6])
    weight = randn((12,), torch.float32, "cpu", 99)
    return Resample.segments(ptr.to(device), idx, weight, 10)


# name: (G, B, Ht, Dt, Hs, Ds, make_resample(device))
CASES = {
    # The odd sizes: Hs=3, Ht=7 (not a multiple), Dt=24, Ds=40, Ts=13, B=1.
    "odd": (2, 1, 7, 24, 3, 40, lambda d: Resample.linear(29, 13, d)),
    "upsample": (1, 2, 4, 16, 2, 16, lambda d: Resample.linear(5, 13, d)),
    "nearest": (2, 2, 2, 8, 1, 20, lambda d: Resample.nearest(11, 6, d)),
    "segments": (1, 2, 3, 12, 2, 24, segments_rows),
    "no_teacher": (2, 2, 3, 16, 2, 16, lambda d: Resample.linear(0, 4, d)),  # Tt = 0
    "no_student": (1, 2, 3, 16, 2, 16, lambda d: Resample.linear(6, 0, d)),  # Ts = 0
    "no_entries": (
        1,
        1,
        2,
        16,
        2,
        16,
        lambda d: Resample.segments(torch.zeros(5, dtype=torch.long, device=d), [], [], 6),
    ),
}
# Cases run only by one test.
EXTRA_CASES = {
    "long": (2, 2, 3, 16, 3, 20, lambda d: Resample.linear(41, 37, d)),
    "wide": (1, 2, 3, 60, 2, 24, lambda d: Resample.linear(9, 7, d)),
}


def case_spec(case):
    return CASES[case] if case in CASES else EXTRA_CASES[case]


def make_inputs(case, layout, with_bias, dtype, param_dtype=None, seed=0):
    G, B, Ht, Dt, Hs, Ds, make_rs = case_spec(case)
    rs = make_rs(DEVICE)
    param_dtype = param_dtype or (
        dtype if dtype in (torch.float32, torch.float64) else torch.float32
    )
    kv = [randn((B, Ht, rs.num_src, Dt), dtype, DEVICE, seed + g) for g in range(G)]
    head_mix = randn((G, Hs, Ht), param_dtype, DEVICE, seed + 50)
    shape = (G, Ht, Dt, Ds) if layout == "per_head" else (G, Dt, Ds)
    dim_proj = randn(shape, param_dtype, DEVICE, seed + 51) / Dt**0.5
    bias = randn((G, Hs, Ds), param_dtype, DEVICE, seed + 52) if with_bias else None
    return rs, kv, head_mix, dim_proj, bias


def leaves64(kv, head_mix, dim_proj, bias):
    """float64 copies requiring grad: the reference's inputs."""
    kv64 = [x.detach().double().requires_grad_() for x in kv]
    params = [head_mix, dim_proj] + ([bias] if bias is not None else [])
    return kv64, [p.detach().double().requires_grad_() for p in params]


def check(out, ref, dtype, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} ({dtype})"


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_bwd(grad_out, rs, kv, head_mix, dim_proj, bias, need_kv, **distill):
    return kernels.kv_project_bwd(
        grad_out,
        kv,
        head_mix,
        dim_proj,
        bias,
        rs.ptr,
        rs.idx,
        rs.weight,
        rs.t_ptr,
        rs.t_col,
        rs.t_edge,
        need_kv,
        **distill,
    )


def check_project(case, layout, with_bias, dtype, param_dtype=None):
    rs, kv, head_mix, dim_proj, bias = make_inputs(case, layout, with_bias, dtype, param_dtype)
    out = kernels.kv_project_fwd(kv, head_mix, dim_proj, bias, rs.ptr, rs.idx, rs.weight)
    kv64, params64 = leaves64(kv, head_mix, dim_proj, bias)
    bias64 = params64[2] if with_bias else None
    ref = reference.kv_project(kv64, params64[0], params64[1], bias64, rs.ptr, rs.idx, rs.weight)
    assert out.dtype == kv[0].dtype
    check(out, ref, dtype, f"out {case}")

    grad_out = randn(ref.shape, dtype, DEVICE, seed=7)
    grad_kv, g_mix, g_proj, g_bias, g_student = run_bwd(
        grad_out, rs, kv, head_mix, dim_proj, bias, True
    )
    ref_grads = torch.autograd.grad(ref, kv64 + params64, grad_out.double(), allow_unused=True)
    ref_grads = [
        torch.zeros_like(x) if r is None else r
        for r, x in zip(ref_grads, kv64 + params64, strict=True)
    ]
    assert g_student is None
    assert len(grad_kv) == len(kv)
    for g, (gk, r) in enumerate(zip(grad_kv, ref_grads[: len(kv)], strict=True)):
        assert gk.dtype == kv[0].dtype
        check(gk, r, dtype, f"grad kv[{g}] {case}")
    acc = acc_dtype(dtype)
    n = len(kv)
    assert g_mix.dtype == acc and g_proj.dtype == acc
    check(g_mix, ref_grads[n], dtype, f"grad head_mix {case}")
    check(g_proj, ref_grads[n + 1], dtype, f"grad dim_proj {case}")
    if with_bias:
        assert g_bias.dtype == acc
        check(g_bias, ref_grads[n + 2], dtype, f"grad bias {case}")
    else:
        assert g_bias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_project_matches_reference(case, layout, with_bias, dtype):
    check_project(case, layout, with_bias, dtype)


@pytest.mark.parametrize(
    ("dtype", "param_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
    ids=["fp32_kv_fp64_params", "fp64_kv_fp32_params"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_parameter_dtype(layout, dtype, param_dtype):
    """Parameters in another float dtype than kv: computed in kv's accumulation type."""
    check_project("odd", layout, True, dtype, param_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_tiles_and_chunks(monkeypatch, layout, dtype):
    """Small tiles and few programs: several student/teacher tiles per batch row and several
    work items per program (the chunk ranges), still matching the reference."""
    monkeypatch.setattr(kernels, "TILE", 64)
    monkeypatch.setattr(kernels, "TILE_FP64", 64)
    monkeypatch.setattr(kernels, "PROGRAMS", 3)
    rs, kv, head_mix, dim_proj, _ = make_inputs("long", layout, True, dtype)
    geo = kernels._Geometry(kv, head_mix, dim_proj, rs.ptr)
    assert geo.tiles > 1 and geo.items > geo.chunks > 1
    check_project("long", layout, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_dim_in_chunks(monkeypatch, layout, dtype):
    """Dt in 4 chunks of 16 columns (what a 256-wide head gets on the GPU): projection,
    both backward modes."""
    monkeypatch.setattr(kernels, "PROJ_TILE", 512)
    rs, kv, head_mix, dim_proj, _ = make_inputs("wide", layout, True, dtype)
    geo = kernels._Geometry(kv, head_mix, dim_proj, rs.ptr)
    assert (geo.block_k, geo.num_k) == (16, 4)
    check_project("wide", layout, True, dtype)
    check_distill("wide", layout, True, "cosine", dtype)


def test_too_many_teacher_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "PROJ_TILE", 512)
    monkeypatch.setattr(kernels, "MAX_K_CHUNKS", 3)
    rs, kv, head_mix, dim_proj, bias = make_inputs("wide", "shared", True, torch.float32)
    with pytest.raises(NotImplementedError, match="chunks"):
        kernels.kv_project_fwd(kv, head_mix, dim_proj, bias, rs.ptr, rs.idx, rs.weight)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_need_kv_false(layout):
    """need_kv=False: no kv gradient, and the same parameter gradients, bit for bit."""
    dtype = torch.float32
    rs, kv, head_mix, dim_proj, bias = make_inputs("odd", layout, True, dtype)
    grad_out = randn((2, 1, 3, 13, 40), dtype, DEVICE, seed=8)
    with_kv = run_bwd(grad_out, rs, kv, head_mix, dim_proj, bias, True)
    without = run_bwd(grad_out, rs, kv, head_mix, dim_proj, bias, False)
    assert without[0] is None and without[4] is None
    for a, b in zip(with_kv[1:4], without[1:4], strict=True):
        assert torch.equal(a, b)
    assert rel_error(with_kv[1], torch.zeros_like(with_kv[1])) > 0


def check_distill(case, layout, with_bias, loss, dtype, student_rows_zero=False):
    rs, kv, head_mix, dim_proj, bias = make_inputs(case, layout, with_bias, dtype)
    G, B, _, _, Hs, Ds, _ = case_spec(case)
    student = [randn((B, Hs, rs.num_dst, Ds), dtype, DEVICE, seed=30 + g) for g in range(G)]
    if student_rows_zero and rs.num_dst:
        for s in student:
            s[:, 0, 1] = 0  # a zero student row: its norm is clamped
    losses = kernels.kv_distill_loss_fwd(
        kv, student, head_mix, dim_proj, bias, rs.ptr, rs.idx, rs.weight, loss
    )
    kv64, params64 = leaves64(kv, head_mix, dim_proj, bias)
    st64 = [s.detach().double().requires_grad_() for s in student]
    bias64 = params64[2] if with_bias else None
    ref = reference.kv_distill_loss(
        kv64, st64, params64[0], params64[1], bias64, rs.ptr, rs.idx, rs.weight, loss
    )
    assert losses.dtype == acc_dtype(dtype) and losses.shape == (G,)
    check(losses, ref, dtype, f"{loss} loss {case}")

    loss_grad = randn((G,), torch.float32, DEVICE, seed=9)
    grad_kv, g_mix, g_proj, g_bias, g_student = run_bwd(
        None,
        rs,
        kv,
        head_mix,
        dim_proj,
        bias,
        True,
        student=student,
        loss_grad=loss_grad,
        loss=loss,
    )
    leaves = kv64 + params64 + st64
    ref_grads = torch.autograd.grad(ref, leaves, loss_grad.double(), allow_unused=True)
    ref_grads = [
        torch.zeros_like(x) if r is None else r for r, x in zip(ref_grads, leaves, strict=True)
    ]
    n = len(kv)
    for g in range(G):
        check(grad_kv[g], ref_grads[g], dtype, f"{loss} grad kv[{g}] {case}")
        assert g_student[g].dtype == student[g].dtype
        check(g_student[g], ref_grads[-G + g], dtype, f"{loss} grad student[{g}] {case}")
    check(g_mix, ref_grads[n], dtype, f"{loss} grad head_mix {case}")
    check(g_proj, ref_grads[n + 1], dtype, f"{loss} grad dim_proj {case}")
    if with_bias:
        check(g_bias, ref_grads[n + 2], dtype, f"{loss} grad bias {case}")
    else:
        assert g_bias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["odd", "segments", "no_teacher", "no_student"])
def test_distill_matches_reference(case, layout, loss, dtype):
    check_distill(case, layout, case != "segments", loss, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cosine_clamped_norms(layout, dtype):
    """Cosine with zero rows on both sides (no bias, an empty resampling row, a zero
    student row): the clamped norm is a constant in the gradient."""
    check_distill("segments", layout, False, "cosine", dtype, student_rows_zero=True)


@pytest.mark.parametrize("mode", ["project", "mse", "cosine"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(monkeypatch, layout, mode):
    """Two runs give identical bits (several programs, several items each)."""
    monkeypatch.setattr(kernels, "PROGRAMS", 2)
    rs, kv, head_mix, dim_proj, bias = make_inputs("odd", layout, True, torch.float32)
    if mode == "project":
        grad_out = randn((2, 1, 3, 13, 40), torch.float32, DEVICE, seed=8)
        kwargs = {}
    else:
        grad_out = None
        student = [randn((1, 3, 13, 40), torch.float32, DEVICE, seed=30 + g) for g in range(2)]
        kwargs = dict(student=student, loss_grad=torch.ones(2, device=DEVICE), loss=mode)
    first = run_bwd(grad_out, rs, kv, head_mix, dim_proj, bias, True, **kwargs)
    second = run_bwd(grad_out, rs, kv, head_mix, dim_proj, bias, True, **kwargs)
    for a, b in zip(flatten(first), flatten(second), strict=True):
        assert torch.equal(a, b)


def flatten(results):
    """The tensors of a kv_project_bwd result, lists opened."""
    return [t for x in results if x is not None for t in (x if isinstance(x, list) else [x])]


def test_non_contiguous_kv_and_student():
    """kv and student caches that are views (e.g. [B, T, H, D] transposed, as attention
    layouts give): the launchers read them as contiguous [B, H, T, D] groups."""
    rs, kv, head_mix, dim_proj, bias = make_inputs("odd", "shared", True, torch.float32)
    kv_t = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in kv]
    assert not kv_t[0].is_contiguous()
    args = (head_mix, dim_proj, bias, rs.ptr, rs.idx, rs.weight)
    want = kernels.kv_project_fwd(kv, *args)
    assert torch.equal(kernels.kv_project_fwd(kv_t, *args), want)
    student = [randn(want.shape[1:], torch.float32, DEVICE, seed=30 + g) for g in range(2)]
    student_t = [s.transpose(1, 2).contiguous().transpose(1, 2) for s in student]
    assert torch.equal(
        kernels.kv_distill_loss_fwd(kv_t, student_t, *args, "cosine"),
        kernels.kv_distill_loss_fwd(kv, student, *args, "cosine"),
    )
    distill = dict(loss_grad=torch.ones(2, device=DEVICE), loss="mse")
    got = run_bwd(None, rs, kv_t, head_mix, dim_proj, bias, True, student=student_t, **distill)
    ref = run_bwd(None, rs, kv, head_mix, dim_proj, bias, True, student=student, **distill)
    for a, b in zip(flatten(got), flatten(ref), strict=True):
        assert torch.equal(a, b)
