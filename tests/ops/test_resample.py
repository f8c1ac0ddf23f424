"""fastcore.Resample and fastcore.ops.resample (build_safe_linear_indices,
safe_time_resample): teacher -> student time alignment, against F.interpolate and
float64 references, on every spmm / gather backend."""

import pytest
import torch
import torch.nn.functional as F

from fastcore import Resample, use_backend
from fastcore.ops import build_safe_linear_indices, safe_time_resample
from fastcore.testing import (
    assert_close,
    backend_dtype_params,
    backend_params,
    randn,
)

# (t_src, t_dst): up, down, equal, from and to a single step.
PAIRS = [(80, 37), (37, 80), (512, 563), (563, 512), (2, 3), (7, 1), (1, 5), (5, 5), (1, 1)]
# A smaller set for the per-backend sweeps (the Triton interpreter is slow to warm up).
BACKEND_PAIRS = [(80, 37), (37, 80), (563, 512), (2, 3), (7, 1), (1, 5)]
# nearest-exact pairs where (s + 0.5) * t_src / t_dst lands exactly on an integer.
NEAREST_TIES = [(2, 41), (2, 47), (4, 41), (6, 37)]


def pair_id(pair):
    return f"{pair[0]}to{pair[1]}"


def interpolate_along(x, dim, size, mode):
    """F.interpolate of ``x`` along ``dim`` (any rank), the oracle."""
    moved = x.movedim(dim, -1)
    lead = moved.shape[:-1]
    kwargs = {"align_corners": True} if mode == "linear" else {}
    out = F.interpolate(moved.reshape(-1, 1, moved.shape[-1]), size=size, mode=mode, **kwargs)
    return out.reshape(*lead, size).movedim(-1, dim)


def exact_nearest(t_src, t_dst):
    """nearest-exact source steps in integer arithmetic: min(floor((2s+1) t_src / 2 t_dst), T-1)."""
    s = torch.arange(t_dst)
    return torch.clamp((2 * s + 1) * t_src // (2 * t_dst), max=t_src - 1)


# ---------------------------------------------------------------------------------------
# build_safe_linear_indices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_linear_indices_match_interpolate(pair):
    t_src, t_dst = pair
    idx0, idx1, frac = build_safe_linear_indices(t_src, t_dst, "cpu")
    assert idx0.dtype == idx1.dtype == torch.int64 and frac.dtype == torch.float32
    assert idx0.shape == idx1.shape == frac.shape == (t_dst,)
    assert int(idx0.min()) >= 0 and int(idx1.max()) <= t_src - 1
    assert bool((idx1 >= idx0).all()) and bool((idx1 - idx0 <= 1).all())
    assert bool((frac >= 0).all()) and bool((frac <= 1).all())
    # Endpoints are exact (align_corners=True).
    assert int(idx0[0]) == 0 and float(frac[0]) == 0.0
    if t_dst > 1:
        last = (1 - frac[-1]) * idx0[-1] + frac[-1] * idx1[-1]
        assert float(last) == t_src - 1
    x = randn((3, 2, t_src), torch.float32, "cpu", seed=1)
    out = (1 - frac) * x[..., idx0] + frac * x[..., idx1]
    ref = F.interpolate(x, size=t_dst, mode="linear", align_corners=True)
    assert_close(out, ref, torch.float32, f"{t_src}->{t_dst}")


def test_linear_indices_edge_lengths():
    idx0, idx1, frac = build_safe_linear_indices(1, 4)
    assert idx0.tolist() == idx1.tolist() == [0, 0, 0, 0] and frac.tolist() == [0.0] * 4
    idx0, idx1, frac = build_safe_linear_indices(6, 0)
    assert idx0.shape == idx1.shape == frac.shape == (0,)
    idx0, idx1, frac = build_safe_linear_indices(6, 1)
    assert idx0.tolist() == [0] and frac.tolist() == [0.0]
    # 3 -> 5: positions 0, 0.5, 1, 1.5, 2.
    idx0, idx1, frac = build_safe_linear_indices(3, 5)
    assert idx0.tolist() == [0, 0, 1, 1, 2]
    assert idx1.tolist() == [1, 1, 2, 2, 2]
    assert frac.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]


def test_linear_indices_errors():
    with pytest.raises(ValueError, match=r"t_src must be an int >= 1, got 0"):
        build_safe_linear_indices(0, 5)
    with pytest.raises(ValueError, match=r"t_dst must be an int >= 0, got -1"):
        build_safe_linear_indices(3, -1)
    with pytest.raises(ValueError, match=r"t_src must be an int >= 1, got 3\.0"):
        build_safe_linear_indices(3.0, 5)
    with pytest.raises(ValueError, match=r"t_dst must be an int >= 0, got True"):
        build_safe_linear_indices(3, True)


# ---------------------------------------------------------------------------------------
# Resample.linear / Resample.nearest, on every spmm backend
# ---------------------------------------------------------------------------------------


def dense(resample):
    """The Resample's rows as a dense float64 [num_dst, num_src] matrix."""
    matrix = torch.zeros(resample.num_dst, resample.num_src, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(resample.num_dst), resample.ptr.diff().cpu())
    matrix.index_put_((rows, resample.idx.cpu()), resample.weight.cpu().double(), accumulate=True)
    return matrix


