"""``fastcore.compat``: torch_scatter's API on fastcore's kernels.

Table-driven like torch_scatter's own suite, with values written here from its documented
behaviour: each case pins a few literal results (values, positions of extremes, member
counts), so the expectations do not lean on any oracle. On top: ``out=`` with non-zero
initial values, every broadcasting form of the index, ``dim_size`` types, empty inputs,
a plain-PyTorch oracle (``torch.scatter_reduce`` with ``include_self=False``, positions
by a Python loop) on random inputs, gradcheck, determinism and bad input.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fastcore import compat, ops
from fastcore.testing import assert_close

FLOATS = [torch.float32, torch.float64]
INTS = [torch.int32, torch.int64]
REDUCES = ["sum", "add", "mean", "mul", "min", "max"]

# Each case: src, index, dim and, per reduce, the expected output; arg_<r> the position
# along dim of the first extreme (src.size(dim) for an empty slot); count the members of
# each slot. Empty slots: 0 (mul: 1).
SCATTER_CASES = {
    "1-D": {
        "src": [2, 7, 1, 4, 3, 6],
        "index": [1, 0, 1, 3, 0, 1],
        "dim": -1,
        "count": [2, 3, 0, 1],
        "sum": [10, 9, 0, 4],
        "mul": [21, 12, 1, 4],
        "mean": [5, 3, 0, 4],
        "min": [3, 1, 0, 4],
        "arg_min": [4, 2, 6, 3],
        "max": [7, 6, 0, 4],
        "arg_max": [1, 5, 6, 3],
    },
    "rows (1-D index along dim 0)": {
        "src": [[1, 8], [4, 2], [4, 6], [0, 2], [7, 4]],
        "index": [2, 0, 0, 2, 0],
        "dim": 0,
        "count": [[3, 3], [0, 0], [2, 2]],
        "sum": [[15, 12], [0, 0], [1, 10]],
        "mul": [[112, 48], [1, 1], [0, 16]],
        "mean": [[5, 4], [0, 0], [0.5, 5]],
        "min": [[4, 2], [0, 0], [0, 2]],
        "arg_min": [[1, 1], [5, 5], [3, 3]],  # the tie 4, 4 goes to row 1
        "max": [[7, 6], [0, 0], [1, 8]],
        "arg_max": [[4, 2], [5, 5], [0, 0]],
    },
    "per-element targets": {
        "src": [[3, 1, 4, 1], [5, 9, 4, 6]],
        "index": [[0, 2, 0, 2], [1, 1, 1, 0]],
        "dim": 1,
        "count": [[2, 0, 2], [1, 3, 0]],
        "sum": [[7, 0, 2], [6, 18, 0]],
        "mul": [[12, 1, 1], [6, 180, 1]],
        "mean": [[3.5, 0, 1], [6, 6, 0]],
        "min": [[3, 0, 1], [6, 4, 0]],
        "arg_min": [[0, 4, 1], [3, 2, 4]],
        "max": [[4, 0, 1], [6, 9, 0]],
        "arg_max": [[2, 4, 1], [3, 1, 4]],
    },
    "2-D index broadcast over a trailing dim": {
        "src": [[[1, 2], [3, 4], [5, 6]], [[6, 5], [4, 3], [2, 1]]],
        "index": [[1, 1, 0], [0, 2, 0]],
        "dim": 1,
        "count": [[[1, 1], [2, 2], [0, 0]], [[2, 2], [0, 0], [1, 1]]],
        "sum": [[[5, 6], [4, 6], [0, 0]], [[8, 6], [0, 0], [4, 3]]],
        "mul": [[[5, 6], [3, 8], [1, 1]], [[12, 5], [1, 1], [4, 3]]],
        "mean": [[[5, 6], [2, 3], [0, 0]], [[4, 3], [0, 0], [4, 3]]],
        "min": [[[5, 6], [1, 2], [0, 0]], [[2, 1], [0, 0], [4, 3]]],
        "arg_min": [[[2, 2], [0, 0], [3, 3]], [[2, 2], [3, 3], [1, 1]]],
        "max": [[[5, 6], [3, 4], [0, 0]], [[6, 5], [0, 0], [4, 3]]],
        "arg_max": [[[2, 2], [1, 1], [3, 3]], [[0, 0], [3, 3], [1, 1]]],
    },
    "index with a size-1 leading dim": {
        "src": [[2, 5, 1], [3, 3, 8]],
        "index": [[1, 0, 1]],
        "dim": 1,
        "count": [[1, 2], [1, 2]],
        "sum": [[5, 3], [3, 11]],
        "mul": [[5, 2], [3, 24]],
        "mean": [[5, 1.5], [3, 5.5]],
        "min": [[5, 1], [3, 3]],
        "arg_min": [[1, 2], [1, 0]],
        "max": [[5, 2], [3, 8]],
        "arg_max": [[1, 0], [1, 2]],
    },
}

# src, indptr and the equivalent sorted index, per reduce the expected output; gather_src
# (one row per segment) and gathered, what gather_csr / gather_coo give for it.
SEGMENT_CASES = {
    "1-D": {
        "src": [1, 4, 2, 8, 5, 7],
        "indptr": [0, 2, 5, 5, 6],
        "index": [0, 0, 1, 1, 1, 3],
        "sum": [5, 15, 0, 7],
        "mean": [2.5, 5, 0, 7],
        "min": [1, 2, 0, 7],
        "arg_min": [0, 2, 6, 5],
        "max": [4, 8, 0, 7],
        "arg_max": [1, 3, 6, 5],
        "gather_src": [10, 20, 30, 40],
        "gathered": [10, 10, 20, 20, 20, 40],
    },
    "rows": {
        "src": [[1, 2], [6, 5], [3, 3], [3, 7]],
        "indptr": [0, 1, 4],
        "index": [0, 1, 1, 1],
        "sum": [[1, 2], [12, 15]],
        "mean": [[1, 2], [4, 5]],
        "min": [[1, 2], [3, 3]],
        "arg_min": [[0, 0], [2, 2]],
        "max": [[1, 2], [6, 7]],
        "arg_max": [[0, 0], [1, 3]],
        "gather_src": [[1, 2], [3, 4]],
        "gathered": [[1, 2], [3, 4], [3, 4], [3, 4]],
    },
    "batched indptr": {
        "src": [[5, 1, 2, 6], [3, 7, 5, 1]],
        "indptr": [[0, 1, 4], [0, 3, 4]],
        "index": [[0, 1, 1, 1], [0, 0, 0, 1]],
        "sum": [[5, 9], [15, 1]],
        "mean": [[5, 3], [5, 1]],
        "min": [[5, 1], [3, 1]],
        "arg_min": [[0, 1], [0, 3]],
        "max": [[5, 6], [7, 1]],
        "arg_max": [[0, 3], [1, 3]],
        "gather_src": [[5, 6], [7, 8]],
        "gathered": [[5, 6, 6, 6], [7, 7, 7, 8]],
    },
    "batched indptr, trailing dim": {
        "src": [[[1, 2], [3, 4], [5, 6]], [[9, 8], [7, 6], [5, 4]]],
        "indptr": [[0, 2, 2, 3], [0, 1, 3, 3]],
        "index": [[0, 0, 2], [0, 1, 1]],
        "sum": [[[4, 6], [0, 0], [5, 6]], [[9, 8], [12, 10], [0, 0]]],
        "mean": [[[2, 3], [0, 0], [5, 6]], [[9, 8], [6, 5], [0, 0]]],
        "min": [[[1, 2], [0, 0], [5, 6]], [[9, 8], [5, 4], [0, 0]]],
        "arg_min": [[[0, 0], [3, 3], [2, 2]], [[0, 0], [2, 2], [3, 3]]],
        "max": [[[3, 4], [0, 0], [5, 6]], [[9, 8], [7, 6], [0, 0]]],
        "arg_max": [[[1, 1], [3, 3], [2, 2]], [[0, 0], [1, 1], [3, 3]]],
        "gather_src": [[[1, 1], [2, 2], [3, 3]], [[4, 4], [5, 5], [6, 6]]],
        "gathered": [[[1, 1], [1, 1], [3, 3]], [[4, 4], [5, 5], [5, 5]]],
    },
}


def _t(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


def _dtypes(reduce: str) -> list[torch.dtype]:
    return FLOATS if reduce == "mean" else FLOATS + INTS


def _table(cases: dict, reduces: list[str]):
    return [
        pytest.param(name, reduce, dtype, id=f"{name}-{reduce}-{str(dtype)[6:]}")
        for name, reduce in itertools.product(cases, reduces)
        for dtype in _dtypes(reduce)
    ]


# ----------------------------------------------------------------------------- scatter table


@pytest.mark.parametrize(("name", "reduce", "dtype"), _table(SCATTER_CASES, REDUCES))
def test_scatter_table(name, reduce, dtype):
    case = SCATTER_CASES[name]
    src, index, dim = _t(case["src"], dtype), _t(case["index"]), case["dim"]
    key = "sum" if reduce == "add" else reduce
    expected = _t(case[key], dtype)
    out = compat.scatter(src, index, dim, reduce=reduce)
    assert out.dtype == dtype and out.is_contiguous()
    assert out.tolist() == expected.tolist()
    named = getattr(compat, f"scatter_{reduce}")(src, index, dim)
    if reduce in ("min", "max"):
        named, arg = named
        assert arg.dtype == torch.int64
        assert arg.tolist() == case[f"arg_{reduce}"]
    assert named.tolist() == expected.tolist()


@pytest.mark.parametrize(("name", "reduce", "dtype"), _table(SCATTER_CASES, REDUCES))
def test_scatter_out_combines(name, reduce, dtype):
    """``out`` starts at 3 everywhere: sum adds, mul multiplies, mean divides ``out + Σ`` by
    the count, max/min keep 3 where the slot's extreme does not strictly beat it (arg =
    src.size(dim) there); the same object comes back."""
    case = SCATTER_CASES[name]
    src, index, dim = _t(case["src"], dtype), _t(case["index"]), case["dim"]
    key = "sum" if reduce == "add" else reduce
    count = _t(case["count"])
    rows = src.shape[dim]
    out = torch.full(count.shape, 3, dtype=dtype)
    result = getattr(compat, f"scatter_{reduce}")(src, index, dim, out, dim_size=99)
    if reduce in ("min", "max"):
        result, arg = result
    assert result is out
    exp = _t(case[key], torch.float64)
    if key == "sum":
        expected = exp + 3
    elif key == "mul":
        expected = exp * 3
    elif key == "mean":
        expected = (_t(case["sum"], torch.float64) + 3) / count.clamp(min=1)
    else:
        wins = (count > 0) & ((exp > 3) if key == "max" else (exp < 3))
        expected = torch.where(wins, exp, 3.0)
        assert arg.tolist() == torch.where(wins, _t(case[f"arg_{key}"]), rows).tolist()
    assert out.double().tolist() == expected.tolist()


def test_scatter_defaults_to_the_last_dim():
    src = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    index = torch.tensor([1, 0, 1])
    assert compat.scatter(src, index).tolist() == [[2.0, 4.0], [5.0, 10.0]]
    assert torch.equal(compat.scatter(src, index), compat.scatter(src, index, dim=1))


@pytest.mark.parametrize(
    "dim_size",
    [5, np.int64(5), np.int32(5), torch.tensor(5), torch.tensor(5, dtype=torch.int32)],
    ids=["int", "np.int64", "np.int32", "0-d tensor", "0-d int32 tensor"],
)
def test_dim_size_types(dim_size):
    src = torch.tensor([1.0, 2.0, 3.0])
    out = compat.scatter(src, torch.tensor([0, 3, 0]), dim_size=dim_size, reduce="mean")
    assert out.tolist() == [2.0, 0.0, 0.0, 2.0, 0.0]
    out, arg = compat.scatter_max(src, torch.tensor([0, 3, 0]), dim_size=dim_size)
    assert arg.tolist() == [2, 3, 3, 1, 3]


@pytest.mark.parametrize(
    ("dim_size", "error"),
    [(-1, ValueError), (2.0, TypeError), (True, TypeError), (torch.tensor([3]), TypeError)],
    ids=["negative", "float", "bool", "1-D tensor"],
)
def test_bad_dim_size(dim_size, error):
    with pytest.raises(error, match="dim_size"):
        compat.scatter(torch.ones(3), torch.tensor([0, 1, 0]), dim_size=dim_size)


def test_broadcast_shapes_as_torch_scatter():
    """torch_scatter's own broadcasting check (B, C, H, W), every reduce."""
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = 4, 3, 8, 8
    src = torch.randn(b, c, h, w, generator=gen)
    for reduce in REDUCES:
        line = torch.randint(0, h, (h,), generator=gen)
        assert compat.scatter(src, line, dim=2, dim_size=h, reduce=reduce).shape == (b, c, h, w)
        index = torch.randint(0, h, (b, 1, h, w), generator=gen)
        assert compat.scatter(src, index, dim=2, dim_size=h, reduce=reduce).shape == (b, c, h, w)


