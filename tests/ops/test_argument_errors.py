"""The small cases a user hit off the default path: each a clear error naming the value,
or the documented result (never Python internals, never a silent truncation)."""

import math

import pytest
import torch

from fastcore import Graph, Resample, ops
from fastcore.testing import randn

SRC = randn((2, 5, 3), torch.float32, "cpu", seed=1)
INDEX = torch.tensor([0, 2, 1, 1, 0])
PTR = torch.tensor([0, 2, 5])
GRAPH = Graph(torch.tensor([[0, 1, 2], [1, 2, 3]]), num_nodes=5)

DIM_CALLS = {
    "gather": lambda dim: ops.gather(SRC, INDEX, dim),
    "gather_add": lambda dim: ops.gather_add(SRC, INDEX, SRC, dim),
    "scatter": lambda dim: ops.scatter(SRC, INDEX, dim, 3),
    "scatter_arg": lambda dim: ops.scatter_arg(SRC, INDEX, dim, 3),
    "segment": lambda dim: ops.segment(SRC, PTR, dim),
    "segment_csr": lambda dim: ops.segment_csr(SRC, None, PTR, dim),
    "spmm": lambda dim: ops.spmm(SRC, GRAPH, dim=dim),
    "safe_time_resample": lambda dim: ops.safe_time_resample(SRC, [0, 1], dim),
}


@pytest.mark.parametrize("dim", [None, 1.0, "1", True])
@pytest.mark.parametrize("op", list(DIM_CALLS))
def test_dim_must_be_an_int(op, dim):
    name = "segment" if op == "segment_csr" else op  # segment_csr is segment with a perm
    with pytest.raises(TypeError, match=rf"{name}: dim must be an int, got {dim!r:.4}"):
        DIM_CALLS[op](dim)


@pytest.mark.parametrize(
    ("indices", "steps"),
    [
        ([math.inf, 1e30, 2**70, -math.inf, 3.7, -0.5, 2], [4, 4, 4, 0, 3, 0, 2]),
        (torch.tensor([float("inf"), 1e30, -1e30, 4.999]), [4, 4, 0, 4]),
        (torch.tensor([9, -3, 2**62], dtype=torch.int64), [4, 0, 4]),
    ],
)
def test_safe_time_resample_clamps_every_real_index(indices, steps):
    x = randn((1, 2, 5, 3), torch.float64, "cpu", seed=2)
    out = ops.safe_time_resample(x, indices)
    assert torch.equal(out, x[:, :, steps])


def test_safe_time_resample_rejects_nan():
    x = randn((1, 2, 5, 3), torch.float64, "cpu", seed=3)
    with pytest.raises(ValueError, match="indices contain NaN"):
        ops.safe_time_resample(x, [0.0, float("nan")])


@pytest.mark.parametrize(
    ("index", "size", "error", "message"),
    [
        (
            torch.tensor([0.0, 1.0]),
            2,
            TypeError,
            "index must be an int32 or int64 tensor, got torch.float32",
        ),
        ([0, 1], 2, TypeError, "index must be an int32 or int64 tensor, got list"),
        (torch.tensor([[0, 1]]), 2, ValueError, r"index must be 1-D, got shape \(1, 2\)"),
        (torch.tensor([0, 1]), -1, ValueError, "size must be an int >= 0, got -1"),
        (torch.tensor([0, 1]), 2.0, ValueError, "size must be an int >= 0, got 2.0"),
        (torch.tensor([0, 1]), True, ValueError, "size must be an int >= 0, got True"),
    ],
)
def test_index_csr_arguments(index, size, error, message):
    with pytest.raises(error, match=f"index_csr: {message}"):
        ops.index_csr(index, size)


def test_resample_segments_rejects_float_steps_and_complex_weights():
    ptr = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match=r"idx must hold integer source steps, got torch\.float32"):
        Resample.segments(ptr, torch.tensor([0.0, 1.5]), [1.0, 1.0], 3)
    with pytest.raises(TypeError, match=r"idx must hold integer source steps, got torch\.float32"):
        Resample.segments(ptr, [0, 1.5], [1.0, 1.0], 3)
    with pytest.raises(TypeError, match=r"weight must be real, got torch\.complex64"):
        Resample.segments(ptr, [0, 1], torch.tensor([1 + 1j, 1.0]), 3)
    # Integer weights are exact in float64 and accepted.
    assert Resample.segments(ptr, [0, 2], [1, 2], 3).weight.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([0, 1, 2], r"teacher_offsets must be \[T, 2\] \(start, end\) pairs, got shape \(3,\)"),
        ([[0, 1, 2]], r"got shape \(1, 3\)"),
        ([[[0, 1], [1, 2]]], r"a batch's must be resampled per example\), got shape \(1, 2, 2\)"),
    ],
)
def test_from_offsets_shapes(offsets, message):
    with pytest.raises(ValueError, match=message):
        Resample.from_offsets(offsets, [[0, 1]])


def test_from_offsets_rejects_float_offsets():
    with pytest.raises(TypeError, match=r"student_offsets must be integers, got torch\.float32"):
        Resample.from_offsets([[0, 1]], [[0.0, 1.5]])


def test_kv_project_bias_must_be_a_tensor():
    kv = randn((1, 2, 4, 8), torch.float32, "cpu", seed=4)
    head_mix = randn((1, 2), torch.float32, "cpu", seed=5)
    dim_proj = randn((8, 4), torch.float32, "cpu", seed=6)
    with pytest.raises(TypeError, match="kv_project: bias must be a tensor, got list"):
        ops.kv_project(kv, head_mix, dim_proj, bias=[0.0])