@pytest.mark.parametrize("pair", BACKEND_PAIRS, ids=pair_id)
@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("spmm", [torch.float32, torch.float64])
)
def test_linear_apply(device, backend, dtype, pair):
    """Resample.linear(...).apply on every backend, for a [B, H, T, D] KV cache and a
    time-last tensor: values and gradients against F.interpolate(linear,
    align_corners=True) on the same float32 input (whose float32 position arithmetic the
    contract copies), and against the Resample's own rows applied in float64."""
    t_src, t_dst = pair
    resample = Resample.linear(t_src, t_dst, device)
    assert (resample.num_src, resample.num_dst) == (t_src, t_dst)
    matrix = dense(resample).to(device)
    for shape, dim in (((2, 3, t_src, 4), 2), ((3, 5, t_src), -1)):
        x = randn(shape, dtype, device, seed=2).requires_grad_()
        with use_backend(backend):
            out = resample.apply(x, dim)
        assert out.dtype == dtype
        upstream = randn(out.shape, dtype, device, seed=3)
        (grad,) = torch.autograd.grad(out, x, upstream)
        what = f"{backend} {t_src}->{t_dst} dim {dim}"

        x64 = x.detach().double()
        rows = torch.tensordot(x64.movedim(dim, -1), matrix, ([-1], [1])).movedim(-1, dim)
        assert_close(out, rows, dtype, f"rows {what}")
        u64 = upstream.double().movedim(dim, -1)
        grad_rows = torch.tensordot(u64, matrix, ([-1], [0])).movedim(-1, dim)
        assert_close(grad, grad_rows, dtype, f"rows grad {what}")

        # F.interpolate in float64 is the exact map (float32 F.interpolate's own positions
        # are off by up to ~1e-5 relative at a few hundred steps).
        ref_x = x.detach().double().requires_grad_()
        ref = interpolate_along(ref_x, dim, t_dst, "linear")
        assert_close(out, ref, dtype, f"interpolate {what}")
        (ref_grad,) = torch.autograd.grad(ref, ref_x, upstream.double())
        assert_close(grad, ref_grad, dtype, f"interpolate grad {what}")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_linear_float64_matches_interpolate(pair):
    """In float64, Resample.linear must equal F.interpolate in float64 (to float64
    precision), gradients included."""
    t_src, t_dst = pair
    x = randn((2, 3, t_src, 4), torch.float64, "cpu", seed=25).requires_grad_()
    out = Resample.linear(t_src, t_dst).apply(x, 2)
    ref = interpolate_along(x, 2, t_dst, "linear")
    assert_close(out, ref, torch.float64, f"{t_src}->{t_dst}")
    upstream = randn(out.shape, torch.float64, "cpu", seed=26)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (ref_grad,) = torch.autograd.grad(ref, x, upstream)
    assert_close(grad, ref_grad, torch.float64, f"grad {t_src}->{t_dst}")


@pytest.mark.parametrize("pair", BACKEND_PAIRS, ids=pair_id)
@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_nearest_apply(device, backend, pair):
    """nearest == F.interpolate(mode="nearest-exact") on every backend: a copy, so exact."""
    t_src, t_dst = pair
    resample = Resample.nearest(t_src, t_dst, device)
    x = randn((2, 3, t_src, 4), torch.float32, device, seed=4).requires_grad_()
    with use_backend(backend):
        out = resample.apply(x, 2)
    assert torch.equal(out, interpolate_along(x.detach(), 2, t_dst, "nearest-exact"))
    (grad,) = torch.autograd.grad(out.sum(), x)
    counts = torch.bincount(exact_nearest(t_src, t_dst), minlength=t_src).float()
    assert torch.equal(grad, counts.to(device).view(1, 1, -1, 1).expand_as(x))


@pytest.mark.parametrize("pair", NEAREST_TIES, ids=pair_id)
def test_nearest_ties_match_interpolate(pair):
    """Where (s + 0.5) * t_src / t_dst is exactly an integer, nearest-exact takes that
    step; F.interpolate in float64 computes it exactly (F.interpolate in float32 rounds
    the tie wrong for some pairs, 4->41 and 6->37, but not for 2->41 and 2->47)."""
    t_src, t_dst = pair
    resample = Resample.nearest(t_src, t_dst)
    x = torch.arange(t_src, dtype=torch.float64).view(1, 1, t_src)
    ref = F.interpolate(x, size=t_dst, mode="nearest-exact")[0, 0].long()
    assert torch.equal(ref, exact_nearest(t_src, t_dst))
    wrong = (resample.idx != ref).nonzero().flatten().tolist()
    assert not wrong, (
        f"{t_src}->{t_dst}: student steps {wrong} take source "
        f"{resample.idx[wrong].tolist()}, F.interpolate {ref[wrong].tolist()}"
    )


