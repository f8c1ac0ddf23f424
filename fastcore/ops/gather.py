"""``fastcore.ops.gather``: index_select along any dim, with a deterministic backward.

The template every fastcore op follows:

* ``fastcore/reference/gather.py`` - the oracle (``index_select``);
* ``csrc/fastcore.cpp`` - the schemas ``fastcore::gather`` and ``fastcore::csr_sum``;
  ``csrc/cpu/gather.cpp`` and ``csrc/cuda/gather.cpp`` - their CPU and CUDA kernels;
* ``fastcore/kernels/gather.py`` - Triton kernels, registered below as ``fastcore::gather_triton``
  and ``fastcore::csr_sum_triton``;
* this module - fake kernels and autograd for both op families, and the public function
  that validates, picks the backend and calls the registered operator.

The gradient of ``gather`` w.r.t. ``src`` is a scatter-sum. It runs as a sum over CSR
segments (``csr_sum``): the index is sorted once (stably), each output row sums its
incoming rows in a fixed order, so results are bit-identical run to run, with no float
atomics. ``csr_sum``'s own gradient is a ``gather``, so gradients of any order work.
"""

from typing import Optional

import torch

from fastcore import _backend, reference
from fastcore.ops._autograd import call, register_autograd
from fastcore.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_csr,
    check_dtype,
    check_index_range,
    check_index_tensor,
    index_in_range,
    normalize_dim,
)
from fastcore.ops._csr import index_csr, segment_of

_backend.register_op("gather", ("reference", "cpu", "triton", "cuda"), gpu_order=("cuda", "triton"))
# No CUDA C++ kernel yet: CUDA tensors run the Triton one.
_backend.register_op("gather_add", ("reference", "cpu", "triton"), gpu_order=("triton",))

GATHER_DTYPES = (*FLOAT_DTYPES, *INDEX_DTYPES)


@torch.library.custom_op("fastcore::gather_triton", mutates_args=())
def _gather_triton(src: torch.Tensor, index: torch.Tensor, dim: int, check: bool) -> torch.Tensor:
    if check:
        check_index_range(index, src.shape[dim], "gather", "index", dim)
    from fastcore.kernels import gather as kernels

    return kernels.gather(src, index, dim)


@torch.library.custom_op("fastcore::gather_add_triton", mutates_args=())
def _gather_add_triton(
    src: torch.Tensor, index: torch.Tensor, base: torch.Tensor, dim: int, check: bool
) -> torch.Tensor:
    if check:
        check_index_range(index, src.shape[dim], "gather_add", "index", dim)
    from fastcore.kernels import gather as kernels

    return kernels.gather(src, index, dim, base)


@torch.library.custom_op("fastcore::csr_sum_triton", mutates_args=())
def _csr_sum_triton(
    src: torch.Tensor, perm: Optional[torch.Tensor], ptr: torch.Tensor, dim: int, check: bool
) -> torch.Tensor:
    if check:
        check_csr(ptr, perm, src.shape[dim], "csr_sum", dim)
    from fastcore.kernels import gather as kernels

    return kernels.csr_sum(src, perm, ptr, dim)


def _gather_fake(src, index, dim, check):
    shape = list(src.shape)
    shape[dim] = index.shape[0]
    return src.new_empty(shape)


def _gather_add_fake(src, index, base, dim, check):
    return _gather_fake(src, index, dim, check)


def _csr_sum_fake(src, perm, ptr, dim, check):
    shape = list(src.shape)
    shape[dim] = ptr.shape[0] - 1
    return src.new_empty(shape)


def _register_family(gather_name: str, gather_add_name: str, csr_sum_name: str) -> None:
    """Fake kernels and autograd for one backend's gather, gather_add and csr_sum."""
    gather_op = getattr(torch.ops.fastcore, gather_name).default
    gather_add_op = getattr(torch.ops.fastcore, gather_add_name).default
    csr_sum_op = getattr(torch.ops.fastcore, csr_sum_name).default
    torch.library.register_fake(gather_op)(_gather_fake)
    torch.library.register_fake(gather_add_op)(_gather_add_fake)
    torch.library.register_fake(csr_sum_op)(_csr_sum_fake)

    def gather_setup(ctx, inputs, output):
        src, index, dim, _ = inputs
        ctx.save_for_backward(index)
        ctx.dim, ctx.size = dim, src.shape[dim]

    def gather_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        perm, ptr = index_csr(index, ctx.size)
        return csr_sum_op(grad, perm, ptr, ctx.dim, False), None, None, None

    def gather_add_setup(ctx, inputs, output):
        src, index, _, dim, _ = inputs
        ctx.save_for_backward(index)
        ctx.dim, ctx.size = dim, src.shape[dim]

    def gather_add_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        perm, ptr = index_csr(index, ctx.size)
        return csr_sum_op(grad, perm, ptr, ctx.dim, False), None, grad, None, None

    def csr_sum_setup(ctx, inputs, output):
        src, perm, ptr, dim, _ = inputs
        ctx.save_for_backward(perm, ptr)
        ctx.dim, ctx.size = dim, src.shape[dim]

    def csr_sum_backward(ctx, grad):
        perm, ptr = ctx.saved_tensors
        rows = segment_of(perm, ptr, ctx.size)
        return gather_op(grad, rows, ctx.dim, False), None, None, None, None

    register_autograd(gather_op, gather_backward, setup_context=gather_setup)
    register_autograd(gather_add_op, gather_add_backward, setup_context=gather_add_setup)
    register_autograd(csr_sum_op, csr_sum_backward, setup_context=csr_sum_setup)


