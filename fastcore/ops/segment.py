"""``fastcore.ops.scatter`` and ``fastcore.ops.segment``: sum / mean / max / min of rows
grouped by an index or by CSR segments, deterministic, with their backward kernels.

Both run the ``fastcore::segment_reduce`` operator on a CSR (``perm``, ``ptr``): ``scatter``
builds it from its index with one stable sort (no host synchronisation), ``segment`` takes
rows that are already in segment order, and a :class:`fastcore.Hierarchy` keeps the CSR of
each level so pooling neither sorts nor synchronises. Each output row reduces its members
in one fixed order: no float atomics, bit-identical results run to run.

Backward: sum and mean are a ``gather`` of the output gradient (scaled by 1/count for
mean); max and min place the gradient at the saved arg (``fastcore::segment_arg_scatter``),
the first member that attains the extreme. Both have their own backward, so gradients of
any order work.
"""

from typing import Optional

import torch

from fastcore import _backend, reference
from fastcore.ops._autograd import call, register_autograd
from fastcore.ops._checks import (
    FLOAT_DTYPES,
    check_csr,
    check_dtype,
    check_index_tensor,
    csr_in_range,
    index_in_range,
    normalize_dim,
)
from fastcore.ops._csr import index_csr, segment_counts, segment_of

_backend.register_op(
    "segment", ("reference", "cpu", "triton", "cuda"), gpu_order=("cuda", "triton")
)

REDUCES = ("sum", "mean", "max", "min")


def _check_reduce(reduce: str, op: str) -> None:
    if reduce not in REDUCES:
        raise ValueError(f"{op}: reduce must be one of {', '.join(REDUCES)}; got {reduce!r}")