def test_nearest_indices_exact():
    """Source steps of Resample.nearest vs exact integer arithmetic (which the float64
    F.interpolate oracle equals) over every length pair up to 48."""
    wrong = []
    for t_src in range(1, 49):
        for t_dst in range(1, 49):
            if not torch.equal(Resample.nearest(t_src, t_dst).idx, exact_nearest(t_src, t_dst)):
                wrong.append((t_src, t_dst))
    assert not wrong, f"{len(wrong)} (t_src, t_dst) pairs take a wrong source step: {wrong[:8]}"
    x = torch.arange(41, dtype=torch.float64).view(1, 1, 41)
    for t_dst in (1, 2, 3, 40, 41, 80, 97):
        ref = F.interpolate(x, size=t_dst, mode="nearest-exact")[0, 0].long()
        assert torch.equal(ref, exact_nearest(41, t_dst))


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_single_and_empty_sequences(device, backend):
    """T = 1 repeats the step, T = 0 gives zeros, t_dst = 0 gives an empty output, and
    an empty batch is fine; gradients flow (and are zero / empty where they must be)."""
    with use_backend(backend):
        for make in (Resample.linear, Resample.nearest):
            one = randn((2, 3, 1, 4), torch.float32, device, seed=5).requires_grad_()
            out = make(1, 6, device).apply(one, 2)
            assert torch.equal(out, one.detach().expand(2, 3, 6, 4))
            (grad,) = torch.autograd.grad(out.sum(), one)
            assert torch.equal(grad, torch.full_like(one, 6.0))

            empty = torch.empty(2, 3, 0, 4, device=device)
            out = make(0, 5, device).apply(empty, 2)
            assert out.shape == (2, 3, 5, 4) and torch.equal(out, torch.zeros(2, 3, 5, 4))

            x = randn((2, 3, 7, 4), torch.float32, device, seed=6).requires_grad_()
            out = make(7, 0, device).apply(x, 2)
            assert out.shape == (2, 3, 0, 4)
            (grad,) = torch.autograd.grad(out.sum(), x)
            assert torch.equal(grad, torch.zeros_like(x))

            batchless = torch.empty(0, 3, 7, 4, device=device)
            assert make(7, 9, device).apply(batchless, 2).shape == (0, 3, 9, 4)

            nothing = make(0, 0, device)
            assert nothing.num_dst == 0
            assert nothing.apply(torch.empty(2, 0, 3, device=device), 1).shape == (2, 0, 3)


# ---------------------------------------------------------------------------------------
# Resample.segments / Resample.from_offsets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "backend", "dtype"), backend_dtype_params("spmm", [torch.float32, torch.float64])
)
def test_segments_weights_as_given_and_empty_row(device, backend, dtype):
    # Row 0: 2*x3 - 0.5*x0 (weights not normalised), row 1 empty, row 2: 0.25*x1, row 3 empty.
    resample = Resample.segments([0, 2, 2, 3, 3], [3, 0, 1], [2.0, -0.5, 0.25], 4)
    resample = resample.to(device)
    assert (resample.num_src, resample.num_dst) == (4, 4)
    assert "num_src=4, num_dst=4, entries=3" in repr(resample)
    x = randn((2, 4, 5), dtype, device, seed=7).requires_grad_()
    with use_backend(backend):
        out = resample.apply(x, 1)
    x64 = x.detach().double()
    ref = torch.stack(
        [
            2 * x64[:, 3] - 0.5 * x64[:, 0],
            torch.zeros_like(x64[:, 0]),
            0.25 * x64[:, 1],
            torch.zeros_like(x64[:, 0]),
        ],
        1,
    )
    assert_close(out, ref, dtype, f"segments {backend}")
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))  # written, not NaN-filled
    upstream = randn(out.shape, dtype, device, seed=8)
    (grad,) = torch.autograd.grad(out, x, upstream)
    u = upstream.double()
    ref_grad = torch.stack(
        [-0.5 * u[:, 0], 0.25 * u[:, 2], torch.zeros_like(u[:, 0]), 2 * u[:, 0]], 1
    )
    assert_close(grad, ref_grad, dtype, f"segments grad {backend}")


def test_float64_weights_are_used_as_given():
    """Weights are used as given: a float64 weight must not be rounded to float32 before a
    float64 apply (0.1 and 1/3 are not float32 numbers)."""
    weight = torch.tensor([0.1, 1 / 3], dtype=torch.float64)
    resample = Resample.segments([0, 1, 2], [0, 1], weight, 2)
    x = randn((3, 2, 4), torch.float64, "cpu", seed=9)
    out = resample.apply(x, 1)
    ref = x * weight.view(1, 2, 1)
    assert_close(out, ref, torch.float64, "float64 weights")


def test_from_offsets_hand_checked():
    teacher = [(0, 3), (3, 5), (5, 9)]
    student = [(0, 5), (5, 9), (9, 9)]
    resample = Resample.from_offsets(teacher, student)
    assert (resample.num_src, resample.num_dst) == (3, 3)
    assert resample.ptr.tolist() == [0, 2, 3, 3]
    assert resample.idx.tolist() == [0, 1, 2]
    assert resample.weight.tolist() == [0.5, 0.5, 1.0]
    x = randn((2, 2, 3, 4), torch.float64, "cpu", seed=10)
    out = resample.apply(x, 2)
    ref = torch.stack([(x[:, :, 0] + x[:, :, 1]) / 2, x[:, :, 2], torch.zeros_like(x[:, :, 0])], 2)
    assert_close(out, ref, torch.float64, "from_offsets")
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    # Same rows from tensors.
    again = Resample.from_offsets(torch.tensor(teacher), torch.tensor(student))
    assert torch.equal(again.apply(x, 2), out)