def test_paths_reach_fastcore_kernels(monkeypatch):
    """A 1-D (or broadcast) index runs fastcore.ops.scatter on src as it is; a per-element
    index runs it on rows of width 1 keyed by index * C + column."""
    calls = []
    real = ops.scatter

    def spy(src, index, dim=-2, dim_size=None, reduce="sum", *, check=True):
        calls.append((tuple(src.shape), index.dim(), dim, dim_size))
        return real(src, index, dim, dim_size, reduce, check=check)

    monkeypatch.setattr(ops, "scatter", spy)
    src = torch.randn(2, 5, 3)
    compat.scatter(src, torch.tensor([0, 1, 0, 2, 1]), dim=1)
    compat.scatter(src, torch.tensor([[0, 1, 0, 2, 1]]), dim=1)  # size-1 lead: broadcast
    per_element = torch.tensor([[0, 1, 0, 2, 1], [1, 1, 0, 0, 2]])
    compat.scatter(src, per_element, dim=1)
    assert calls == [((2, 5, 3), 1, 1, 3), ((2, 5, 3), 1, 1, 3), ((30, 1), 1, 0, 3 * 6)]


# ----------------------------------------------------------------------------- oracle


def _torch_scatter_broadcast(index, src, dim):
    """torch_scatter's rule, written out for the oracle."""
    if index.dim() == 1:
        index = index.view([1] * dim + [-1])
    while index.dim() < src.dim():
        index = index.unsqueeze(-1)
    return index.expand(src.shape)


