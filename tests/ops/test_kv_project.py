"""fastcore.ops.kv_project and kv_distill_loss (the fastcore::kv_project family) on every
backend, against the unfused reference in float64."""

import pytest
import torch

import fastcore
from fastcore import Resample, ops, use_backend
from fastcore.reference import kv_project as reference
from fastcore.testing import assert_close, backend_dtype_params, backend_params, randn

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make_resample(kind: str, t_src: int, t_dst: int, device) -> Resample | None:
    if kind == "none":
        return None
    if kind == "linear":
        return Resample.linear(t_src, t_dst, device)
    if kind == "nearest":
        return Resample.nearest(t_src, t_dst, device)
    # Irregular rows: row lengths 0..3, an empty row, repeated sources, arbitrary weights.
    g = torch.Generator().manual_seed(t_src * 31 + t_dst)
    counts = torch.randint(0, 4, (t_dst,), generator=g)
    if t_dst > 1:
        counts[1] = 0
    if t_src == 0:
        counts.zero_()
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    idx = torch.randint(0, max(t_src, 1), (int(ptr[-1]),), generator=g)
    weight = torch.randn(int(ptr[-1]), generator=g, dtype=torch.float64)
    return Resample.segments(ptr.to(device), idx.to(device), weight.to(device), t_src)


def rows_of(resample, steps, device):
    r = resample if resample is not None else Resample.identity(steps, device)
    return r.ptr, r.idx, r.weight


# name: (lead, Ht, Tt, Dt, Hs, Ts, Ds, groups, per_head, bias, resample kind)
CASES = {
    "gqa_12_to_2": ((2,), 12, 40, 32, 2, 44, 16, 2, False, "full", "linear"),
    "ht_7_hs_3": ((3,), 7, 19, 24, 3, 13, 40, 3, False, "heads", "linear"),
    "per_head": ((2,), 5, 21, 12, 3, 17, 10, 2, True, "full", "linear"),
    "per_head_nearest": ((1,), 4, 30, 8, 4, 29, 8, 1, True, "none", "nearest"),
    "segments": ((2,), 6, 33, 16, 2, 20, 24, 2, False, "full", "segments"),
    "segments_per_head": ((2,), 3, 12, 8, 2, 15, 6, 1, True, "heads", "segments"),
    "no_resample": ((2, 2), 4, 70, 16, 2, 70, 8, 1, False, "full", "none"),
    "long_ts": ((1,), 2, 9, 8, 1, 150, 8, 1, False, "none", "linear"),  # Ts > Tt, 3 tiles
    "t_src_1": ((2,), 3, 1, 8, 2, 5, 8, 2, False, "full", "linear"),  # T = 1: expand
    "t_src_0": ((2,), 3, 0, 8, 2, 5, 8, 2, False, "full", "linear"),  # T = 0: bias only
    "t_dst_0": ((2,), 3, 7, 8, 2, 0, 8, 1, False, "full", "linear"),
    "batch_0": ((0,), 3, 7, 8, 2, 9, 8, 1, True, "full", "linear"),
}


def build(case, dtype, device, param_dtype=None, kv_grad=True):
    lead, ht, tt, dt, hs, ts, ds, groups, per_head, bias, kind = CASES[case]
    param_dtype = param_dtype or dtype
    kv = [
        randn((*lead, ht, tt, dt), dtype, device, seed=100 + g).requires_grad_(kv_grad)
        for g in range(groups)
    ]
    head_mix = randn((groups, hs, ht), param_dtype, device, seed=1).requires_grad_()
    proj_shape = (groups, ht, dt, ds) if per_head else (groups, dt, ds)
    dim_proj = (randn(proj_shape, param_dtype, device, seed=2) / dt**0.5).requires_grad_()
    b = None
    if bias == "full":
        b = randn((groups, hs, ds), param_dtype, device, seed=3).requires_grad_()
    elif bias == "heads":
        b = randn((groups, hs), param_dtype, device, seed=3).requires_grad_()
    resample = make_resample(kind, tt, ts, device)
    return kv, head_mix, dim_proj, b, resample


def reference_out(kv, head_mix, dim_proj, b, resample):
    """The unfused reference in float64 on the same leaves (its own graph)."""
    tt = kv[0].shape[-2]
    ptr, idx, weight = rows_of(resample, tt, kv[0].device)
    bias64 = None
    if b is not None:
        bias64 = b.double()
        if bias64.dim() == 2:
            bias64 = bias64[:, :, None].expand(-1, -1, dim_proj.shape[-1])
    outs = []
    for g, x in enumerate(kv):
        lead = x.shape[:-3]
        flat = x.double().reshape(lead.numel(), *x.shape[-3:])
        out = reference.kv_project_group(
            flat,
            head_mix[g].double(),
            dim_proj[g].double(),
            None if bias64 is None else bias64[g],
            ptr,
            idx,
            weight.double(),
        )
        outs.append(out.reshape(*lead, *out.shape[1:]))
    return torch.stack(outs)