def _spans(pieces, specials_before=0, specials_after=0):
    """Offsets [(start, end)] of consecutive text pieces, with (0, 0) special tokens."""
    spans, pos = [(0, 0)] * specials_before, 0
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans + [(0, 0)] * specials_after


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_from_offsets_two_tokenizers(device, backend):
    """Two tokenizations of one string: each student token averages the teacher tokens
    sharing at least one character with it (brute force over character positions)."""
    text = "unbelievable tokenizers, really!"
    teacher_pieces = ["un", "believ", "able", " token", "izers", ",", " real", "ly", "!"]
    student_pieces = ["unbel", "iev", "able to", "ken", "izers, ", "really!"]
    assert "".join(teacher_pieces) == text == "".join(student_pieces)
    teacher = _spans(teacher_pieces, specials_before=1)  # <bos>
    student = _spans(student_pieces, specials_before=1, specials_after=1)  # <s> ... </s>
    resample = Resample.from_offsets(teacher, student)
    assert (resample.num_src, resample.num_dst) == (len(teacher), len(student))

    expected_rows = []
    for s0, s1 in student:
        chars = set(range(s0, s1))
        expected_rows.append(
            [t for t, (t0, t1) in enumerate(teacher) if chars & set(range(t0, t1))]
        )
    assert expected_rows[0] == [] and expected_rows[-1] == []
    assert expected_rows[3] == [3, 4]  # "able to" <- "able", " token"
    assert expected_rows[6] == [7, 8, 9]  # "really!" <- " real", "ly", "!"

    x = randn((2, 2, len(teacher), 6), torch.float32, device, seed=11).requires_grad_()
    with use_backend(backend):
        out = resample.to(device).apply(x, 2)
    x64 = x.detach().double()
    zero = torch.zeros_like(x64[:, :, 0])
    ref = torch.stack([x64[:, :, r].mean(2) if r else zero for r in expected_rows], 2)
    assert_close(out, ref, torch.float32, f"from_offsets {backend}")
    (grad,) = torch.autograd.grad(out.sum(), x)
    counts = torch.zeros(len(teacher), dtype=torch.float64)
    for r in expected_rows:
        for t in r:
            counts[t] += 1 / len(r)
    assert_close(grad, counts.view(1, 1, -1, 1).expand_as(x64), torch.float32, "grad")


def test_from_offsets_empty():
    nothing = Resample.from_offsets([], [(0, 0), (0, 0)])
    out = nothing.apply(torch.empty(2, 0, 3), 1)
    assert out.shape == (2, 2, 3) and torch.equal(out, torch.zeros(2, 2, 3))
    no_students = Resample.from_offsets([(0, 2), (2, 4)], [])
    assert no_students.apply(randn((2, 2, 3), torch.float32, "cpu", seed=12), 1).shape == (2, 0, 3)


# ---------------------------------------------------------------------------------------
# safe_time_resample
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_safe_time_resample_original_crash(device, backend):
    """The alignment bug: indices round(i * 81 / 79) reach 81 for a T = 80 KV cache
    ("index 81 is out of bounds for dimension 2 with size 80"). Clamped to 79 instead."""
    x = randn((2, 3, 80, 4), torch.float32, device, seed=13)
    indices = torch.round(torch.arange(80) * 81 / 79).long()
    assert int(indices.max()) == 81 and int((indices >= 80).sum()) >= 1
    with use_backend(backend):
        out = safe_time_resample(x, indices)
    assert out.shape == (2, 3, 80, 4)
    assert torch.equal(out[:, :, -1], x[:, :, 79])
    assert torch.equal(out, x.index_select(2, indices.clamp(max=79).to(device)))


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_safe_time_resample_index_kinds(device, backend):
    x = randn((2, 7, 3), torch.float64, device, seed=14)
    with use_backend(backend):
        # Floats truncate toward zero (-0.9 -> 0, 2.9 -> 2), then clamp.
        out = safe_time_resample(x, torch.tensor([2.9, -0.9, 6.5, 7.2, -3.0, 0.1]), dim=1)
        assert torch.equal(out, x[:, [2, 0, 6, 6, 0, 0]])
        # Negative and too-large ints clamp; a Python list works.
        out = safe_time_resample(x, [-5, -1, 0, 3, 6, 7, 10**12], dim=-2)
        assert torch.equal(out, x[:, [0, 0, 0, 3, 6, 6, 6]])
        for dtype in (torch.int32, torch.int16, torch.uint8, torch.float64, torch.float16):
            out = safe_time_resample(x, torch.tensor([4, 1, 9, 4], dtype=dtype), dim=1)
            assert torch.equal(out, x[:, [4, 1, 6, 4]]), dtype
        # Other dims; an empty index list.
        assert torch.equal(safe_time_resample(x, [1, 5, 2], dim=-1), x[:, :, [1, 2, 2]])
        assert torch.equal(safe_time_resample(x, [1, -1], dim=0), x[[1, 0]])
        assert safe_time_resample(x, [], dim=1).shape == (2, 0, 3)
        assert safe_time_resample(x, torch.empty(0, dtype=torch.long), dim=1).shape == (2, 0, 3)
        # Default dim is 2 (B, H, T, D).
        kv = randn((1, 2, 5, 3), torch.float32, device, seed=15)
        assert torch.equal(safe_time_resample(kv, [4, 5]), kv[:, :, [4, 4]])