def _oracle(src, index, dim, size, reduce, out=None):
    """Plain PyTorch: ``scatter_reduce`` with ``include_self=False`` for the values, a
    Python loop for the first position of each extreme, ``out`` combined as torch_scatter
    does."""
    dim = dim % src.dim()
    idx = _torch_scatter_broadcast(index, src, dim)
    shape = list(src.shape)
    shape[dim] = size
    torch_reduce = {"sum": "sum", "mean": "mean", "mul": "prod", "max": "amax", "min": "amin"}
    base = (
        torch.ones(shape, dtype=src.dtype)
        if reduce == "mul"
        else torch.zeros(shape, dtype=src.dtype)
    )
    values = base.scatter_reduce(dim, idx, src, torch_reduce[reduce], include_self=False)
    count = torch.zeros(shape, dtype=torch.int64).scatter_add_(dim, idx, torch.ones_like(idx))
    if reduce == "mean" and not src.is_floating_point():
        total = base.scatter_reduce(dim, idx, src, "sum", include_self=False)
        values = torch.div(total, count.clamp(min=1), rounding_mode="floor")
    arg = None
    if reduce in ("max", "min"):
        arg = torch.full(shape, src.shape[dim], dtype=torch.int64)
        best = {}
        for pos in itertools.product(*(range(n) for n in src.shape)):
            slot = list(pos)
            slot[dim] = int(idx[pos])
            slot = tuple(slot)
            v = src[pos].item()
            if slot not in best or (v > best[slot] if reduce == "max" else v < best[slot]):
                best[slot] = v
                arg[slot] = pos[dim]
    if out is None:
        return values, arg
    if reduce == "sum":
        return out + values, arg
    if reduce == "mul":
        return out * values, arg
    if reduce == "mean":
        total = base.scatter_reduce(dim, idx, src, "sum", include_self=False)
        if not src.is_floating_point():  # torch_scatter's scatter_mean floors integers
            return torch.div(out + total, count.clamp(min=1), rounding_mode="floor"), arg
        return (out + total) / count.clamp(min=1), arg
    wins = (count > 0) & ((values > out) if reduce == "max" else (values < out))
    return torch.where(wins, values, out), torch.where(wins, arg, src.shape[dim])