_register_family("gather_triton", "gather_add_triton", "csr_sum_triton")
if _backend._C is not None:
    _register_family("gather", "gather_add", "csr_sum")


def gather(
    src: torch.Tensor, index: torch.Tensor, dim: int = -2, *, check: bool = True
) -> torch.Tensor:
    """Select rows of ``src`` along ``dim``: ``out = src.index_select(dim, index)``.

    Args:
        src: ``[*lead, N, *trail]`` with N at ``dim``; float16/bfloat16/float32/float64
            (differentiable) or int32/int64. Any layout; non-contiguous input is copied.
        index: ``[M]`` int32 or int64 on ``src``'s device, every value in ``[0, N)``.
        dim: the dimension to index (negative counts from the end).
        check: validate the index values before any kernel runs (a device sync on a GPU);
            False skips it for an index known to be valid (e.g. a Hierarchy's parents).

    Returns:
        ``[*lead, M, *trail]``. Its gradient w.r.t. ``src`` is a deterministic scatter-sum
        (sorted CSR, no float atomics; half types accumulate in float32).

    Raises:
        IndexError: an index value is negative or ``>= N`` (the value is named), before
            any kernel runs; or ``dim`` is out of range.
        TypeError / ValueError: wrong dtype, a non-1-D index, or mismatched devices.

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> src = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
        >>> out = ops.gather(src, torch.tensor([2, 0, 2]), dim=0)
        >>> out.tolist()
        [[5.0, 6.0], [1.0, 2.0], [5.0, 6.0]]
        >>> out.sum().backward()  # the scatter-sum: row 2 was read twice
        >>> src.grad.tolist()
        [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
        >>> ops.gather(src, torch.tensor([0, 3]), dim=0)
        Traceback (most recent call last):
            ...
        IndexError: gather: index value 3 is out of range for dimension 0 of size 3
    """
    check_dtype(src, GATHER_DTYPES, "gather")
    dim = normalize_dim(dim, src.dim(), "gather")
    check_index_tensor(index, src, "gather", "index")
    backend = _backend.resolve("gather", src.device)
    if backend == "reference":
        if check:
            index = index_in_range(index, src.shape[dim], "gather", "index", dim)
        return reference.gather(src, index, dim)
    op = torch.ops.fastcore.gather_triton if backend == "triton" else torch.ops.fastcore.gather
    return call(op, src, index, dim, check)


def gather_add(
    src: torch.Tensor,
    index: torch.Tensor,
    base: torch.Tensor,
    dim: int = -2,
    *,
    check: bool = True,
) -> torch.Tensor:
    """``base + src.index_select(dim, index)`` in one pass: unpooling fused with its skip
    connection (half the memory traffic of a gather followed by an add).

    Args:
        src: ``[*lead, N, *trail]``; float16/bfloat16/float32/float64.
        index: int32/int64 ``[M]``, values in ``[0, N)``.
        base: ``[*lead, M, *trail]``, src's dtype and device.
        dim: the indexed dimension.
        check: validate the index values first (a device sync on a GPU).

    Returns:
        ``[*lead, M, *trail]``. Gradients: ``base`` gets the output gradient, ``src`` its
        deterministic scatter-sum (as for :func:`gather`).

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> parents = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> skip = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
        >>> ops.gather_add(parents, torch.tensor([0, 0, 1]), skip, dim=0).tolist()
        [[11.0, 12.0], [21.0, 22.0], [33.0, 34.0]]
    """
    check_dtype(src, FLOAT_DTYPES, "gather_add")
    dim = normalize_dim(dim, src.dim(), "gather_add")
    check_index_tensor(index, src, "gather_add", "index")
    expected = list(src.shape)
    expected[dim] = index.shape[0]
    if not isinstance(base, torch.Tensor) or list(base.shape) != expected:
        shape = tuple(base.shape) if isinstance(base, torch.Tensor) else type(base).__name__
        raise ValueError(f"gather_add: base has shape {shape}, expected {tuple(expected)}")
    if base.dtype != src.dtype or base.device != src.device:
        raise TypeError(
            f"gather_add: base ({base.dtype} on {base.device}) must match src "
            f"({src.dtype} on {src.device})"
        )
    backend = _backend.resolve("gather_add", src.device)
    if backend == "reference":
        if check:
            index = index_in_range(index, src.shape[dim], "gather_add", "index", dim)
        return base + reference.gather(src, index, dim)
    op = (
        torch.ops.fastcore.gather_add_triton
        if backend == "triton"
        else torch.ops.fastcore.gather_add
    )
    return call(op, src, index, base, dim, check)