def test_safe_time_resample_empty_time():
    x = torch.empty(2, 3, 0, 4)
    out = safe_time_resample(x, [0, 5, -1])
    assert out.shape == (2, 3, 3, 4) and torch.equal(out, torch.zeros(2, 3, 3, 4))
    out = safe_time_resample(torch.empty(2, 0, dtype=torch.float64), torch.tensor([1.5]), dim=1)
    assert out.dtype == torch.float64 and torch.equal(out, torch.zeros(2, 1, dtype=torch.float64))
    assert safe_time_resample(x, []).shape == (2, 3, 0, 4)


def test_safe_time_resample_errors():
    x = randn((2, 5, 3), torch.float32, "cpu", seed=16)
    with pytest.raises(ValueError, match=r"indices must be 1-D, got shape \(2, 2\)"):
        safe_time_resample(x, torch.zeros(2, 2, dtype=torch.long), dim=1)
    with pytest.raises(ValueError, match=r"indices must be 1-D, got shape \(\)"):
        safe_time_resample(x, torch.tensor(1), dim=1)
    with pytest.raises(TypeError, match=r"indices must be real numbers, got torch\.bool"):
        safe_time_resample(x, torch.tensor([True, False]), dim=1)
    with pytest.raises(TypeError, match=r"indices must be real numbers, got torch\.complex64"):
        safe_time_resample(x, torch.tensor([1 + 0j]), dim=1)
    with pytest.raises(TypeError, match=r"src dtype torch\.int64 is not supported"):
        safe_time_resample(x.long(), [0], dim=1)
    with pytest.raises(IndexError, match=r"dim 3 is out of range for a tensor of 3 dimensions"):
        safe_time_resample(x, [0], dim=3)


# ---------------------------------------------------------------------------------------
# Gradients, determinism, torch.compile
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), backend_params("gather"))
def test_safe_time_resample_gradcheck(device, backend):
    x = randn((2, 4, 3), torch.float64, device, seed=17).requires_grad_()
    indices = [3, 0, 5, 3, -2, 1, 3]  # duplicates and out-of-range ones: a scatter-sum
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: safe_time_resample(x, indices, dim=1), (x,))
        out = safe_time_resample(x, indices, dim=1)
        (grad,) = torch.autograd.grad(out.sum(), x)
    counts = torch.tensor([2.0, 1.0, 0.0, 4.0], dtype=torch.float64, device=device)
    assert torch.equal(grad, counts.view(1, 4, 1).expand_as(x))


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_resample_gradcheck(device, backend):
    x = randn((2, 5, 3), torch.float64, device, seed=18).requires_grad_()
    maps = {
        "linear_up": Resample.linear(5, 8, device),
        "linear_down": Resample.linear(5, 3, device),
        "nearest": Resample.nearest(5, 7, device),
        "offsets": Resample.from_offsets(
            [(0, 2), (2, 3), (3, 6), (6, 7), (7, 9)], [(0, 3), (3, 9), (9, 9)]
        ),
    }
    with use_backend(backend):
        for name, resample in maps.items():
            resample = resample.to(device)
            assert torch.autograd.gradcheck(lambda x, r=resample: r.apply(x, 1), (x,)), name


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_deterministic(device, backend):
    resample = Resample.linear(300, 173, device)  # each source step feeds ~2 rows
    hub = Resample.segments([0, 300], list(range(300)), [0.01] * 300, 300).to(device)
    x = randn((3, 2, 300, 17), torch.float32, device, seed=19).requires_grad_()
    runs = []
    threads = torch.get_num_threads()
    try:
        with use_backend(backend):
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                out_a, out_b = resample.apply(x, 2), hub.apply(x, 2)
                upstream = randn(out_a.shape, torch.float32, device, seed=20)
                grads = torch.autograd.grad((out_a * upstream).sum() + out_b.sum(), x)
                indices = torch.arange(200) % 17 * 19  # repeated and out of range (>= 300)
                gathered = safe_time_resample(x, indices, dim=2)
                g2 = torch.autograd.grad(gathered.pow(2).sum(), x)
                runs.append((out_a, out_b, *grads, gathered, *g2))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    resample = Resample.linear(37, 80, device)
    align = Resample.from_offsets(_spans(["ab", "cde", "f"]), _spans(["abc", "def"], 1)).to(device)
    x = randn((2, 3, 37, 4), torch.float32, device, seed=21).requires_grad_()
    y = randn((2, 3, 3, 4), torch.float32, device, seed=22).requires_grad_()

    def loss(x, y):
        return (resample.apply(x, 2).tanh() ** 2).sum() + align.apply(y.sin(), -2).sum()

    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        value = compiled(x, y)
        grads = torch.autograd.grad(value, (x, y))
        expected = loss(x, y)
        expected_grads = torch.autograd.grad(expected, (x, y))
    assert_close(value, expected, torch.float32, "compiled value")
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e, torch.float32, "compiled grad")


def test_compile_safe_time_resample():
    torch._dynamo.reset()
    x = randn((2, 3, 80, 4), torch.float32, "cpu", seed=23).requires_grad_()
    indices = torch.round(torch.arange(80) * 81 / 79)

    def fn(x, indices):
        return safe_time_resample(x, indices).square().sum()

    value = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, indices)
    (grad,) = torch.autograd.grad(value, x)
    expected = fn(x, indices)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close(value, expected, torch.float32, "compiled value")
    assert_close(grad, expected_grad, torch.float32, "compiled grad")


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------