ORACLE_SHAPES = [
    # (src shape, dim, index shape: None = 1-D along dim)
    ((7,), 0, None),
    ((6, 3), 0, None),
    ((2, 7, 3), 1, None),
    ((2, 7, 3), -2, (2, 7)),  # per element, broadcast over the trailing dim
    ((3, 5), -1, (3, 5)),  # per element
    ((2, 3, 5), 2, (1, 3, 5)),  # size-1 lead: a broadcast view
    ((4, 1, 5), 0, (4, 1, 5)),
]


ORACLE_RUNS = list(
    itertools.product(
        ["sum", "mean", "mul", "min", "max"],
        [torch.float32, torch.float64, torch.int32, torch.int64],
    )
)


@pytest.mark.parametrize(
    ("seed", "reduce", "dtype"),
    [(seed, r, d) for seed, (r, d) in enumerate(ORACLE_RUNS)],
    ids=[f"{r}-{str(d)[6:]}" for r, d in ORACLE_RUNS],
)
def test_against_plain_pytorch(seed, reduce, dtype):
    gen = torch.Generator().manual_seed(seed)
    for (shape, dim, index_shape), with_out in itertools.product(ORACLE_SHAPES, (False, True)):
        size = 5
        if dtype.is_floating_point:
            # small integers as floats: ties for max/min; mul stays far from overflow
            src = torch.randint(-3, 4, shape, generator=gen).to(dtype)
            if reduce in ("sum", "mean"):
                src = src + torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
        else:
            src = torch.randint(-9, 10, shape, generator=gen, dtype=dtype)
        rows = shape[dim]
        index = torch.randint(0, size, index_shape or (rows,), generator=gen)
        out = (
            torch.randint(
                -3,
                4,
                (*shape[: dim % len(shape)], size, *shape[dim % len(shape) + 1 :]),
                generator=gen,
            ).to(dtype)
            if with_out
            else None
        )
        expected, expected_arg = _oracle(src, index, dim, size, reduce, out)
        result = getattr(compat, f"scatter_{reduce}")(src, index, dim, out, size)
        if reduce in ("max", "min"):
            result, arg = result
            assert torch.equal(arg, expected_arg), (shape, dim, index_shape, with_out)
        what = f"{reduce} {shape} dim={dim} index={index_shape} out={with_out}"
        if dtype.is_floating_point and reduce in ("sum", "mean", "mul"):
            assert_close(result, expected.to(dtype), dtype, what)
        else:
            assert torch.equal(result, expected.to(dtype)), what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["sum", "mean", "mul", "max"])