def leaves(kv, head_mix, dim_proj, b):
    return [*kv, head_mix, dim_proj] + ([b] if b is not None else [])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("kv_project", FLOATS))
def test_kv_project_matches_reference(device, backend, dtype, case):
    kv, head_mix, dim_proj, b, resample = build(case, dtype, device)
    with use_backend(backend):
        out = ops.kv_project(kv, head_mix, dim_proj, resample, b)
    ref = reference_out(kv, head_mix, dim_proj, b, resample)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"{backend} {case} forward")
    upstream = randn(out.shape, dtype, device, seed=9)
    params = leaves(kv, head_mix, dim_proj, b)
    with use_backend(backend):
        grads = torch.autograd.grad(out, params, upstream, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, upstream.double(), allow_unused=True)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert g is not None and g.dtype == params[i].dtype, f"{case}: gradient {i}"
        assert_close(g, r, dtype, f"{backend} {case} gradient {i}")


@pytest.mark.parametrize("case", ["gqa_12_to_2", "per_head", "segments", "t_src_0", "t_dst_0"])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("kv_distill_loss", FLOATS)
)
def test_distill_loss_matches_reference(device, backend, dtype, loss, case):
    kv, head_mix, dim_proj, b, resample = build(case, dtype, device)
    lead, _, _, _, hs, ts, ds, groups, *_ = CASES[case]
    student = [
        randn((*lead, hs, ts, ds), dtype, device, seed=50 + g).requires_grad_()
        for g in range(groups)
    ]
    with use_backend(backend):
        per_group = ops.kv_distill_loss(
            kv, student, head_mix, dim_proj, resample, b, loss=loss, reduction="none"
        )
    projected = reference_out(kv, head_mix, dim_proj, b, resample)
    ref = torch.stack(
        [
            reference.distill_group_loss(projected[g], student[g].double(), loss)
            for g in range(groups)
        ]
    )
    assert per_group.shape == (groups,)
    assert per_group.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(per_group, ref, dtype, f"{backend} {loss} {case} loss")
    weights = randn((groups,), torch.float64, device, seed=8)
    params = leaves(kv, head_mix, dim_proj, b) + student
    with use_backend(backend):
        grads = torch.autograd.grad(
            (per_group * weights.to(per_group.dtype)).sum(), params, allow_unused=True
        )
    ref_grads = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert g is not None, f"{case}: gradient {i} missing"
        assert_close(g, r, dtype, f"{backend} {loss} {case} gradient {i}")


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_distill_loss"))
def test_distill_loss_reductions_and_zero_rows(device, backend):
    kv, head_mix, dim_proj, b, resample = build("gqa_12_to_2", torch.float64, device)
    student = [torch.zeros(2, 2, 44, 16, dtype=torch.float64, device=device) for _ in range(2)]
    student[1][:, :, ::3] = randn((2, 2, 15, 16), torch.float64, device, seed=4)
    student = [s.requires_grad_() for s in student]
    with use_backend(backend):
        per = ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, b, "cosine", "none")
        total = ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, b, "cosine")
        mean = ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, b, "cosine", "mean")
        grads = torch.autograd.grad(total, [*student, head_mix])
    # Zero student rows: cos = 0 (norm clamped), so those rows contribute exactly 1.
    assert per[0].item() == pytest.approx(1.0, abs=1e-12)
    assert total.item() == pytest.approx(per.sum().item(), rel=1e-12)
    assert mean.item() == pytest.approx(per.mean().item(), rel=1e-12)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0  # a zero student row still gets a gradient towards o


def test_grouped_tensor_list_and_ungrouped_agree():
    kv, head_mix, dim_proj, b, resample = build("gqa_12_to_2", torch.float64, "cpu")
    stacked = torch.stack([x.detach() for x in kv])
    from_list = ops.kv_project(kv, head_mix, dim_proj, resample, b)
    from_tensor = ops.kv_project(stacked, head_mix, dim_proj, resample, b)
    one = ops.kv_project(kv[1], head_mix[1], dim_proj[1], resample, b[1])
    assert torch.equal(from_list, from_tensor)
    torch.testing.assert_close(one, from_list[1], rtol=1e-12, atol=1e-12)