def test_resample_constructor_errors():
    with pytest.raises(ValueError, match=r"Resample\.linear: t_src must be an int >= 0, got -1"):
        Resample.linear(-1, 4)
    with pytest.raises(ValueError, match=r"Resample\.linear: t_dst must be an int >= 0, got -2"):
        Resample.linear(4, -2)
    with pytest.raises(ValueError, match=r"Resample\.nearest: t_dst must be an int >= 0, got -1"):
        Resample.nearest(4, -1)
    with pytest.raises(ValueError, match=r"Resample\.nearest: t_src must be an int >= 0, got 4\.0"):
        Resample.nearest(4.0, 3)
    with pytest.raises(ValueError, match=r"Resample\.linear: t_dst must be an int >= 0, got '3'"):
        Resample.linear(4, "3")
    with pytest.raises(ValueError, match=r"Resample: num_src must be an int >= 0, got 2\.5"):
        Resample.segments([0, 1], [0], [1.0], 2.5)
    # ptr: must start at 0, never decrease, end at len(idx).
    ptr_message = r"ptr must start at 0, never decrease and end at len\(idx\) = {n}, got {p}"
    with pytest.raises(ValueError, match=ptr_message.format(n=2, p=r"\[1, 2\]")):
        Resample.segments([1, 2], [0, 1], [1.0, 1.0], 3)
    with pytest.raises(ValueError, match=ptr_message.format(n=3, p=r"\[0, 2, 1, 3\]")):
        Resample.segments([0, 2, 1, 3], [0, 1, 2], [1.0, 1.0, 1.0], 3)
    with pytest.raises(ValueError, match=ptr_message.format(n=2, p=r"\[0, 1\]")):
        Resample.segments([0, 1], [0, 1], [1.0, 1.0], 3)
    with pytest.raises(ValueError, match=ptr_message.format(n=0, p=r"\[\]")):
        Resample.segments(torch.empty(0, dtype=torch.long), [], [], 3)
    with pytest.raises(ValueError, match=r"ptr must be 1-D int32/int64, got torch\.float32"):
        Resample.segments(torch.tensor([0.0, 1.0]), [0], [1.0], 3)
    # idx out of range: IndexError naming the value.
    with pytest.raises(IndexError, match=r"source step 5 is out of range for 5 steps"):
        Resample.segments([0, 2], [1, 5], [1.0, 1.0], 5)
    with pytest.raises(IndexError, match=r"source step -1 is out of range for 5 steps"):
        Resample.segments([0, 2], [-1, 2], [1.0, 1.0], 5)
    with pytest.raises(IndexError, match=r"source step 0 is out of range for 0 steps"):
        Resample.segments([0, 1], [0], [1.0], 0)
    # weight: one float per idx.
    with pytest.raises(
        ValueError, match=r"weight must be a 1-D float tensor with one entry per idx \(2\)"
    ):
        Resample.segments([0, 2], [0, 1], [1.0, 1.0, 1.0], 3)
    with pytest.raises(ValueError, match=r"one entry per idx \(2\), got torch\.int64 \(2,\)"):
        Resample(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([1, 1]), 3)


def test_apply_errors():
    resample = Resample.linear(6, 4)
    x = randn((2, 3, 6, 4), torch.float32, "cpu", seed=24)
    with pytest.raises(
        ValueError,
        match=r"x has 5 steps along dimension 2, but this Resample maps 6 source steps",
    ):
        resample.apply(x[:, :, :5], 2)
    with pytest.raises(ValueError, match=r"x has 4 steps along dimension 3"):
        resample.apply(x, -1)
    with pytest.raises(TypeError, match=r"src dtype torch\.int64 is not supported"):
        resample.apply(x.long(), 2)
    with pytest.raises(IndexError, match=r"dim 4 is out of range for a tensor of 4 dimensions"):
        resample.apply(x, 4)


# ---------------------------------------------------------------------------------------
# Batched (per-example) Resamples
# ---------------------------------------------------------------------------------------

# (t_src, t_dst) per example: different lengths, padded to the longest.
EXAMPLES = [(5, 3), (7, 4), (1, 2), (6, 6)]


def stacked_linears(device="cpu") -> Resample:
    return Resample.stack([Resample.linear(s, d, device) for s, d in EXAMPLES])


def test_stack_of_linears_matches_interpolate():
    resample = stacked_linears()
    assert resample.batch_size == 4 and (resample.num_src, resample.num_dst) == (7, 6)
    assert "batch_size=4" in repr(resample)
    x = randn((4, 3, 7, 2), torch.float64, "cpu", seed=30)
    out = resample.apply(x, 2)
    assert out.shape == (4, 3, 6, 2)
    for b, (t_src, t_dst) in enumerate(EXAMPLES):
        want = interpolate_along(x[b, :, :t_src], 1, t_dst, "linear")
        assert_close(out[b, :, :t_dst], want, torch.float64, f"example {b}")
        assert torch.equal(out[b, :, t_dst:], torch.zeros_like(out[b, :, t_dst:]))  # padding
        single = resample[b]
        assert single.batch_size is None and (single.num_src, single.num_dst) == (7, 6)
        assert torch.equal(single.apply(x[b], 1), out[b])
        # The example's transpose is the one its rows give.
        again = Resample.segments(single.ptr, single.idx, single.weight, 7)
        assert all(torch.equal(a, c) for a, c in zip(single.csr(), again.csr(), strict=True))
    assert torch.equal(resample[-1].ptr, resample[3].ptr)