def test_half_types(dtype, reduce):
    gen = torch.Generator().manual_seed(3)
    src = (torch.rand(6, 4, generator=gen) + 0.5).to(dtype)
    index = torch.randint(0, 3, (6, 4), generator=gen)
    result = compat.scatter(src, index, 0, dim_size=3, reduce=reduce)
    expected, _ = _oracle(src.double(), index, 0, 3, reduce)
    assert result.dtype == dtype
    assert_close(result, expected, dtype, f"{reduce} {dtype}")


# ----------------------------------------------------------------------------- semantics


def test_integer_means_floor_in_scatter_and_truncate_in_segments():
    src, index = torch.tensor([-3, 0, 5, 2]), torch.tensor([0, 0, 1, 1])
    assert compat.scatter_mean(src, index).tolist() == [-2, 3]  # floor(-3 / 2)
    assert compat.segment_coo(src, index, reduce="mean").tolist() == [-1, 3]  # toward zero
    assert compat.segment_csr(src, torch.tensor([0, 2, 4]), reduce="mean").tolist() == [-1, 3]
    out = torch.tensor([1, 1])
    assert compat.scatter_mean(src, index, out=out).tolist() == [-1, 4]  # floor((1 - 3) / 2)


def test_mul_quirks_and_exact_gradient():
    assert compat.scatter_mul(
        torch.ones(0), torch.zeros(0, dtype=torch.long), dim_size=2
    ).tolist() == [0.0, 0.0]
    src = torch.tensor([0.0, 2.0, 3.0, 0.0, 5.0], dtype=torch.float64, requires_grad=True)
    out = compat.scatter_mul(src, torch.tensor([0, 0, 0, 1, 1]))
    out.sum().backward()
    ref = src.detach().clone().requires_grad_()
    (ref[:3].prod() + ref[3:].prod()).backward()
    assert out.tolist() == [0.0, 0.0]
    assert src.grad.tolist() == ref.grad.tolist() == [6.0, 0.0, 0.0, 5.0, 0.0]


def test_nan_and_infinite_extremes():
    src = torch.tensor([1.0, float("nan"), 3.0, -math.inf, -math.inf])
    out, arg = compat.scatter_max(src, torch.tensor([0, 0, 0, 1, 1]))
    assert math.isnan(out[0]) and out[1] == -math.inf
    assert arg.tolist() == [1, 3]


def test_gradient_reaches_out():
    base = torch.tensor([1.0, 10.0, 0.0], requires_grad=True)
    src = torch.tensor([2.0, 4.0, 5.0], requires_grad=True)
    out = base * 1.0
    result, arg = compat.scatter_max(src, torch.tensor([0, 0, 1]), out=out)
    assert result is out and result.tolist() == [4.0, 10.0, 0.0] and arg.tolist() == [1, 3, 3]
    result.sum().backward()
    assert base.grad.tolist() == [0.0, 1.0, 1.0]
    assert src.grad.tolist() == [0.0, 1.0, 0.0]
    out = base * 1.0
    compat.scatter_sum(src, torch.tensor([0, 0, 1]), out=out).sum().backward()
    assert base.grad.tolist() == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("reduce", REDUCES)
def test_empty_inputs(reduce):
    src, index = torch.randn(0, 3), torch.zeros(0, dtype=torch.long)
    result = compat.scatter(src, index, 0, dim_size=4, reduce=reduce)
    assert result.tolist() == [[0.0] * 3] * 4  # torch_scatter: 0 even for mul
    assert compat.scatter(src, index, 0, reduce=reduce).shape == (0, 3)
    # the broadcast index is empty: torch_scatter's size rule gives 0 whatever its values
    assert compat.scatter(torch.randn(0, 4), torch.tensor([1, 0, 1, 2]), reduce=reduce).shape == (
        0,
        0,
    )
    out = torch.full((2, 3), 7.0)
    assert compat.scatter(src, index, 0, out, reduce=reduce) is out
    assert out.eq(7).all()
    if reduce in ("min", "max"):
        _, arg = getattr(compat, f"scatter_{reduce}")(src, index, 0, dim_size=2)
        assert arg.tolist() == [[0] * 3] * 2


