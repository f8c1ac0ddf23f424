"""kv_distill_loss's validity mask and batched (per-example) Resamples in kv_project /
kv_distill_loss, on every backend available here (reference, cpu, triton under the
interpreter), against hand computations on the materialised float64 projection (plain
PyTorch, per example, independent of the batched code paths)."""

import pytest
import torch

from fastcore import Resample, ops, use_backend
from fastcore.ops.kv_project import distill_group_loss
from fastcore.reference import kv_project as reference
from fastcore.testing import assert_close, backend_dtype_params, backend_params, randn

FLOATS = [torch.float64, torch.float32]
B, HT, TT, DT, HS, TS, DS, G = 3, 4, 11, 8, 2, 9, 6, 2


def irregular_rows(t_src: int, t_dst: int, seed: int) -> Resample:
    """Rows of 0..3 entries (an empty row, repeated sources, signed weights)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (t_dst,), generator=g)
    counts[min(1, t_dst - 1)] = 0
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    idx = torch.randint(0, t_src, (int(ptr[-1]),), generator=g)
    weight = torch.rand(int(ptr[-1]), generator=g, dtype=torch.float64) + 0.5
    return Resample.segments(ptr, idx, weight, t_src)


def make_resample(kind: str) -> Resample:
    if kind == "shared":
        return irregular_rows(TT, TS, seed=5)
    # Per example: different lengths, padded to (TT, TS).
    return Resample.stack(
        [irregular_rows(TT, TS, 6), irregular_rows(7, 5, 7), Resample.linear(TT - 2, TS - 1)],
        num_src=TT,
        num_dst=TS,
    )


def example_rows(resample: Resample, b: int) -> Resample:
    return resample if resample.batch_size is None else resample[b]


def make_mask(dtype=torch.int64) -> torch.Tensor:
    mask = torch.ones(B, TS, dtype=torch.int64)
    mask[0, [2, 5, 8]] = 0
    mask[1, 4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return mask.to(dtype)


def make_inputs(dtype, per_head: bool, bias: bool, seed: int = 0):
    kv = [randn((B, HT, TT, DT), dtype, "cpu", seed + g).requires_grad_() for g in range(G)]
    student = [
        randn((B, HS, TS, DS), dtype, "cpu", seed + 10 + g).requires_grad_() for g in range(G)
    ]
    head_mix = randn((G, HS, HT), dtype, "cpu", seed + 20).requires_grad_()
    shape = (G, HT, DT, DS) if per_head else (G, DT, DS)
    dim_proj = (randn(shape, dtype, "cpu", seed + 21) / DT**0.5).requires_grad_()
    b = randn((G, HS, DS), dtype, "cpu", seed + 22).requires_grad_() if bias else None
    return kv, student, head_mix, dim_proj, b


def hand_projection(kv, head_mix, dim_proj, bias, resample, g):
    """Group g's projection ``[B, Hs, Ts, Ds]`` in float64, example by example with its own
    shared rows (the three unfused steps)."""
    outs = []
    for b in range(kv[g].shape[0]):
        r = example_rows(resample, b)
        outs.append(
            reference.kv_project_group(
                kv[g][b : b + 1].double(),
                head_mix[g].double(),
                dim_proj[g].double(),
                None if bias is None else bias[g].double(),
                r.ptr,
                r.idx,
                r.weight.double(),
            )
        )
    return torch.cat(outs)


def hand_loss(p, s, mask, loss):
    """The masked mean by hand: boolean selection of the valid (b, t) rows."""
    valid = mask != 0
    p = p.permute(0, 2, 1, 3)[valid]  # [n_valid, Hs, Ds]
    s = s.double().permute(0, 2, 1, 3)[valid]
    if p.shape[0] == 0:
        return (p.sum() + s.sum()) * 0
    if loss == "mse":
        return (p - s).square().sum() / (p.shape[0] * p.shape[1] * p.shape[2])
    norms = p.norm(dim=-1).clamp_min(1e-8) * s.norm(dim=-1).clamp_min(1e-8)
    return (1 - (p * s).sum(-1) / norms).sum() / (p.shape[0] * p.shape[1])


def leaves(kv, student, head_mix, dim_proj, bias):
    return [*kv, *student, head_mix, dim_proj] + ([bias] if bias is not None else [])


def fused(backend, kv, student, head_mix, dim_proj, bias, resample, loss, mask):
    with use_backend(backend):
        per_group = ops.kv_distill_loss(
            kv, student, head_mix, dim_proj, resample, bias, loss, "none", mask=mask
        )
        weights = torch.arange(1, G + 1, dtype=per_group.dtype)
        grads = torch.autograd.grad(
            (per_group * weights).sum(), leaves(kv, student, head_mix, dim_proj, bias)
        )
    return per_group, grads


# ---------------------------------------------------------------------------------------
# The mask
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared", "batched"])
@pytest.mark.parametrize("layout", ["shared_proj", "per_head"])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("kv_distill_loss", FLOATS)
)
def test_masked_loss_matches_hand_computation(device, backend, dtype, loss, layout, kind):
    kv, student, head_mix, dim_proj, bias = make_inputs(dtype, layout == "per_head", True)
    resample, mask = make_resample(kind), make_mask()
    per_group, grads = fused(backend, kv, student, head_mix, dim_proj, bias, resample, loss, mask)
    want = torch.stack(
        [
            hand_loss(
                hand_projection(kv, head_mix, dim_proj, bias, resample, g), student[g], mask, loss
            )
            for g in range(G)
        ]
    )
    assert per_group.dtype == dtype and per_group.shape == (G,)
    assert_close(per_group, want, dtype, f"{backend} {loss} loss")
    params = leaves(kv, student, head_mix, dim_proj, bias)
    want_grads = torch.autograd.grad((want * torch.arange(1, G + 1)).sum(), params)
    for i, (got, ref) in enumerate(zip(grads, want_grads, strict=True)):
        assert got.dtype == params[i].dtype
        assert_close(got, ref, dtype, f"{backend} {loss} gradient {i}")
    # Masked student rows get no gradient at all.
    for g in range(G):
        assert torch.equal(
            grads[G + g].permute(0, 2, 1, 3)[mask == 0],
            torch.zeros_like(grads[G + g].permute(0, 2, 1, 3)[mask == 0]),
        )


def read_only_by_masked(resample: Resample, mask: torch.Tensor) -> torch.Tensor:
    """bool [B, Tt]: teacher steps that no valid student row of the example reads."""
    read = torch.zeros(B, TT, dtype=torch.bool)
    for b in range(B):
        r = example_rows(resample, b)
        for t in range(TS):
            if mask[b, t]:
                read[b, r.idx[r.ptr[t] : r.ptr[t + 1]]] = True
    return ~read


@pytest.mark.parametrize("kind", ["shared", "batched"])
@pytest.mark.parametrize("layout", ["shared_proj", "per_head"])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize(("device", "backend"), backend_params("kv_distill_loss"))
def test_masked_positions_never_leak(device, backend, loss, layout, kind):
    """NaN and inf at masked student rows and at teacher steps only masked rows read change
    neither the loss nor any gradient (the kernels skip those rows)."""
    dtype = torch.float32
    kv, student, head_mix, dim_proj, bias = make_inputs(dtype, layout == "per_head", True)
    resample, mask = make_resample(kind), make_mask(torch.bool)
    clean = fused(backend, kv, student, head_mix, dim_proj, bias, resample, loss, mask)
    dead = read_only_by_masked(resample, mask)
    assert dead.any() and (~dead).any()
    bad_kv, bad_student = [], []
    for g in range(G):
        x = kv[g].detach().clone()
        x.permute(0, 2, 1, 3)[dead] = float("nan") if g == 0 else float("inf")
        bad_kv.append(x.requires_grad_())
        s = student[g].detach().clone()
        s.permute(0, 2, 1, 3)[~mask] = float("nan") if g == 1 else -float("inf")
        bad_student.append(s.requires_grad_())
    dirty = fused(backend, bad_kv, bad_student, head_mix, dim_proj, bias, resample, loss, mask)
    assert torch.isfinite(dirty[0]).all()
    assert torch.equal(dirty[0], clean[0]), (dirty[0], clean[0])
    for i, (a, b) in enumerate(zip(dirty[1], clean[1], strict=True)):
        assert torch.isfinite(a).all(), f"gradient {i} not finite"
        assert torch.equal(a, b), f"gradient {i} changed"
    for g in range(G):  # no gradient flows to the dead teacher steps
        assert not dirty[1][g].permute(0, 2, 1, 3)[dead].any()


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize(("device", "backend"), backend_params("kv_distill_loss"))
def test_all_masked_gives_zero(device, backend, loss):
    kv, student, head_mix, dim_proj, bias = make_inputs(torch.float64, False, True)
    mask = torch.zeros(B, TS, dtype=torch.bool)
    per_group, grads = fused(
        backend, kv, student, head_mix, dim_proj, bias, make_resample("batched"), loss, mask
    )
    assert torch.equal(per_group, torch.zeros(G, dtype=torch.float64))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize(("device", "backend"), backend_params("kv_distill_loss"))
def test_all_valid_mask_equals_no_mask(device, backend, loss):
    """A mask with every row valid: the fused kernels give today's bits (same sums, same
    denominator); the reference its own masked path, equal to rounding."""
    kv, student, head_mix, dim_proj, bias = make_inputs(torch.float32, False, True)
    resample = make_resample("shared")
    ones = torch.ones(B, TS, dtype=torch.int64)
    plain = fused(backend, kv, student, head_mix, dim_proj, bias, resample, loss, None)
    masked = fused(backend, kv, student, head_mix, dim_proj, bias, resample, loss, ones)
    for a, b in zip([plain[0], *plain[1]], [masked[0], *masked[1]], strict=True):
        if backend == "reference":
            assert_close(a, b, torch.float32, "all-valid mask")
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_distill_loss"))
def test_mask_dtypes_and_lead_dims(device, backend):
    """bool, int64 (HF attention masks) and float masks agree; ``[*lead, Ts]`` with two lead
    dims and a grouped ``[G, ...]`` student tensor."""
    kv, student, head_mix, dim_proj, _ = make_inputs(torch.float64, False, False)
    resample, mask = make_resample("shared"), make_mask()
    with use_backend(backend):
        results = [
            ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, mask=mask.to(dt))
            for dt in (torch.bool, torch.int64, torch.float32, torch.uint8)
        ]
        kv4 = [x.detach().reshape(1, B, HT, TT, DT) for x in kv]
        st4 = torch.stack([s.detach() for s in student]).reshape(G, 1, B, HS, TS, DS)
        lead2 = ops.kv_distill_loss(
            kv4, st4, head_mix, dim_proj, resample, mask=mask.reshape(1, B, TS)
        )
    assert all(torch.equal(r, results[0]) for r in results[1:])
    torch.testing.assert_close(lead2, results[0], rtol=1e-12, atol=0)


def test_bad_mask():
    kv, student, head_mix, dim_proj, _ = make_inputs(torch.float32, False, False)
    resample = make_resample("shared")

    def call(mask):
        return ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, mask=mask)

    with pytest.raises(ValueError, match=r"mask must be \[\*lead, Ts\] = \(3, 9\).*got \(3, 8\)"):
        call(torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"got \(9,\)"):
        call(torch.ones(9))
    with pytest.raises(ValueError, match="mask is on meta but teacher_kv on cpu"):
        call(torch.ones(3, 9, device="meta"))
    with pytest.raises(
        TypeError, match=r"mask must be bool, integer or float, got torch\.complex64"
    ):
        call(torch.ones(3, 9, dtype=torch.complex64))
    with pytest.raises(TypeError, match="mask must be a tensor"):
        call([[1] * 9] * 3)


def test_distill_group_loss_mask():
    """The public helper for materialised projections takes the same mask."""
    p = randn((2, 3, HS, TS, DS), torch.float64, "cpu", 1)
    s = randn((2, 3, HS, TS, DS), torch.float64, "cpu", 2)
    mask = torch.rand(2, 3, TS, generator=torch.Generator().manual_seed(0)) > 0.4
    for loss in ("mse", "cosine"):
        got = distill_group_loss(p, s, loss, mask)
        want = hand_loss(
            p.reshape(6, HS, TS, DS), s.reshape(6, HS, TS, DS), mask.reshape(6, TS), loss
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# Batched (per-example) Resamples in kv_project / kv_distill_loss
# ---------------------------------------------------------------------------------------


def padded_offsets(seed: int, batch: int, specials: bool):
    """Random texts cut into teacher and student tokens (different tokenizations, different
    lengths), as padded offset maps: the teacher left-padded, the student right-padded,
    HF pads (0, 0) with mask 0; the student starts with a (0, 0) BOS when ``specials``."""
    g = torch.Generator().manual_seed(seed)

    def cut(length, most):
        spans, pos = [], 0
        while pos < length:
            step = int(torch.randint(1, most + 1, (1,), generator=g))
            spans.append((pos, min(length, pos + step)))
            pos += step
        return spans

    teachers, students = [], []
    for _ in range(batch):
        length = int(torch.randint(5, 30, (1,), generator=g))
        teachers.append(cut(length, 4))
        students.append(([(0, 0)] if specials else []) + cut(length, 6))
    tt = max(len(t) for t in teachers)
    ts = max(len(s) for s in students)
    t_off = torch.zeros(batch, tt, 2, dtype=torch.long)
    s_off = torch.zeros(batch, ts, 2, dtype=torch.long)
    t_mask = torch.zeros(batch, tt, dtype=torch.long)
    s_mask = torch.zeros(batch, ts, dtype=torch.long)
    for b, (t, s) in enumerate(zip(teachers, students, strict=True)):
        t_off[b, tt - len(t) :] = torch.tensor(t)
        t_mask[b, tt - len(t) :] = 1
        s_off[b, : len(s)] = torch.tensor(s)
        s_mask[b, : len(s)] = 1
    return t_off, s_off, t_mask, s_mask


def test_from_offsets_batched_equals_single_examples():
    t_off, s_off, t_mask, s_mask = padded_offsets(0, 4, specials=True)
    batched = Resample.from_offsets(t_off, s_off, t_mask, s_mask)
    assert batched.batch_size == 4
    assert (batched.num_src, batched.num_dst) == (t_off.shape[1], s_off.shape[1])
    for b in range(4):
        vt, vs = t_mask[b].nonzero().flatten(), s_mask[b].nonzero().flatten()
        single = Resample.from_offsets(t_off[b][vt], s_off[b][vs])
        example = batched[b]
        assert (example.num_src, example.num_dst) == (batched.num_src, batched.num_dst)
        # Rows at the padded positions, sources renumbered to padded teacher positions.
        for row in range(batched.num_dst):
            got = example.idx[example.ptr[row] : example.ptr[row + 1]]
            w = example.weight[example.ptr[row] : example.ptr[row + 1]]
            hit = (vs == row).nonzero().flatten()
            if hit.numel() == 0:
                assert got.numel() == 0  # a padded student position: an empty row
                continue
            r = int(hit)
            want = vt[single.idx[single.ptr[r] : single.ptr[r + 1]]]
            assert torch.equal(got, want)
            assert torch.equal(w, single.weight[single.ptr[r] : single.ptr[r + 1]])
        assert bool(t_mask[b][example.idx].all())  # masked teacher steps never read
    # Without masks the (0, 0) pads are empty spans: the same rows.
    unmasked = Resample.from_offsets(t_off, s_off)
    for name in ("ptr", "idx", "weight"):
        assert torch.equal(getattr(unmasked, name), getattr(batched, name))


@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("kv_project", FLOATS))
@pytest.mark.parametrize("layout", ["shared_proj", "per_head"])
def test_kv_project_batched_equals_per_example(device, backend, dtype, layout):
    t_off, s_off, t_mask, s_mask = padded_offsets(1, 3, specials=True)
    batched = Resample.from_offsets(t_off, s_off, t_mask, s_mask)
    tt, ts = t_off.shape[1], s_off.shape[1]
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(3, HT, tt, DT, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    head_mix = torch.randn(HS, HT, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    shape = (HT, DT, DS) if layout == "per_head" else (DT, DS)
    dim_proj = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(HS, DS, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    upstream = torch.randn(3, HS, ts, DS, generator=g, dtype=torch.float64).to(dtype)
    upstream = upstream * s_mask[:, None, :, None]  # the padded rows' output is unused
    params = [kv, head_mix, dim_proj, bias]
    with use_backend(backend):
        out = ops.kv_project(kv, head_mix, dim_proj, batched, bias)
        grads = torch.autograd.grad(out, params, upstream)
        assert out.shape == (3, HS, ts, DS)
        want_grads = [torch.zeros_like(p) for p in params]
        for b in range(3):
            vt, vs = t_mask[b].nonzero().flatten(), s_mask[b].nonzero().flatten()
            single = Resample.from_offsets(t_off[b][vt], s_off[b][vs])
            crop = kv[b : b + 1, :, vt]
            one = ops.kv_project(crop, head_mix, dim_proj, single, bias)
            assert_close(out[b : b + 1, :, vs], one, dtype, f"{backend} example {b}")
            pad = torch.ones(ts, dtype=torch.bool)
            pad[vs] = False  # padded student rows are empty: bias only
            assert_close(out[b, :, pad], bias[:, None].expand(HS, int(pad.sum()), DS), dtype, "pad")
            gb = torch.autograd.grad(one, params, upstream[b : b + 1, :, vs], allow_unused=True)
            for i, gr in enumerate(gb):
                want_grads[i] = want_grads[i] + (0 if gr is None else gr)
    for i, (got, want) in enumerate(zip(grads, want_grads, strict=True)):
        assert_close(got, want, dtype, f"{backend} gradient {i}")
    assert not grads[0].permute(0, 2, 1, 3)[t_mask == 0].any()  # pads get no gradient


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("kv_distill_loss", FLOATS)
)
def test_distill_batched_with_mask_equals_per_example(device, backend, dtype, loss):
    """The batched, masked loss is the per-example masked losses combined as one mean over
    every valid position (weights n_valid_b / n_valid); gradients too."""
    t_off, s_off, t_mask, s_mask = padded_offsets(3, 3, specials=True)
    batched = Resample.from_offsets(t_off, s_off, t_mask, s_mask)
    mask = batched.valid_rows(t_mask) & (s_mask != 0)  # BOS / pads: no teacher token
    tt, ts = t_off.shape[1], s_off.shape[1]
    kv = [randn((3, HT, tt, DT), dtype, device, 40 + g).requires_grad_() for g in range(G)]
    student = [randn((3, HS, ts, DS), dtype, device, 50 + g).requires_grad_() for g in range(G)]
    head_mix = randn((G, HS, HT), dtype, device, 60).requires_grad_()
    dim_proj = (randn((G, DT, DS), dtype, device, 61) / DT**0.5).requires_grad_()
    bias = randn((G, HS, DS), dtype, device, 62).requires_grad_()
    params = [*kv, *student, head_mix, dim_proj, bias]
    with use_backend(backend):
        got = ops.kv_distill_loss(kv, student, head_mix, dim_proj, batched, bias, loss, mask=mask)
        grads = torch.autograd.grad(got, params)
        total, count = 0, int(mask.sum())
        for b in range(3):
            vt, vs = t_mask[b].nonzero().flatten(), s_mask[b].nonzero().flatten()
            single = Resample.from_offsets(t_off[b][vt], s_off[b][vs])
            part = ops.kv_distill_loss(
                [x[b : b + 1, :, vt] for x in kv],
                [s[b : b + 1, :, vs] for s in student],
                head_mix, dim_proj, single, bias, loss, mask=mask[b : b + 1, vs],
            )  # fmt: skip
            total = total + part * int(mask[b].sum()) / count
        want_grads = torch.autograd.grad(total, params)
    assert_close(got, total, dtype, f"{backend} {loss} batched loss")
    for i, (a, w) in enumerate(zip(grads, want_grads, strict=True)):
        assert_close(a, w, dtype, f"{backend} {loss} gradient {i}")


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_project"))
def test_batched_gradcheck(device, backend):
    """float64 gradcheck through a batched Resample and a mask (cpu, reference; the
    interpreter in fast mode)."""
    g = torch.Generator().manual_seed(4)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    resample = Resample.stack([irregular_rows(5, 4, 1), irregular_rows(3, 2, 2)])
    kv, head_mix, dim_proj, bias = leaf(2, 3, 5, 4), leaf(2, 3), leaf(3, 4, 3), leaf(2, 3)
    student = leaf(2, 2, 4, 3)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    fast = backend == "triton"
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: ops.kv_project(a[0], a[1], a[2], resample, a[3]),
            (kv, head_mix, dim_proj, bias),
            fast_mode=fast,
        )
        assert torch.autograd.gradcheck(
            lambda *a: ops.kv_distill_loss(
                a[0], a[4], a[1], a[2], resample, a[3], "cosine", mask=mask
            ),
            (kv, head_mix, dim_proj, bias, student),
            fast_mode=fast,
        )


def test_batched_errors():
    kv = torch.randn(2, 4, 7, 8)
    head_mix, dim_proj = torch.randn(2, 4), torch.randn(8, 5)
    three = Resample.stack([Resample.linear(7, 3)] * 3)
    with pytest.raises(ValueError, match=r"rows for 3 examples but kv's leading dimensions \(2,\)"):
        ops.kv_project(kv, head_mix, dim_proj, three)
    with pytest.raises(ValueError, match=r"rows for 3 examples"):
        ops.kv_distill_loss(kv, torch.randn(2, 2, 3, 5), head_mix, dim_proj, three)
    # [G, lead...] kv: the lead dims fold to the batch.
    two = Resample.stack([Resample.linear(7, 3), Resample.nearest(7, 3)])
    out = ops.kv_project(kv[None], head_mix[None], dim_proj[None], two)
    assert out.shape == (1, 2, 2, 3, 5)
    with pytest.raises(ValueError, match=r"leading dimensions \(1, 2\) hold 2"):
        ops.kv_project(kv[None], head_mix, dim_proj, three)


# ---------------------------------------------------------------------------------------
# opcheck and torch.compile with the new arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "backend"),
    [p for p in backend_params("kv_project") if p.values[1] != "reference"],
)
def test_opcheck_mask_and_batched_rows(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    project = getattr(torch.ops.fastcore, "kv_project" + suffix)
    loss = getattr(torch.ops.fastcore, "kv_distill_loss" + suffix)
    kv, student, head_mix, dim_proj, bias = make_inputs(torch.float32, False, True)
    resample = make_resample("batched")
    structure = [
        resample.ptr, resample.idx, resample.weight.float(), resample.t_ptr, resample.t_col,
        resample.t_edge,
    ]  # fmt: skip
    mask = make_mask(torch.bool)
    torch.library.opcheck(project, (kv, head_mix, dim_proj, bias, *structure))
    torch.library.opcheck(loss, (kv, student, head_mix, dim_proj, bias, *structure, "mse", mask))
    shared = make_resample("shared")
    rows = [
        shared.ptr,
        shared.idx,
        shared.weight.float(),
        shared.t_ptr,
        shared.t_col,
        shared.t_edge,
    ]
    torch.library.opcheck(loss, (kv, student, head_mix, dim_proj, bias, *rows, "cosine", mask))


@pytest.mark.parametrize(("device", "backend"), backend_params("kv_distill_loss"))
def test_compile_fullgraph_mask_and_batched(device, backend):
    kv, student, head_mix, dim_proj, bias = make_inputs(torch.float32, False, True)
    resample = make_resample("batched")
    mask = make_mask()

    def step(kv, student, head_mix, dim_proj, bias, mask):
        out = ops.kv_project(kv, head_mix, dim_proj, resample, bias)
        rows = resample.valid_rows() & (mask != 0)
        loss = ops.kv_distill_loss(kv, student, head_mix, dim_proj, resample, bias, mask=rows)
        resampled = resample.apply(kv[0], 2)  # a batched Resample's apply, compiled too
        return out.square().mean() + loss + resampled.tanh().mean()

    torch._dynamo.reset()
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(kv, student, head_mix, dim_proj, bias, mask)
        want = step(kv, student, head_mix, dim_proj, bias, mask)
        params = [*kv, *student, head_mix, dim_proj, bias]
        g_got = torch.autograd.grad(got, params)
        g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y)