def test_stack_sizes_and_errors():
    big = Resample.stack([Resample.linear(3, 2), Resample.nearest(2, 4)], num_src=5, num_dst=7)
    assert (big.num_src, big.num_dst, big.batch_size) == (5, 7, 2)
    assert big.ptr.tolist() == [[0, 2, 4, 4, 4, 4, 4, 4], [4, 5, 6, 7, 8, 8, 8, 8]]
    assert big.idx.tolist() == [0, 1, 2, 2, 0, 0, 1, 1]
    with pytest.raises(
        ValueError, match=r"example 1 has num_src = 6, more than the padded num_src = 5"
    ):
        Resample.stack([Resample.linear(3, 2), Resample.linear(6, 2)], num_src=5)
    with pytest.raises(
        ValueError, match=r"example 0 has num_dst = 4, more than the padded num_dst = 3"
    ):
        Resample.stack([Resample.linear(3, 4), Resample.linear(6, 2)], num_dst=3)
    with pytest.raises(ValueError, match="at least one Resample"):
        Resample.stack([])
    with pytest.raises(TypeError, match="example 1 is a str, not a Resample"):
        Resample.stack([Resample.linear(3, 4), "linear"])
    with pytest.raises(ValueError, match="example 0 is already batched"):
        Resample.stack([big])
    with pytest.raises(ValueError, match="example 1 is on meta but example 0 on cpu"):
        Resample.stack([Resample.linear(3, 4), Resample.linear(3, 4).to("meta")])
    shared = Resample.linear(3, 4)
    assert shared.batch_size is None
    with pytest.raises(TypeError, match="indexing needs a batched Resample"):
        shared[0]
    with pytest.raises(IndexError, match="example 2 is out of range for a batch of 2"):
        big[2]


def test_batched_constructor_validation():
    ptr = torch.tensor([[0, 1, 2], [2, 2, 3]])
    r = Resample.segments(ptr, [0, 1, 1], [1.0, 2.0, 3.0], 2)
    assert r.batch_size == 2 and r.num_dst == 2
    assert r.t_ptr.tolist() == [[0, 1, 2], [2, 2, 3]] and r.t_col.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"example 1's row pointer must start at 2"):
        Resample.segments(torch.tensor([[0, 1, 2], [1, 2, 3]]), [0, 1, 1], [1.0] * 3, 2)
    with pytest.raises(ValueError, match=r"example 0's row pointer .* never decrease"):
        Resample.segments(torch.tensor([[0, 2, 1], [1, 2, 3]]), [0, 1, 1], [1.0] * 3, 2)
    with pytest.raises(ValueError, match=r"must end at len\(idx\) = 4, got 3"):
        Resample.segments(ptr, [0, 1, 1, 0], [1.0] * 4, 2)
    with pytest.raises(IndexError, match="source step 2 is out of range for 2 steps"):
        Resample.segments(ptr, [0, 2, 1], [1.0] * 3, 2)
    with pytest.raises(
        ValueError, match=r"ptr must be 1-D int32/int64, got torch\.int64 \(1, 1, 2\)"
    ):
        Resample.segments(torch.zeros(1, 1, 2, dtype=torch.long), [], [], 2)


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_batched_apply_dims_and_gradients(device, backend):
    resample = stacked_linears(device)
    x = randn((4, 7, 3), torch.float64, device, seed=31).requires_grad_()
    with use_backend(backend):
        out = resample.apply(x, 1)
        assert torch.equal(resample.apply(x.transpose(1, 2), -1), out.transpose(1, 2))
        flat = resample.apply(x[:, :, 0], 1)  # no trailing dims
        assert torch.equal(flat, out[:, :, 0])
        assert torch.autograd.gradcheck(lambda x: resample.apply(x, 1), (x,))
        upstream = randn(out.shape, torch.float64, device, seed=32)
        (grad,) = torch.autograd.grad(out, x, upstream)
    for b, (t_src, _) in enumerate(EXAMPLES):
        single = resample[b]
        xb = x[b : b + 1].detach().requires_grad_()
        (want,) = torch.autograd.grad(single.apply(xb, 1), xb, upstream[b : b + 1])
        assert_close(grad[b : b + 1], want, torch.float64, f"gradient {b}")
        assert torch.equal(grad[b, t_src:], torch.zeros_like(grad[b, t_src:]))


def test_batched_apply_errors():
    resample = stacked_linears()
    with pytest.raises(
        ValueError, match=r"rows for 4 examples, so x's dimension 0 must be the batch"
    ):
        resample.apply(torch.randn(3, 7, 2), 1)
    with pytest.raises(ValueError, match="rows for 4 examples"):
        resample.apply(torch.randn(7, 4, 2), 0)