@pytest.mark.parametrize("reduce", ["sum", "mean", "min", "max", "mul"])
def test_zero_element_tensors_backward(reduce):
    """torch_scatter's zero-tensor check: shapes and a backward through every function."""
    x = torch.randn(0, 0, 0, 16, requires_grad=True)
    index, indptr = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    results = [
        compat.scatter(x, index, dim=0, dim_size=0, reduce=reduce),
        compat.gather_coo(x, index),
        compat.gather_csr(x, indptr),
    ]
    if reduce != "mul":
        results += [
            compat.segment_coo(x, index, dim_size=0, reduce=reduce),
            compat.segment_csr(x, indptr, reduce=reduce),
        ]
    for result in results:
        assert result.shape == (0, 0, 0, 16)
        result.backward(torch.randn_like(result))


# ----------------------------------------------------------------------------- segments


SEGMENT_REDUCES = ["sum", "add", "mean", "min", "max"]


@pytest.mark.parametrize(("name", "reduce", "dtype"), _table(SEGMENT_CASES, SEGMENT_REDUCES))
def test_segment_table(name, reduce, dtype):
    case = SEGMENT_CASES[name]
    src, indptr, index = _t(case["src"], dtype), _t(case["indptr"]), _t(case["index"])
    key = "sum" if reduce == "add" else reduce
    expected = case[key]
    assert compat.segment_csr(src, indptr, reduce=reduce).tolist() == expected
    assert compat.segment_coo(src, index, reduce=reduce).tolist() == expected
    csr = getattr(compat, f"segment_{reduce}_csr")(src, indptr)
    coo = getattr(compat, f"segment_{reduce}_coo")(src, index)
    if reduce in ("min", "max"):
        (csr, csr_arg), (coo, coo_arg) = csr, coo
        assert csr_arg.tolist() == coo_arg.tolist() == case[f"arg_{reduce}"]
    assert csr.tolist() == coo.tolist() == expected
    assert csr.is_contiguous() and coo.is_contiguous() and csr.dtype == coo.dtype == dtype
    # out=: segment_csr overwrites it, segment_coo combines with it as scatter does
    out = torch.full_like(_t(expected, dtype), -2)
    assert compat.segment_csr(src, indptr, out, reduce=reduce) is out
    assert out.tolist() == expected
    out.fill_(-2)
    assert compat.segment_coo(src, index, out, reduce=reduce) is out
    if key == "sum":
        assert out.tolist() == (_t(expected, dtype) - 2).tolist()
    elif key == "max":
        assert (
            out.tolist()
            == torch.where(
                _t(case["arg_max"]) < src.shape[index.dim() - 1], _t(expected, dtype), -2
            ).tolist()
        )
    elif key == "min":
        assert out.eq(-2).all()


@pytest.mark.parametrize("name", list(SEGMENT_CASES))
@pytest.mark.parametrize("dtype", FLOATS + INTS)
def test_gather_table(name, dtype):
    case = SEGMENT_CASES[name]
    src, indptr, index = _t(case["gather_src"], dtype), _t(case["indptr"]), _t(case["index"])
    assert compat.gather_csr(src, indptr).tolist() == case["gathered"]
    assert compat.gather_coo(src, index).tolist() == case["gathered"]
    out = torch.full_like(_t(case["gathered"], dtype), -2)
    assert compat.gather_csr(src, indptr, out) is out
    assert out.tolist() == case["gathered"]
    out.fill_(-2)
    assert compat.gather_coo(src, index, out) is out
    assert out.tolist() == case["gathered"]


def test_indptr_covering_part_of_src():
    """torch_scatter's indptr need not start at 0 nor end at src.size(dim)."""
    src = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0, 7.0])
    indptr = torch.tensor([1, 3, 5])
    assert compat.segment_csr(src, indptr).tolist() == [6.0, 13.0]
    assert compat.segment_csr(src, indptr, reduce="mean").tolist() == [3.0, 6.5]
    out, arg = compat.segment_max_csr(src, indptr)
    assert out.tolist() == [4.0, 8.0] and arg.tolist() == [1, 3]
    batched = torch.tensor([[5.0, 1.0, 2.0, 6.0], [3.0, 7.0, 5.0, 1.0]])
    assert compat.segment_csr(batched, torch.tensor([[1, 2], [0, 4]])).tolist() == [[1.0], [16.0]]
    assert compat.segment_csr(batched.long(), torch.tensor([[1, 2], [0, 4]])).tolist() == [
        [1],
        [16],
    ]
    # gather_csr: rows no segment covers are 0, or keep out's values
    assert compat.gather_csr(torch.tensor([10.0, 20.0]), torch.tensor([1, 3, 4])).tolist() == [
        0.0,
        10.0,
        10.0,
        20.0,
    ]
    out = torch.full((5,), -1.0)
    compat.gather_csr(torch.tensor([10.0, 20.0]), torch.tensor([1, 3, 4]), out)
    assert out.tolist() == [-1.0, 10.0, 10.0, 20.0, -1.0]