def test_ungrouped_bias_per_head_and_non_contiguous():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 40, 6, 16, generator=g, dtype=torch.float64).transpose(1, 2)  # [B,H,T,D]
    assert not kv.is_contiguous()
    head_mix = torch.randn(3, 6, generator=g, dtype=torch.float64)
    dim_proj = torch.randn(16, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    resample = Resample.linear(40, 31)
    out = ops.kv_project(kv, head_mix, dim_proj, resample, bias)
    ref = reference.kv_project_group(
        kv, head_mix, dim_proj, bias[:, None].expand(3, 8), resample.ptr, resample.idx,
        resample.weight.double(),
    )  # fmt: skip
    assert out.shape == (2, 3, 31, 8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_mixed_precision_parameters():
    """bf16 cache, fp32 parameters (autocast-style): bf16 out, fp32 parameter grads."""
    kv, head_mix, dim_proj, b, resample = build(
        "gqa_12_to_2", torch.bfloat16, "cpu", param_dtype=torch.float32, kv_grad=False
    )
    out = ops.kv_project(kv, head_mix, dim_proj, resample, b)
    assert out.dtype == torch.bfloat16
    ref = reference_out(kv, head_mix, dim_proj, b, resample)
    assert_close(out, ref, torch.bfloat16, "bf16 forward")
    out.float().square().sum().backward()
    assert head_mix.grad.dtype == torch.float32 and dim_proj.grad.dtype == torch.float32
    assert kv[0].grad is None


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_project"))
def test_deterministic(device, backend):
    # fastcore's kernels: the same bits whatever the thread count. The reference backend is
    # PyTorch's own ops, whose reductions may split by thread count (on a 2-core Xeon VM
    # dim_proj's gradient differs in the last bits between 1 and 2 threads): the same bits
    # run to run at one thread count (docs/ops.md, the op contract).
    kv, head_mix, dim_proj, b, resample = build("gqa_12_to_2", torch.float32, device)
    runs = []
    for threads in (2, 2) if backend == "reference" else (1, 2, 2):
        torch.set_num_threads(threads)
        with use_backend(backend):
            out = ops.kv_project(kv, head_mix, dim_proj, resample, b)
            grads = torch.autograd.grad(out.square().sum(), leaves(kv, head_mix, dim_proj, b))
        runs.append([out, *grads])
    torch.set_num_threads(2)
    for other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], other, strict=True))


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_project"))
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_gradcheck(device, backend, per_head):
    g = torch.Generator().manual_seed(3)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()

    kv = [leaf(1, 3, 5, 4), leaf(1, 3, 5, 4)]
    head_mix, bias = leaf(2, 2, 3), leaf(2, 2, 3)
    dim_proj = leaf(2, 3, 4, 3) if per_head else leaf(2, 4, 3)
    student = [leaf(1, 2, 7, 3), leaf(1, 2, 7, 3)]
    resample = make_resample("segments", 5, 7, device)

    def project(*args):
        return ops.kv_project(list(args[:2]), args[2], args[3], resample, args[4])

    def distill(*args):
        return ops.kv_distill_loss(
            list(args[:2]), list(args[5:]), args[2], args[3], resample, args[4], "cosine"
        )

    # Under the Triton interpreter every launch costs ~10 ms: fast mode checks a random
    # projection of the Jacobian (two evaluations per input) instead of every column.
    fast = backend == "triton" and device == "cpu"
    with use_backend(backend):
        assert torch.autograd.gradcheck(project, (*kv, head_mix, dim_proj, bias), fast_mode=fast)
        assert torch.autograd.gradcheck(
            distill, (*kv, head_mix, dim_proj, bias, *student), fast_mode=fast
        )


def test_second_order_raises():
    kv, head_mix, dim_proj, b, resample = build("gqa_12_to_2", torch.float64, "cpu")
    with use_backend("cpu"):
        out = ops.kv_project(kv, head_mix, dim_proj, resample, b)
        (grad,) = torch.autograd.grad(out.square().sum(), head_mix, create_graph=True)
        with pytest.raises(NotImplementedError, match="second-order"):
            grad.sum().backward()


def opcheck_args(device):
    kv, head_mix, dim_proj, b, resample = build("ht_7_hs_3", torch.float32, device)
    b = b[:, :, None].expand(-1, -1, 40).contiguous().detach().requires_grad_()
    structure = [
        resample.ptr, resample.idx, resample.weight.float(), resample.t_ptr, resample.t_col,
        resample.t_edge,
    ]  # fmt: skip
    student = [randn((3, 3, 13, 40), torch.float32, device, seed=7 + g) for g in range(3)]
    return kv, head_mix, dim_proj, b, structure, student