def test_from_offsets_batched_hand_checked():
    # Example 0: teacher "ab|cd", student "abc|d" + a pad; example 1: one token each, padded.
    teacher = [[(0, 2), (2, 4)], [(0, 0), (0, 3)]]  # example 1 left-padded
    student = [[(0, 3), (3, 4), (0, 0)], [(0, 3), (0, 0), (0, 0)]]
    t_mask = [[1, 1], [0, 1]]
    s_mask = [[1, 1, 0], [1, 0, 0]]
    resample = Resample.from_offsets(teacher, student, t_mask, s_mask)
    assert resample.batch_size == 2 and (resample.num_src, resample.num_dst) == (2, 3)
    assert resample.ptr.tolist() == [[0, 2, 3, 3], [3, 4, 4, 4]]
    assert resample.idx.tolist() == [0, 1, 1, 1]
    assert resample.weight.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert resample.valid_rows().tolist() == [[True, True, False], [True, False, False]]
    x = randn((2, 2, 3), torch.float64, "cpu", seed=33)
    out = resample.apply(x, 1)
    want = torch.stack(
        [
            torch.stack([(x[0, 0] + x[0, 1]) / 2, x[0, 1], torch.zeros(3, dtype=x.dtype)]),
            torch.stack([x[1, 1], torch.zeros(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype)]),
        ]
    )
    assert_close(out, want, torch.float64, "batched from_offsets")
    # Masked teacher positions are never read, whatever their offsets say.
    overlapping = Resample.from_offsets([[(0, 2), (0, 4)]], [[(0, 4)]], [[1, 0]], None)
    assert overlapping.idx.tolist() == [0]
    # A 1-D mask for one example's [T, 2] offsets.
    one = Resample.from_offsets([(0, 2), (2, 4)], [(0, 4)], teacher_mask=[1, 0])
    assert one.batch_size is None and one.idx.tolist() == [0] and one.weight.tolist() == [1.0]


def test_from_offsets_batched_errors():
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 2\) for teacher_offsets and \(2, 2\)"):
        Resample.from_offsets([[(0, 1), (1, 2)]], [(0, 1), (1, 2)])
    with pytest.raises(ValueError, match=r"got shape \(2, 2\) for teacher_offsets and \(1, 2, 2\)"):
        Resample.from_offsets([(0, 1), (1, 2)], [[(0, 1), (1, 2)]])
    with pytest.raises(ValueError, match="teacher_offsets hold 2 examples but student_offsets 1"):
        Resample.from_offsets(
            torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long)
        )
    with pytest.raises(
        ValueError,
        match=r"student_mask must have the shape of student_offsets .* \(2, 3\), got \(2, 4\)",
    ):
        Resample.from_offsets(
            torch.zeros(2, 3, 2, dtype=torch.long),
            torch.zeros(2, 3, 2, dtype=torch.long),
            student_mask=torch.ones(2, 4),
        )
    with pytest.raises(TypeError, match="teacher_mask must be bool or real"):
        Resample.from_offsets([(0, 1)], [(0, 1)], torch.ones(1, dtype=torch.complex64))


def test_valid_rows():
    resample = Resample.segments([0, 2, 2, 3, 5], [0, 1, 2, 3, 1], [1.0] * 5, 4)
    assert resample.valid_rows().tolist() == [True, False, True, True]
    teacher_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1]])
    assert resample.valid_rows(teacher_mask).tolist() == [
        [True, False, True, True],
        [False, False, True, False],  # rows 0 and 3 read step 1
        [False, False, True, True],
    ]
    batched = Resample.stack(
        [resample, Resample.linear(2, 3), Resample.segments([0, 0], [], [], 1)]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert batched.valid_rows().tolist() == [
        [True, False, True, True],
        [True, True, True, False],
        [False, False, False, False],
    ]
    # linear(2, 3): rows (0, 1), (0, 1), (1, 1) with weights (1, 0), (.5, .5), (0, 1).
    assert batched.valid_rows(mask).tolist() == [
        [True, False, True, False],  # row 2 reads step 3, masked
        [False, False, False, False],
        [False, False, False, False],
    ]
    with pytest.raises(ValueError, match=r"teacher_mask must be \[3, 4\]"):
        batched.valid_rows(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"teacher_mask must be \[B, 4\]"):
        resample.valid_rows(torch.ones(4))
    with pytest.raises(TypeError, match="teacher_mask must be a tensor"):
        resample.valid_rows([[1, 1, 1, 1]])


def test_batched_state_dict_to_and_load():
    resample = stacked_linears()
    holder = torch.nn.Module()
    holder.resample = resample
    state = holder.state_dict()
    assert state["resample.ptr"].shape == (4, 7)
    other = torch.nn.Module()
    # Same sizes, other rows (and weights): loading rebuilds the transpose.
    other.resample = Resample(resample.ptr.clone(), resample.idx.flip(0), resample.weight * 2, 7)
    assert not torch.equal(other.resample.t_col, resample.t_col)
    other.load_state_dict(state)
    for a, b in zip(other.resample.csr(), resample.csr(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(other.resample.weight, resample.weight)
    x = randn((4, 7, 2), torch.float32, "cpu", seed=34)
    assert torch.equal(other.resample.apply(x, 1), resample.apply(x, 1))
    # Another batch size in the checkpoint: an error naming the key.
    three = torch.nn.Module()
    three.resample = Resample.stack([Resample.linear(s, d) for s, d in EXAMPLES[:3]])
    with pytest.raises(RuntimeError, match=r"resample\.ptr"):
        three.load_state_dict(state)
    cast = resample.to(torch.float32)
    assert cast.weight.dtype == torch.float32 and resample.weight.dtype == torch.float64
    assert cast.batch_size == 4 and cast.ptr.dtype == torch.int64
    meta = resample.to("meta")
    assert meta.ptr.is_meta and meta.t_ptr.is_meta and not resample.ptr.is_meta
    holder.double()
    assert resample.weight.dtype == torch.float64 and resample.t_ptr.dtype == torch.int64