def test_segment_broadcast_indptr_and_index():
    """An indptr/index with size-1 leading dims applies to every batch."""
    src = torch.arange(12.0).view(2, 6)
    indptr, index = torch.tensor([[0, 2, 6]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    expected = [[1.0, 14.0], [13.0, 38.0]]
    assert compat.segment_csr(src, indptr).tolist() == expected
    assert compat.segment_coo(src, index).tolist() == expected
    assert compat.gather_csr(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), indptr).tolist() == [
        [1.0, 1.0, 2.0, 2.0, 2.0, 2.0],
        [3.0, 3.0, 4.0, 4.0, 4.0, 4.0],
    ]
    assert compat.gather_coo(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), index[:, :3]).tolist() == [
        [1.0, 1.0, 2.0],
        [3.0, 3.0, 4.0],
    ]


def test_segments_against_scatter_on_random_input():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(3, 40, 5, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 9, (3, 40), generator=gen).sort(dim=1).values
    counts = torch.zeros(3, 9, dtype=torch.long).scatter_add_(1, index, torch.ones_like(index))
    indptr = torch.cat([torch.zeros(3, 1, dtype=torch.long), counts.cumsum(1)], 1)
    for reduce in ("sum", "mean", "min", "max"):
        expected = compat.scatter(src, index, 1, dim_size=9, reduce=reduce)
        assert_close(
            compat.segment_csr(src, indptr, reduce=reduce), expected, torch.float64, reduce
        )
        assert_close(
            compat.segment_coo(src, index, dim_size=9, reduce=reduce),
            expected,
            torch.float64,
            reduce,
        )
    assert torch.equal(compat.gather_csr(expected, indptr), compat.gather_coo(expected, index))


# ----------------------------------------------------------------------------- gradients


def _double(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "mul"])
@pytest.mark.parametrize("per_element", [False, True], ids=["1-D index", "per-element index"])
def test_gradcheck_scatter(reduce, per_element):
    src = _double((5, 3), 0)
    index = (
        torch.tensor([[0, 2, 2], [1, 0, 2], [0, 0, 1], [2, 1, 1], [0, 3, 0]])
        if per_element
        else torch.tensor([0, 2, 0, 1, 2])
    )
    assert torch.autograd.gradcheck(
        lambda s: compat.scatter(s, index, 0, dim_size=4, reduce=reduce), (src,)
    )


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_gradcheck_scatter_with_out(reduce):
    src, base = _double((5, 3), 1), _double((3, 3), 2)
    index = torch.tensor([0, 2, 0, 1, 2])

    def run(s, b):
        return compat.scatter(s, index, 0, out=b * 1.0, reduce=reduce)

    assert torch.autograd.gradcheck(run, (src, base))


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_gradcheck_segments(reduce):
    src, batched = _double((6, 2), 3), _double((2, 4, 2), 4)
    indptr, index = torch.tensor([1, 3, 3, 6]), torch.tensor([0, 0, 1, 1, 1, 3])
    batched_indptr = torch.tensor([[0, 1, 4], [0, 3, 3]])
    assert torch.autograd.gradcheck(lambda s: compat.segment_csr(s, indptr, reduce=reduce), (src,))
    assert torch.autograd.gradcheck(
        lambda s: compat.segment_csr(s, batched_indptr, reduce=reduce), (batched,)
    )
    assert torch.autograd.gradcheck(lambda s: compat.segment_coo(s, index, reduce=reduce), (src,))


def test_gradcheck_gathers():
    src, batched = _double((3, 2), 5), _double((2, 2, 2), 6)
    assert torch.autograd.gradcheck(
        lambda s: compat.gather_csr(s, torch.tensor([0, 2, 2, 5])), (src,)
    )
    assert torch.autograd.gradcheck(
        lambda s: compat.gather_csr(s, torch.tensor([[0, 1, 4], [1, 3, 4]])), (batched,)
    )
    assert torch.autograd.gradcheck(
        lambda s: compat.gather_coo(s, torch.tensor([0, 0, 2, 2])), (src,)
    )
    assert torch.autograd.gradcheck(
        lambda s: compat.gather_coo(s, torch.tensor([[0, 1, 1], [0, 0, 1]])), (batched,)
    )


# ----------------------------------------------------------------------------- determinism