# The reference backend is plain PyTorch, not a registered operator: nothing to opcheck.
@pytest.mark.parametrize(
    ("device", "backend"),
    [p for p in backend_params("kv_project") if p.values[1] != "reference"],
)
def test_opcheck(device, backend):
    triton = backend == "triton"
    kv, head_mix, dim_proj, b, structure, student = opcheck_args(device)
    suffix = "_triton" if triton else ""
    project = getattr(torch.ops.fastcore, "kv_project" + suffix)
    loss = getattr(torch.ops.fastcore, "kv_distill_loss" + suffix)
    torch.library.opcheck(project, (kv, head_mix, dim_proj, b, *structure))
    torch.library.opcheck(
        loss,
        (kv, [s.requires_grad_() for s in student], head_mix, dim_proj, b, *structure, "cosine"),
    )


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_project"))
def test_compile_fullgraph(device, backend):
    kv, head_mix, dim_proj, b, resample = build("gqa_12_to_2", torch.float32, device)
    student = [randn((2, 2, 44, 16), torch.float32, device, seed=60 + g) for g in range(2)]

    def step(kv, head_mix, dim_proj, b, student):
        out = ops.kv_project(kv, head_mix, dim_proj, resample, b)
        loss = ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, b, "mse")
        return out.square().mean() + loss

    torch._dynamo.reset()
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(kv, head_mix, dim_proj, b, student)
        want = step(kv, head_mix, dim_proj, b, student)
        g_got = torch.autograd.grad(got, [head_mix, dim_proj])
        g_want = torch.autograd.grad(want, [head_mix, dim_proj])
    torch.testing.assert_close(got, want)
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y)


def test_backend_forced_and_fallback():
    assert "cpu" in fastcore.backends() or not fastcore._backend._C
    kv, head_mix, dim_proj, b, resample = build("per_head", torch.float64, "cpu")
    with use_backend("reference"):
        ref = ops.kv_project(kv, head_mix, dim_proj, resample, b)
    with use_backend("cpu"):
        out = ops.kv_project(kv, head_mix, dim_proj, resample, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# --- bad input: a clear error before any kernel runs


def bad_call(**overrides):
    g = torch.Generator().manual_seed(0)
    args = {
        "kv": torch.randn(2, 12, 10, 32, generator=g),
        "head_mix": torch.randn(2, 12, generator=g),
        "dim_proj": torch.randn(32, 16, generator=g),
        "resample": Resample.linear(10, 7),
        "bias": None,
    }
    args.update(overrides)
    return ops.kv_project(**args)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        # The original crash: head_mix sized from num_attention_heads (12), cache has 2 KV heads.
        ({"kv": torch.randn(2, 2, 10, 32)}, ValueError, "num_key_value_heads"),
        ({"kv": torch.randn(2, 12, 10, 32).long()}, TypeError, "int64"),
        ({"head_mix": torch.randn(12)}, ValueError, r"head_mix must be \[Hs, Ht\]"),
        ({"dim_proj": torch.randn(64, 16)}, ValueError, "head_dim 32"),
        ({"dim_proj": torch.randn(5, 32, 16)}, ValueError, "one .* per teacher KV head"),
        ({"bias": torch.randn(3)}, ValueError, "bias must be"),
        ({"resample": Resample.linear(11, 7)}, ValueError, "10 time steps"),
        ({"resample": "linear"}, TypeError, "fastcore.Resample"),
        ({"kv": torch.randn(10, 32)}, ValueError, r"\[\*lead, Ht, Tt, Dt\]"),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        bad_call(**overrides)


def test_bad_groups_and_student():
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(1, 4, 6, 8, generator=g) for _ in range(3)]
    head_mix, dim_proj = torch.randn(3, 2, 4), torch.randn(3, 8, 5)
    with pytest.raises(ValueError, match="head_mix has 3 groups but kv is a list of 2"):
        ops.kv_project(kv[:2], head_mix, dim_proj)
    with pytest.raises(ValueError, match="group 2"):
        ops.kv_project([kv[0], kv[1], torch.randn(1, 4, 7, 8)], head_mix, dim_proj)
    student = [torch.randn(1, 2, 6, 5) for _ in range(3)]
    with pytest.raises(ValueError, match=r"student group 1 has shape \(1, 2, 6, 4\)"):
        ops.kv_distill_loss(
            kv, [student[0], torch.randn(1, 2, 6, 4), student[2]], head_mix, dim_proj
        )
    with pytest.raises(ValueError, match="loss must be one of"):
        ops.kv_distill_loss(kv, student, head_mix, dim_proj, loss="kl")
    with pytest.raises(ValueError, match="reduction"):
        ops.kv_distill_loss(kv, student, head_mix, dim_proj, reduction="max")
    with pytest.raises(IndexError, match="source step 9 is out of range for 6 steps"):
        Resample.segments([0, 1], [9], [1.0], 6)