@torch.library.custom_op("fastcore::segment_reduce_triton", mutates_args=())
def _segment_reduce_triton(
    src: torch.Tensor,
    perm: Optional[torch.Tensor],
    ptr: torch.Tensor,
    dim: int,
    reduce: str,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_reduce(reduce, "segment_reduce")
    _check_csr_shapes(src, perm, ptr, dim, "segment_reduce")
    if check:
        check_csr(ptr, perm, src.shape[dim], "segment_reduce", dim)
    from fastcore.kernels import segment as kernels

    return kernels.segment_reduce(src, perm, ptr, dim, reduce)


@torch.library.custom_op("fastcore::segment_arg_scatter_triton", mutates_args=())
def _segment_arg_scatter_triton(
    grad: torch.Tensor, arg: torch.Tensor, dim: int, size: int
) -> torch.Tensor:
    from fastcore.kernels import segment as kernels

    return kernels.segment_arg_scatter(grad, arg, dim, size)


def _segment_reduce_fake(src, perm, ptr, dim, reduce, check):
    shape = list(src.shape)
    shape[dim] = ptr.shape[0] - 1
    arg_shape = shape if reduce in ("max", "min") else [0]
    return src.new_empty(shape), src.new_empty(arg_shape, dtype=torch.int64)


def _segment_arg_scatter_fake(grad, arg, dim, size):
    shape = list(grad.shape)
    shape[dim] = size
    return grad.new_empty(shape)


def _gather_at_arg(grad: torch.Tensor, arg: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[..., r, ...] = grad[..., arg[..., r, ...], ...]``, 0 where arg == grad.size(dim):
    the transpose of ``segment_arg_scatter``."""
    zero_row = list(grad.shape)
    zero_row[dim] = 1
    return torch.cat([grad, grad.new_zeros(zero_row)], dim).gather(dim, arg)


def _register_family(reduce_name: str, arg_scatter_name: str, gather_name: str) -> None:
    """Fake kernels and autograd for one backend's segment_reduce / segment_arg_scatter."""
    reduce_op = getattr(torch.ops.fastcore, reduce_name).default
    arg_scatter_op = getattr(torch.ops.fastcore, arg_scatter_name).default
    gather_op = getattr(torch.ops.fastcore, gather_name).default
    torch.library.register_fake(reduce_op)(_segment_reduce_fake)
    torch.library.register_fake(arg_scatter_op)(_segment_arg_scatter_fake)

    def reduce_setup(ctx, inputs, output):
        src, perm, ptr, dim, reduce, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(perm, ptr, output[1])
        ctx.dim, ctx.size, ctx.reduce = dim, src.shape[dim], reduce

    def reduce_backward(ctx, grad, _grad_arg):
        perm, ptr, arg = ctx.saved_tensors
        if ctx.reduce in ("max", "min"):
            grad_src = arg_scatter_op(grad, arg, ctx.dim, ctx.size)
        else:
            rows = segment_of(perm, ptr, ctx.size)
            if ctx.reduce == "mean":
                count = segment_counts(rows, ptr.shape[0] - 1).clamp(min=1).to(grad.dtype)
                shape = [1] * grad.dim()
                shape[ctx.dim] = count.numel()
                grad = grad / count.view(shape)
            grad_src = gather_op(grad, rows, ctx.dim, False)
        return grad_src, None, None, None, None, None

    def arg_scatter_setup(ctx, inputs, output):
        _, arg, dim, _ = inputs
        ctx.save_for_backward(arg)
        ctx.dim = dim

    def arg_scatter_backward(ctx, grad):
        (arg,) = ctx.saved_tensors
        return _gather_at_arg(grad, arg, ctx.dim), None, None, None

    register_autograd(reduce_op, reduce_backward, setup_context=reduce_setup)
    register_autograd(arg_scatter_op, arg_scatter_backward, setup_context=arg_scatter_setup)


_register_family("segment_reduce_triton", "segment_arg_scatter_triton", "gather_triton")
if _backend._C is not None:
    _register_family("segment_reduce", "segment_arg_scatter", "gather")


def _check_csr_shapes(src, perm, ptr, dim, op):
    """The CSR checks that read no values (they run with check=False too): with them,
    the kernels stay inside the tensors whatever the values are."""
    if ptr.dim() != 1 or ptr.shape[0] < 1:
        raise ValueError(
            f"{op}: ptr must be 1-D with at least one entry, got shape {tuple(ptr.shape)}"
        )
    if perm is not None and (perm.dim() != 1 or perm.shape[0] != src.shape[dim]):
        raise ValueError(
            f"{op}: perm must be 1-D of length {src.shape[dim]} (the rows along dimension "
            f"{dim}), got shape {tuple(perm.shape)}"
        )


def _segment_reduce(
    src: torch.Tensor,
    perm: Optional[torch.Tensor],
    ptr: torch.Tensor,
    dim: int,
    reduce: str,
    check: bool,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chosen backend on a CSR whose static properties are already checked:
    ``(out, arg)``, arg as documented for :func:`scatter_arg` (max/min), else empty."""
    backend = _backend.resolve("segment", src.device)
    if backend == "reference":
        if check:
            ptr = csr_in_range(ptr, perm, src.shape[dim], op, dim)
        return reference.segment_reduce(src, perm, ptr, dim, reduce)
    if backend == "triton":
        return call(torch.ops.fastcore.segment_reduce_triton, src, perm, ptr, dim, reduce, check)
    return call(torch.ops.fastcore.segment_reduce, src, perm, ptr, dim, reduce, check)


def segment_csr(
    src: torch.Tensor,
    perm: Optional[torch.Tensor],
    ptr: torch.Tensor,
    dim: int = -2,
    reduce: str = "sum",
    *,
    check: bool = True,
) -> torch.Tensor:
    """Reduce the rows of ``src`` along ``dim`` by a CSR: output row r reduces the source
    rows ``perm[ptr[r]:ptr[r+1]]`` (or ``ptr[r]:ptr[r+1]`` when ``perm`` is None), in that
    order. The building block of :func:`scatter`, :func:`segment` and graph pooling.

    Args:
        src: ``[*lead, M, *trail]`` with M at ``dim``; a float dtype.
        perm: int ``[M]``, a permutation of ``0..M-1`` listing rows in segment order, or None.
        ptr: int ``[S+1]``: ``ptr[0] = 0``, non-decreasing, ``ptr[-1] = M``.
        dim: the reduced dimension.
        reduce: ``"sum" | "mean" | "max" | "min"``.
        check: validate ``ptr``/``perm`` values first (reads them: a device sync on a GPU).
            Pass False for a CSR known to be valid, e.g. from :func:`fastcore.ops.index_csr`.

    Returns:
        ``[*lead, S, *trail]``; an empty segment gives 0.

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> src = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> perm, ptr = ops.index_csr(torch.tensor([0, 1, 0, 2]), 4)  # rows grouped by value
        >>> ops.segment_csr(src, perm, ptr, dim=0, reduce="max", check=False).flatten().tolist()
        [3.0, 2.0, 4.0, 0.0]
    """
    check_dtype(src, FLOAT_DTYPES, "segment")
    _check_reduce(reduce, "segment")
    dim = normalize_dim(dim, src.dim(), "segment")
    check_index_tensor(ptr, src, "segment", "ptr")
    if perm is not None:
        check_index_tensor(perm, src, "segment", "perm")
    _check_csr_shapes(src, perm, ptr, dim, "segment")
    return _segment_reduce(src, perm, ptr, dim, reduce, check, "segment")[0]


def segment(
    src: torch.Tensor, ptr: torch.Tensor, dim: int = -2, reduce: str = "sum", *, check: bool = True
) -> torch.Tensor:
    """Reduce consecutive runs of rows: ``out[..., r, ...] = reduce(src[..., ptr[r]:ptr[r+1], ...])``.

    Args:
        src: ``[*lead, M, *trail]`` with M at ``dim``; float16/bfloat16/float32/float64 (half
            types accumulate in float32). Any layout.
        ptr: int32/int64 ``[S+1]`` on ``src``'s device: ``ptr[0] = 0``, non-decreasing,
            ``ptr[-1] = M``.
        dim: the dimension holding the segments (negative counts from the end).
        reduce: ``"sum" | "mean" | "max" | "min"``.
        check: validate ``ptr`` before any kernel runs (a device sync on a GPU); False skips it
            for a pointer known to be valid.

    Returns:
        ``[*lead, S, *trail]``; an empty segment gives 0. Max/min propagate NaN, and their
        gradient goes to the first element attaining the extreme.

    Raises:
        ValueError: a bad ``ptr`` (``ptr[0] != 0``, decreasing, ``ptr[-1] != M``, named with
            its values) or ``reduce``; TypeError: a wrong dtype; IndexError: a bad ``dim``.

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> src = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> ptr = torch.tensor([0, 2, 2, 4])  # rows 0-1, nothing, rows 2-3
        >>> ops.segment(src, ptr, dim=0).flatten().tolist()
        [3.0, 0.0, 7.0]
        >>> ops.segment(src, ptr, dim=0, reduce="max").flatten().tolist()
        [2.0, 0.0, 4.0]
        >>> ops.segment(src, torch.tensor([0, 2, 3]), dim=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: ...ptr[-1] must equal the size 4 of dimension 0, got 3
    """
    return segment_csr(src, None, ptr, dim, reduce, check=check)


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -2,
    dim_size: Optional[int] = None,
    reduce: str = "sum",
    *,
    check: bool = True,
) -> torch.Tensor:
    """Reduce the rows of ``src`` that share an ``index`` value (torch_scatter semantics).

    ``out[..., i, ...] = reduce(src[..., m, ...] for every m with index[m] == i)``.

    Args:
        src: ``[*lead, M, *trail]`` with M at ``dim``; float16/bfloat16/float32/float64 (half
            types accumulate in float32). Any layout.
        index: int32/int64 ``[M]`` on ``src``'s device, values in ``[0, dim_size)``.
        dim: the scattered dimension (negative counts from the end).
        dim_size: the output's size along ``dim``; None takes ``index.max() + 1`` (which
            reads the index: a device sync on a GPU).
        reduce: ``"sum" | "mean" | "max" | "min"``.
        check: validate the index values before any kernel runs (a device sync on a GPU).
            ``check=False`` with ``dim_size`` given never synchronises; an out-of-range
            value then contributes to no output row (memory stays safe). To pool many
            times with one index, build a :class:`fastcore.Hierarchy` (validated once).

    Returns:
        ``[*lead, dim_size, *trail]``; a slot no row maps to is 0. Max/min propagate NaN,
        and their gradient goes to the first (lowest position) element attaining the
        extreme. Deterministic: sorted CSR, no float atomics.

    Raises:
        IndexError: an index value is negative or ``>= dim_size`` (the value is named);
        ValueError: a bad ``reduce``, ``dim_size`` or index shape; TypeError: wrong dtypes.

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> src = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> index = torch.tensor([0, 1, 0, 2])  # rows 0 and 2 share slot 0; slot 3 gets none
        >>> ops.scatter(src, index, dim=0, dim_size=4).flatten().tolist()
        [4.0, 2.0, 4.0, 0.0]
        >>> ops.scatter(src, index, dim=0, dim_size=4, reduce="mean").flatten().tolist()
        [2.0, 2.0, 4.0, 0.0]
        >>> ops.scatter(src, index, dim=0, dim_size=4, reduce="min").flatten().tolist()
        [1.0, 2.0, 4.0, 0.0]
        >>> ops.scatter(src, torch.tensor([0, 1, 0, 5]), dim=0, dim_size=4)
        Traceback (most recent call last):
            ...
        IndexError: scatter: index value 5 is out of range for dimension 0 of size 4
    """
    return _scatter(src, index, dim, dim_size, reduce, check, "scatter")[0]


def scatter_arg(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -2,
    dim_size: Optional[int] = None,
    reduce: str = "max",
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scatter` with ``reduce="max" | "min"`` and the position of each extreme.

    Args: as for :func:`scatter`; ``reduce`` is ``"max"`` or ``"min"``.

    Returns:
        ``(out, arg)``, both ``[*lead, dim_size, *trail]``: ``out`` as :func:`scatter`
        gives it, ``arg`` (int64, not differentiable) the position along ``dim`` in ``src``
        of the first element attaining each extreme (NaN counts as the extreme), and
        ``src.size(dim)`` for a slot no row maps to (torch_scatter's convention).

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> src = torch.tensor([[1.0], [5.0], [3.0], [5.0]])
        >>> out, arg = ops.scatter_arg(src, torch.tensor([0, 1, 0, 1]), dim=0, dim_size=3)
        >>> out.flatten().tolist(), arg.flatten().tolist()  # ties go to the first; slot 2 is empty
        ([3.0, 5.0, 0.0], [2, 1, 4])
    """
    if reduce not in ("max", "min"):
        raise ValueError(f"scatter_arg: reduce must be 'max' or 'min'; got {reduce!r}")
    return _scatter(src, index, dim, dim_size, reduce, check, "scatter_arg")


def _scatter(src, index, dim, dim_size, reduce, check, op):
    check_dtype(src, FLOAT_DTYPES, op)
    _check_reduce(reduce, op)
    dim = normalize_dim(dim, src.dim(), op)
    check_index_tensor(index, src, op, "index")
    if index.shape[0] != src.shape[dim]:
        raise ValueError(
            f"{op}: index has {index.shape[0]} entries but src has {src.shape[dim]} rows "
            f"along dimension {dim}"
        )
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() else 0
    elif not isinstance(dim_size, int) or dim_size < 0:
        raise ValueError(f"{op}: dim_size must be a non-negative int, got {dim_size!r}")
    if check:
        index = index_in_range(index, dim_size, op, "index", dim)
    # index_csr's CSR is valid by construction: values out of range (check=False) fall
    # before ptr[0] or from ptr[-1] on, in no segment.
    perm, ptr = index_csr(index, dim_size)
    return _segment_reduce(src, perm, ptr, dim, reduce, False, op)