def test_same_bits_twice():
    gen = torch.Generator().manual_seed(7)
    src = torch.randn(3000, 8, generator=gen)
    line = torch.randint(0, 40, (3000,), generator=gen)
    per_element = torch.randint(0, 40, (3000, 8), generator=gen)
    sorted_index = line.sort().values
    runs = [
        lambda: compat.scatter(src, line, 0, reduce="sum"),
        lambda: compat.scatter(src, line, 0, reduce="mean"),
        lambda: compat.scatter(src[:200].sigmoid() + 0.5, line[:200], 0, reduce="mul"),
        lambda: compat.scatter(src, per_element, 0, reduce="sum"),
        lambda: compat.scatter(src, per_element, 0, out=torch.ones(40, 8), reduce="mean"),
        lambda: compat.segment_coo(src, sorted_index, reduce="sum"),
        lambda: compat.segment_csr(
            src.view(2, 1500, 8), torch.tensor([[0, 700, 1500], [5, 900, 1400]])
        ),
    ]
    for run in runs:
        assert torch.equal(run(), run())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("index", "src_dtype", "message"),
    [
        ([0, 7, 1], torch.float32, "index value 7 is out of range for dimension 0 of size 5"),
        (
            [[0, 1], [7, 0], [1, 1]],
            torch.float32,
            "index value 7 is out of range for dimension 0 of size 5",
        ),
        ([0, 7, 1], torch.int64, "index value 7 is out of range for dimension 0 of size 5"),
        ([0, -2, 1], torch.float32, "negative value -2"),
    ],
    ids=["1-D", "per-element", "integer src", "negative"],
)
def test_bad_index_is_a_clear_error(index, src_dtype, message):
    src = torch.ones(3, 2, dtype=src_dtype)
    for reduce in REDUCES:
        with pytest.raises(IndexError, match=message):
            compat.scatter(src, torch.tensor(index), 0, dim_size=5, reduce=reduce)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: compat.scatter(torch.ones(3), torch.tensor([0, 1, 0]), reduce="prod"),
            ValueError,
            "reduce must be one of",
        ),
        (
            lambda: compat.segment_csr(torch.ones(3), torch.tensor([0, 3]), reduce="mul"),
            ValueError,
            "reduce must be one of",
        ),
        (
            lambda: compat.scatter(torch.ones(4, 2), torch.tensor([[0, 1], [1, 0], [0, 0]]), 0),
            ValueError,
            "cannot be broadcast",
        ),
        (
            lambda: compat.scatter(torch.ones(3), torch.tensor([0.0, 1.0, 0.0])),
            TypeError,
            "int32 or int64",
        ),
        (
            lambda: compat.scatter(torch.ones(3, dtype=torch.bool), torch.tensor([0, 1, 0])),
            TypeError,
            "not supported",
        ),
        (
            lambda: compat.scatter(torch.ones(3), torch.tensor([0, 1, 0]), dim=1),
            IndexError,
            "dim 1 is out of range",
        ),
        (
            lambda: compat.scatter(torch.ones(3), torch.tensor([0, 1, 0]), out=torch.zeros(2, 2)),
            ValueError,
            "out has shape",
        ),
        (
            lambda: compat.scatter(
                torch.ones(3), torch.tensor([0, 1, 0]), out=torch.zeros(2, dtype=torch.float64)
            ),
            TypeError,
            "out dtype",
        ),
        (
            lambda: compat.segment_coo(torch.ones(4), torch.tensor([0, 2, 1, 2])),
            ValueError,
            r"sorted along its last dimension, got index\[1\] = 2 > index\[2\] = 1",
        ),
        (
            lambda: compat.gather_coo(torch.ones(1, 3), torch.tensor([[0, 2, 1]])),
            ValueError,
            r"index\[0, 1\] = 2 > index\[0, 2\] = 1",
        ),
        (
            lambda: compat.gather_coo(torch.ones(3), torch.tensor([0, 3])),
            IndexError,
            "index value 3 is out of range",
        ),
        (
            lambda: compat.segment_csr(torch.ones(4), torch.tensor([0, 3, 2, 4])),
            ValueError,
            r"non-decreasing .* indptr\[1\] = 3 > indptr\[2\] = 2",
        ),
        (
            lambda: compat.segment_csr(torch.ones(4), torch.tensor([0, 2, 5])),
            IndexError,
            r"indptr value 5 is out of range \[0, 4\]",
        ),
        (
            lambda: compat.segment_csr(torch.ones(4), torch.tensor([-1, 2, 4])),
            IndexError,
            "negative value -1",
        ),
        (
            lambda: compat.segment_csr(torch.ones(2, 4), torch.tensor([[0, 4], [0, 4], [0, 4]])),
            ValueError,
            "leading dimensions",
        ),
        (
            lambda: compat.gather_csr(torch.ones(3), torch.tensor([0, 2, 4])),
            ValueError,
            "holds 2 segments",
        ),
        (
            lambda: compat.gather_csr(torch.ones(2), torch.tensor([0, 2, 4]), torch.zeros(3)),
            IndexError,
            r"indptr value 4 is out of range \[0, 3\]",
        ),
    ],
    ids=[
        "reduce",
        "segment reduce",
        "index shape",
        "float index",
        "bool src",
        "dim",
        "out shape",
        "out dtype",
        "unsorted segment_coo",
        "unsorted gather_coo",
        "gather_coo range",
        "decreasing indptr",
        "indptr past src",
        "negative indptr",
        "indptr lead",
        "gather_csr rows",
        "gather_csr out rows",
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
