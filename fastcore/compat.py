"""torch_scatter's API on fastcore's deterministic kernels.

PyG-style code switches by changing its import::

    from torch_scatter import scatter, scatter_max, segment_csr    # before
    from fastcore.compat import scatter, scatter_max, segment_csr  # after

Every function keeps torch_scatter's (2.1) name, signature, defaults and semantics:
``dim=-1``; an ``index`` broadcast against ``src`` by torch_scatter's rule (a 1-D index lies
along ``dim``, any other is aligned with ``src``'s leading dimensions, then expanded);
``out=`` combined with the result and returned as the same object; ``dim_size`` as any
integer (Python int, numpy integer, 0-d tensor); ``scatter_max``/``scatter_min`` and the
``segment_max_*``/``segment_min_*`` functions return ``(out, arg)`` with ``arg =
src.size(dim)`` for an empty slot; the quirks below are reproduced. Floating ``src`` runs
fastcore's operators (``fastcore.ops.scatter``, ``scatter_arg``, ``segment``, ``gather``,
``index_csr``), so gradients, backends and determinism come from fastcore.

How each call maps onto fastcore: an index that is the same for every position of the
other dimensions (a 1-D index, broadcast) runs ``fastcore.ops.scatter(src, index, dim)`` on
``src`` as it is; an index with its own target per element is flattened (``dim`` moved
first, key ``index * C + column``, rows of width 1) onto the same kernels, still
deterministic. ``segment_csr``/``segment_coo`` sums and means run ``fastcore.ops.segment``
(no sort); their max/min run ``scatter_arg``. ``reduce="mul"`` sorts by target (stable)
and multiplies each group as a pairwise tree in position order: deterministic, no atomics.
Integer ``src`` runs torch's own scatter ops: integer sums, products, minima and maxima are
exact whatever the order, so they are deterministic too (fastcore's kernels are
float-only).

Reproduced torch_scatter quirks: an empty slot is 0 (``mul``: 1), but ``mul`` over an
entirely empty ``src`` gives 0; ``dim_size`` is ignored when ``out`` is given;
``segment_csr(out=)`` and ``gather_*(out=)`` overwrite ``out`` while ``scatter_*`` and
``segment_coo`` combine with it; integer means round down (floor) in ``scatter_mean`` but
toward zero in ``segment_*`` (torch_scatter's CPU kernels; its GPU ``segment_coo`` floors);
``indptr`` need not start at 0 nor end at ``src.size(dim)`` (rows outside it are left out).

Differences from torch_scatter, all of them:

* **Deterministic**: identical bits run to run (sorted CSR, fixed order, no float
  atomics); torch_scatter's ``scatter`` and ``segment_coo`` use atomics on a GPU. Float
  sums and products are taken in a different order, so they can differ from
  torch_scatter's in the last bits (integers never do). Half types accumulate in float32
  (torch_scatter's ``scatter`` accumulates in the half type).
* **Ties**: max/min's ``arg`` is always the first position attaining the extreme, and the
  gradient goes there (torch_scatter: the same on CPU, any tied position on a GPU).
* **NaN**: max/min propagate NaN, ``arg`` pointing at the first NaN; torch_scatter skips
  NaN (it never compares greater), so a slot of only NaN gives 0 there.
* **Extremes at the dtype's limit**: torch_scatter starts a max from the dtype's lowest
  value and turns a result equal to it into 0 with ``arg = src.size(dim)`` (a max over
  ``-inf`` only gives 0; a min over ``+inf`` or the largest float likewise); here the true
  value and its position.
* **Gradients**: ``mul``'s is exact when ``src`` holds zeros (torch_scatter divides the
  product by ``src`` and zeroes the NaN, which loses ``d(a·0)/d0 = a``); with ``out=``,
  max/min also send gradient to ``out``'s old values where they win (torch_scatter: none).
* **Validation**: every index and ``indptr`` is checked before any kernel runs: a value out
  of range is fastcore's ``IndexError`` naming the value (torch_scatter: a RuntimeError, a
  device-side assert or silent garbage); an unsorted ``segment_coo``/``gather_coo`` index
  or a decreasing ``indptr`` is a ``ValueError`` (torch_scatter: undefined results). The
  check reads the index, one host synchronisation per call on a GPU even when ``dim_size``
  is given (torch_scatter synchronises only for ``dim_size=None``); for sync-free calls use
  ``fastcore.ops`` with ``check=False`` or a :class:`fastcore.Hierarchy`.
* **out=**: must have the result's shape exactly (torch_scatter's ``scatter_sum`` also
  accepts an ``out`` larger outside ``dim``); it may be non-contiguous (torch_scatter's C++
  paths write a contiguous copy, leaving such an ``out`` unchanged). Float sums combine
  once, ``out + Σ src``, not element by element (last-bit differences).
* **gather_csr**: output rows that no segment covers (before ``indptr[..., 0]`` or from
  ``indptr[..., -1]`` on) are 0, or keep ``out``'s values (torch_scatter: uninitialised).
* **Broadcast leading dims**: ``gather_coo``'s index may have size 1 in a leading
  dimension (torch_scatter requires ``src``'s size there).
* **Dtypes**: ``index``/``indptr`` may be int32 or int64 (torch_scatter: int64); ``src``
  any float fastcore supports (float16, bfloat16, float32, float64) or integer dtype; bool
  and complex are a ``TypeError``.
* **Not provided**: ``scatter_std``, ``scatter_logsumexp``, ``scatter_softmax``,
  ``scatter_log_softmax`` (torch_scatter.composite); ``torch.jit.script`` of these
  functions; ``torch.compile`` is untested (the value checks and ``mul`` read data).

Cost beyond fastcore's op: a per-element index sorts ``src.numel()`` keys and copies
``src`` once into a dim-first layout; ``mul`` takes ceil(log2(largest group)) passes, each
with a host synchronisation.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import SupportsIndex

import torch

from fastcore import ops
from fastcore.ops._checks import check_index_range

__all__ = [
    "gather_coo",
    "gather_csr",
    "scatter",
    "scatter_add",
    "scatter_max",
    "scatter_mean",
    "scatter_min",
    "scatter_mul",
    "scatter_sum",
    "segment_add_coo",
    "segment_add_csr",
    "segment_coo",
    "segment_csr",
    "segment_max_coo",
    "segment_max_csr",
    "segment_mean_coo",
    "segment_mean_csr",
    "segment_min_coo",
    "segment_min_csr",
    "segment_sum_coo",
    "segment_sum_csr",
]

DimSize = SupportsIndex | torch.Tensor | None
SCATTER_REDUCES = ("sum", "add", "mean", "mul", "min", "max")
SEGMENT_REDUCES = ("sum", "add", "mean", "min", "max")
_ARG = ("max", "min")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- checks


def _check_src(src: torch.Tensor, op: str) -> None:
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"{op}: src must be a tensor, got {type(src).__name__}")
    if src.dtype == torch.bool or src.is_complex():
        raise TypeError(
            f"{op}: src dtype {src.dtype} is not supported; expected a float or integer dtype"
        )
    if src.is_floating_point() and src.dtype not in _FLOAT:
        raise TypeError(
            f"{op}: src dtype {src.dtype} is not supported; expected float16, bfloat16, float32 or float64"
        )
    if src.dim() == 0:
        raise ValueError(f"{op}: src must have at least one dimension, got a 0-d tensor")


def _check_index(index: torch.Tensor, src: torch.Tensor, op: str, name: str) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {index.dtype}")
    if index.device != src.device:
        raise ValueError(f"{op}: {name} is on {index.device} but src is on {src.device}")
    if index.dim() > src.dim():
        raise ValueError(
            f"{op}: {name} has {index.dim()} dimensions, more than src's {src.dim()} "
            f"(shapes {tuple(index.shape)} and {tuple(src.shape)})"
        )


def _normalize_dim(dim: int, ndim: int, op: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {dim!r} ({type(dim).__name__})")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} is out of range for a tensor of {ndim} dimensions")
    return dim % ndim


def _as_size(dim_size: DimSize, op: str) -> int | None:
    """``dim_size`` as a Python int: an int, a numpy integer or a 0-d integer tensor."""
    if dim_size is None:
        return None
    what = f"{op}: dim_size must be an integer (int, numpy integer or 0-d integer tensor), got {dim_size!r}"
    if isinstance(dim_size, torch.Tensor):
        if dim_size.dim() != 0 or dim_size.is_floating_point() or dim_size.is_complex():
            raise TypeError(what)
        if dim_size.dtype == torch.bool:
            raise TypeError(what)
        value = int(dim_size)
    elif isinstance(dim_size, bool):
        raise TypeError(what)
    else:
        try:
            value = operator.index(dim_size)
        except TypeError:
            raise TypeError(what) from None
    if value < 0:
        raise ValueError(f"{op}: dim_size must be >= 0, got {value}")
    return value


def _check_out(
    out: torch.Tensor | None, src: torch.Tensor, shape: list[int], dim: int, op: str
) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a tensor or None, got {type(out).__name__}")
    if out.dtype != src.dtype:
        raise TypeError(f"{op}: out dtype {out.dtype} must equal src's {src.dtype}")
    if out.device != src.device:
        raise ValueError(f"{op}: out is on {out.device} but src is on {src.device}")
    if list(out.shape) != shape:
        raise ValueError(
            f"{op}: out has shape {tuple(out.shape)}, expected {tuple(shape)} (src's shape "
            f"with dimension {dim} of size {shape[dim]})"
        )


def _check_indptr(indptr: torch.Tensor, bound: int, op: str, dim: int) -> None:
    """IndexError unless every value is in [0, bound]; ValueError unless each row of the
    last dimension is non-decreasing."""
    if indptr.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(indptr))
    if lo < 0:
        raise IndexError(
            f"{op}: indptr contains the negative value {lo}; expected values in [0, {bound}] "
            f"for dimension {dim}"
        )
    if hi > bound:
        raise IndexError(
            f"{op}: indptr value {hi} is out of range [0, {bound}] for dimension {dim} of size {bound}"
        )
    _check_sorted(indptr, op, "indptr", "non-decreasing")


def _check_sorted(index: torch.Tensor, op: str, name: str, what: str = "sorted") -> None:
    """ValueError naming the first place where ``index`` decreases along its last dim."""
    if index.shape[-1] < 2:
        return
    drops = torch.nonzero(index.diff(dim=-1) < 0)
    if drops.numel():
        at = drops[0].tolist()
        nxt = [*at[:-1], at[-1] + 1]
        a, b = int(index[tuple(at)]), int(index[tuple(nxt)])
        raise ValueError(
            f"{op}: {name} must be {what} along its last dimension, got "
            f"{name}{at} = {a} > {name}{nxt} = {b}"
        )


# ----------------------------------------------------------------------------- layouts


def _broadcast(index: torch.Tensor, src: torch.Tensor, dim: int, op: str) -> torch.Tensor:
    """torch_scatter's ``broadcast``: a 1-D index is laid along ``dim``, any other is
    aligned with ``src``'s leading dimensions; missing dimensions get size 1, then the
    index is expanded (a view, no copy) to ``src``'s shape."""
    view = index
    if view.dim() == 1:
        view = view.reshape([1] * dim + [-1])
    view = view[(..., *([None] * (src.dim() - view.dim())))]
    try:
        return view.expand(src.shape)
    except RuntimeError:
        raise ValueError(
            f"{op}: index of shape {tuple(index.shape)} cannot be broadcast to src's shape "
            f"{tuple(src.shape)} along dimension {dim} (a 1-D index lies along dim; any other "
            "is aligned with src's leading dimensions, and each size must match or be 1)"
        ) from None


def _expand_lead(
    index: torch.Tensor, src: torch.Tensor, lead: int, op: str, name: str
) -> torch.Tensor:
    """``index`` with its first ``lead`` dimensions expanded to ``src``'s (size 1 broadcasts)."""
    shape = [*src.shape[:lead], *index.shape[lead:]]
    try:
        return index.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"{op}: {name} of shape {tuple(index.shape)} does not match src's leading "
            f"dimensions {tuple(src.shape[:lead])} (each size must match or be 1)"
        ) from None


def _line(idx: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The 1-D index along ``dim`` when ``idx`` holds the same one at every position of
    the other dimensions (a broadcast view), else None."""
    if all(idx.stride(d) == 0 or idx.size(d) == 1 for d in range(idx.dim()) if d != dim):
        return idx[tuple(slice(None) if d == dim else 0 for d in range(idx.dim()))]
    return None


def _lead_line(index: torch.Tensor) -> torch.Tensor | None:
    """The last-dim row of an index/indptr whose leading dimensions are all broadcast."""
    return _line(index, index.dim() - 1)


def _element_rows(
    src: torch.Tensor, idx: torch.Tensor, dim: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, int, Callable[[torch.Tensor], torch.Tensor]]:
    """A per-element index as rows of width 1: ``values [M*C, 1]``, ``key [M*C]`` with
    ``key = index * C + column`` (``C`` = the product of the other dims, ``dim`` moved
    first), ``C``, and the map from ``[size*C, 1]`` back to ``src``'s layout."""
    moved = src.movedim(dim, 0)
    rest = moved.shape[1:]
    rows, width = moved.shape[0], math.prod(rest)
    values = moved.reshape(rows * width, 1)
    column = torch.arange(width, device=src.device)
    key = (idx.movedim(dim, 0).reshape(rows, width).long() * width + column).reshape(-1)

    def restore(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(size, *rest).movedim(0, dim).contiguous()

    return values, key, width, restore


def _line_rows(
    src: torch.Tensor, dim: int, size: int
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``src`` as rows ``[M, C]`` (``dim`` first) and the map from ``[size, C]`` back."""
    moved = src.movedim(dim, 0)
    rest = moved.shape[1:]

    def restore(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(size, *rest).movedim(0, dim).contiguous()

    return moved.reshape(moved.shape[0], -1), restore


def _along(t: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A 1-D tensor viewed along ``dim`` of an ``ndim``-D tensor."""
    return t.reshape([1] * dim + [-1] + [1] * (ndim - dim - 1))


def _nothing(src: torch.Tensor, dim: int, shape: list[int]) -> torch.Tensor:
    """Zeros of ``shape`` for an empty ``src``, still connected to ``src``'s graph."""
    return src.sum(dim, keepdim=True, dtype=src.dtype).expand(shape).contiguous()


# ----------------------------------------------------------------------------- reductions


def _segment_prod(values: torch.Tensor, key: torch.Tensor, slots: int) -> torch.Tensor:
    """``out[s] = Π values[k] over key[k] == s`` (``values [n, W]``, 1 for an empty slot):
    a stable sort by key, then a pairwise tree within each group, in position order.
    Deterministic, differentiable (exact with zeros), ceil(log2(largest group)) passes."""
    perm, _ = ops.index_csr(key, slots)
    key = key.index_select(0, perm)
    values = values.index_select(0, perm)
    while key.numel() > 1:
        n = key.numel()
        position = torch.arange(n, device=key.device)
        even = (position - torch.searchsorted(key, key)) % 2 == 0
        same_next = torch.cat([key[1:] == key[:-1], key.new_zeros(1, dtype=torch.bool)])
        paired = even & same_next
        if not bool(paired.any()):
            break
        keep = torch.nonzero(even).squeeze(1)
        partner = values.index_select(0, (keep + 1).clamp(max=n - 1))
        partner = torch.where(paired.index_select(0, keep).unsqueeze(1), partner, 1)
        values = values.index_select(0, keep) * partner
        key = key.index_select(0, keep)
    return values.new_ones(slots, values.shape[1]).index_copy(0, key, values)


def _scatter_mul(
    src: torch.Tensor, idx: torch.Tensor, line: torch.Tensor | None, dim: int, size: int
) -> torch.Tensor:
    if line is not None:
        values, restore = _line_rows(src, dim, size)
        key, slots = line.long(), size
    else:
        values, key, width, restore = _element_rows(src, idx, dim, size)
        slots = size * width
    compute = torch.float32 if src.dtype in (torch.float16, torch.bfloat16) else src.dtype
    return restore(_segment_prod(values.to(compute), key, slots).to(src.dtype))


def _reduce(
    src: torch.Tensor, idx: torch.Tensor, dim: int, size: int, reduce: str, rounding: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reduce a non-empty ``src`` by a validated ``idx`` (``src``'s shape, values in
    ``[0, size)``) into fresh ``[..., size, ...]``: ``(out, arg)``, arg for max/min only.
    An empty slot is 0 (``mul``: 1) with ``arg = src.size(dim)``."""
    line = _line(idx, dim)
    if reduce == "mul":
        return _scatter_mul(src, idx, line, dim, size), None
    if src.is_floating_point():
        if line is not None:
            if reduce in _ARG:
                out, arg = ops.scatter_arg(src, line, dim, size, reduce, check=False)
                return out.contiguous(), arg.contiguous()
            return ops.scatter(src, line, dim, size, reduce, check=False).contiguous(), None
        values, key, width, restore = _element_rows(src, idx, dim, size)
        if reduce in _ARG:
            out, arg = ops.scatter_arg(values, key, 0, size * width, reduce, check=False)
            return restore(out), restore(arg) // width  # row m*C + c -> position m
        return restore(ops.scatter(values, key, 0, size * width, reduce, check=False)), None
    # Integers: torch's scatter ops are exact, hence deterministic, in any order.
    shape = list(src.shape)
    shape[dim] = size
    index = idx.long()
    if reduce in ("sum", "mean"):
        out = src.new_zeros(shape).scatter_add_(dim, index, src)
        if reduce == "mean":
            count = _counts(idx, line, dim, size, shape).clamp(min=1)
            out = torch.div(out, count, rounding_mode=rounding).to(src.dtype)
        return out, None
    out = src.new_zeros(shape).scatter_reduce_(dim, index, src, "a" + reduce, include_self=False)
    rows = src.shape[dim]
    position = _along(torch.arange(rows, device=src.device), dim, src.dim()).expand(src.shape)
    candidate = torch.where(src == out.gather(dim, index), position, rows)
    arg = torch.full(shape, rows, dtype=torch.int64, device=src.device)
    return out, arg.scatter_reduce_(dim, index, candidate, "amin")


def _counts(
    idx: torch.Tensor, line: torch.Tensor | None, dim: int, size: int, shape: list[int]
) -> torch.Tensor:
    """Members per output slot (int64, broadcastable to ``shape``)."""
    if line is not None:
        _, ptr = ops.index_csr(line, size)
        return _along(ptr.diff(), dim, len(shape))
    ones = torch.ones((), dtype=torch.int64, device=idx.device).expand(idx.shape)
    return torch.zeros(shape, dtype=torch.int64, device=idx.device).scatter_add_(
        dim, idx.long(), ones
    )


def _apply(
    src: torch.Tensor,
    idx: torch.Tensor,
    dim: int,
    size: int,
    reduce: str,
    out: torch.Tensor | None,
    rounding: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_reduce`, combined into ``out`` (in place) as torch_scatter combines."""
    if out is None:
        return _reduce(src, idx, dim, size, reduce, rounding)
    if reduce == "mean":
        total, _ = _reduce(src, idx, dim, size, "sum", rounding)
        count = _counts(idx, _line(idx, dim), dim, size, list(out.shape)).clamp(min=1)
        out.add_(total)
        if out.is_floating_point():
            return out.div_(count), None
        return out.copy_(torch.div(out, count, rounding_mode=rounding)), None
    result, arg = _reduce(src, idx, dim, size, reduce, rounding)
    if reduce == "sum":
        return out.add_(result), None
    if reduce == "mul":
        return out.mul_(result), None
    wins = result > out if reduce == "max" else result < out
    if result.is_floating_point():
        wins = wins | result.isnan()
    rows = src.shape[dim]
    wins = wins & (arg != rows)
    out.copy_(torch.where(wins, result, out))
    return out, arg.masked_fill(~wins, rows)  # not in place: autograd saved arg


def _reduce_name(reduce: str, allowed: tuple[str, ...], op: str) -> str:
    if reduce not in allowed:
        raise ValueError(f"{op}: reduce must be one of {', '.join(allowed)}; got {reduce!r}")
    return "sum" if reduce == "add" else reduce


# ----------------------------------------------------------------------------- scatter


def _scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int,
    out: torch.Tensor | None,
    dim_size: DimSize,
    reduce: str,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_src(src, op)
    _check_index(index, src, op, "index")
    dim = _normalize_dim(dim, src.dim(), op)
    size = _as_size(dim_size, op)
    idx = _broadcast(index, src, dim, op)
    if out is not None:
        size = out.shape[dim] if isinstance(out, torch.Tensor) and out.dim() == src.dim() else 0
    elif size is None:
        size = max(int(index.max()) + 1, 0) if idx.numel() else 0
    shape = list(src.shape)
    shape[dim] = size
    _check_out(out, src, shape, dim, op)
    rows = src.shape[dim]
    if src.numel() == 0:
        arg = torch.full(shape, rows, dtype=torch.int64, device=src.device)
        return (out if out is not None else _nothing(src, dim, shape)), arg
    check_index_range(index, size, op, "index", dim)
    return _apply(src, idx, dim, size, reduce, out, "floor")


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Reduce the values of ``src`` that share an ``index`` value along ``dim``.

    ``out[..., i, ...] = reduce(src[..., j, ...] for every j with index[..., j, ...] == i)``;
    for each value, the position outside ``dim`` is its own.

    Args:
        src: ``[*lead, M, *trail]`` with M at ``dim``; float16/bfloat16/float32/float64
            (fastcore's kernels: differentiable, deterministic) or any integer dtype.
        index: int32/int64, broadcast to ``src``'s shape by torch_scatter's rule: ``[M]``
            (the same targets for every row: fastcore's fast row path), or ``[*lead, M]``,
            ``[*lead, M, *trail]`` with sizes matching or 1 (a target per element). Values
            in ``[0, dim_size)``.
        dim: the scattered dimension (negative counts from the end).
        out: ``[*lead, dim_size, *trail]``, ``src``'s dtype: the result is combined into
            it in place (``sum``: added, ``mul``: multiplied, ``mean``: ``(out + Σ) /
            count``, ``max``/``min``: kept where it wins) and it is returned.
        dim_size: the output's size along ``dim`` (int, numpy integer or 0-d tensor);
            None takes ``index.max() + 1``; ignored when ``out`` is given.
        reduce: ``"sum"`` (alias ``"add"``), ``"mean"``, ``"mul"``, ``"min"`` or ``"max"``.

    Returns:
        ``[*lead, dim_size, *trail]``: an empty slot is 0 (``mul``: 1); max/min return the
        values only (see :func:`scatter_max` for the positions).

    Raises:
        IndexError: an index value is negative or ``>= dim_size`` (the value is named);
        ValueError: a bad ``reduce``, ``dim_size``, ``out`` shape or index shape;
        TypeError: a wrong dtype.

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter
        >>> src = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> scatter(src, torch.tensor([0, 1, 0]), dim=0).tolist()  # rows 0 and 2 meet
        [[6.0, 8.0], [3.0, 4.0]]
        >>> scatter(src, torch.tensor([1, 1]), reduce="max", dim_size=3).tolist()  # dim=-1
        [[0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [0.0, 6.0, 0.0]]
        >>> scatter(src, torch.tensor([0, 2, 0]), dim=0, dim_size=2)
        Traceback (most recent call last):
            ...
        IndexError: scatter: index value 2 is out of range for dimension 0 of size 2
    """
    name = _reduce_name(reduce, SCATTER_REDUCES, "scatter")
    return _scatter(src, index, dim, out, dim_size, name, "scatter")[0]


def scatter_sum(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`scatter` with ``reduce="sum"``: ``src [*lead, M, *trail]``, ``index``
    broadcast to it, ``out`` (added to) and the result ``[*lead, dim_size, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter_sum
        >>> scatter_sum(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1])).tolist()
        [2.0, 5.0]
        >>> out = torch.tensor([10, 20])  # integers run torch's own (exact) scatter
        >>> scatter_sum(torch.tensor([1, 2, 4]), torch.tensor([1, 0, 1]), out=out) is out
        True
        >>> out.tolist()
        [12, 25]
    """
    return _scatter(src, index, dim, out, dim_size, "sum", "scatter_sum")[0]


def scatter_add(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`scatter_sum` under torch_scatter's other name (same shapes).

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter_add
        >>> scatter_add(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1]), dim_size=3).tolist()
        [2.0, 5.0, 0.0]
    """
    return _scatter(src, index, dim, out, dim_size, "sum", "scatter_add")[0]


def scatter_mean(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`scatter` with ``reduce="mean"``: ``src [*lead, M, *trail]``, the result
    ``[*lead, dim_size, *trail]``. With ``out``, ``(out + Σ src) / count`` (count: the
    members, at least 1). Integer ``src`` rounds down (floor), as torch_scatter does.

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter_mean
        >>> scatter_mean(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1]), dim_size=3).tolist()
        [2.0, 2.5, 0.0]
        >>> scatter_mean(torch.tensor([-1, 2, 4]), torch.tensor([0, 0, 1])).tolist()  # floor(1/2)
        [0, 4]
    """
    return _scatter(src, index, dim, out, dim_size, "mean", "scatter_mean")[0]


def scatter_mul(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`scatter` with ``reduce="mul"``: ``src [*lead, M, *trail]``, the result
    ``[*lead, dim_size, *trail]``, an empty slot 1 (``out`` is multiplied). Deterministic:
    a stable sort by target, then a pairwise product in position order; the gradient is
    exact where ``src`` holds zeros.

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter_mul
        >>> src = torch.tensor([2.0, 0.0, 3.0], requires_grad=True)
        >>> out = scatter_mul(src, torch.tensor([0, 1, 0]), dim_size=3)
        >>> out.tolist()
        [6.0, 0.0, 1.0]
        >>> out.sum().backward()
        >>> src.grad.tolist()
        [3.0, 1.0, 2.0]
    """
    return _scatter(src, index, dim, out, dim_size, "mul", "scatter_mul")[0]


def scatter_max(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scatter` with ``reduce="max"`` and the position of each maximum.

    Returns:
        ``(out, arg)``, both ``[*lead, dim_size, *trail]``: ``arg`` (int64) is the position
        along ``dim`` in ``src`` of the first element attaining the maximum, and
        ``src.size(dim)`` for an empty slot (value 0) or, with ``out`` given, where
        ``out``'s own value is not beaten (it stays). NaN counts as the maximum.

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter_max
        >>> src = torch.tensor([1.0, 5.0, 3.0, 5.0])
        >>> out, arg = scatter_max(src, torch.tensor([0, 1, 0, 1]), dim_size=3)
        >>> out.tolist(), arg.tolist()  # the tie goes to position 1; slot 2 is empty
        ([3.0, 5.0, 0.0], [2, 1, 4])
        >>> out = torch.tensor([4.0, 4.0, 4.0])
        >>> scatter_max(src, torch.tensor([0, 1, 0, 1]), out=out)[1].tolist()  # 3 < 4 stays
        [4, 1, 4]
    """
    out, arg = _scatter(src, index, dim, out, dim_size, "max", "scatter_max")
    return out, arg


def scatter_min(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scatter_max` for the minimum: ``(out, arg)``, both ``[*lead, dim_size,
    *trail]``, ``arg = src.size(dim)`` where no element of ``src`` sets the value.

    Examples:
        >>> import torch
        >>> from fastcore.compat import scatter_min
        >>> src = torch.tensor([[2, 7, 1], [4, 3, 3]])  # integers: torch's exact scatter
        >>> out, arg = scatter_min(src, torch.tensor([[0, 0, 1], [1, 0, 0]]))  # per element
        >>> out.tolist(), arg.tolist()
        ([[2, 1], [3, 4]], [[0, 2], [1, 0]])
    """
    out, arg = _scatter(src, index, dim, out, dim_size, "min", "scatter_min")
    return out, arg


# ----------------------------------------------------------------------------- segment_csr


def _segment_of_rows(ptr: torch.Tensor, rows: int, segments: int) -> torch.Tensor:
    """The segment of each of ``rows`` rows under ``ptr [*lead, S+1]``, ``segments`` for a
    row no segment holds: ``[rows]`` when ``ptr``'s leading dimensions are broadcast (one
    pointer for every batch), else ``[*lead, rows]``."""
    line = _lead_line(ptr)
    if line is not None:
        ptr = line
    position = torch.arange(rows, device=ptr.device).expand(*ptr.shape[:-1], rows)
    seg = torch.searchsorted(ptr.long().contiguous(), position.contiguous(), right=True) - 1
    return torch.where((seg < 0) | (seg >= segments), segments, seg)


def _segment_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None, reduce: str, op: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_src(src, op)
    _check_index(indptr, src, op, "indptr")
    if indptr.dim() == 0:
        raise ValueError(f"{op}: indptr must have at least one dimension, got a 0-d tensor")
    dim = indptr.dim() - 1
    ptr = _expand_lead(indptr, src, dim, op, "indptr")
    segments = max(ptr.shape[-1] - 1, 0)
    rows = src.shape[dim]
    shape = list(src.shape)
    shape[dim] = segments
    _check_out(out, src, shape, dim, op)
    arg = torch.full(shape, rows, dtype=torch.int64, device=src.device) if reduce in _ARG else None
    if src.numel() == 0:
        return (out if out is not None else _nothing(src, dim, shape)), arg
    _check_indptr(indptr, rows, op, dim)
    if segments == 0:
        result = _nothing(src, dim, shape)
    elif src.is_floating_point() and reduce in ("sum", "mean"):
        result = _segment_rows(src, ptr, dim, segments, reduce)
    else:
        seg = _segment_of_rows(ptr, rows, segments)
        idx = _broadcast(seg, src, dim, op)
        result, arg = _reduce(src, idx, dim, segments + 1, reduce, "trunc")
        result = result.narrow(dim, 0, segments).contiguous()
        arg = arg.narrow(dim, 0, segments).contiguous() if arg is not None else None
    if out is not None:
        result = out.copy_(result)
    return result, arg


def _segment_rows(
    src: torch.Tensor, ptr: torch.Tensor, dim: int, segments: int, reduce: str
) -> torch.Tensor:
    """Float sum/mean of valid CSR segments with ``fastcore.ops.segment`` (no sort). Rows
    outside ``[ptr[0], ptr[-1])`` (and between batches) become extra segments, dropped."""
    rows = src.shape[dim]
    line = _lead_line(ptr)
    if line is not None:
        first, last = line[[0, -1]].tolist()
        if first == 0 and last == rows:
            return ops.segment(src, line, dim, reduce, check=False).contiguous()
        bounds = line.new_tensor([0, rows], dtype=torch.int64)
        full = torch.cat([bounds[:1], line.long(), bounds[1:]])
        return (
            ops.segment(src, full, dim, reduce, check=False).narrow(dim, 1, segments).contiguous()
        )
    lead, trail = src.shape[:dim], src.shape[dim + 1 :]
    batches = math.prod(lead)
    flat_rows = src.reshape(batches * rows, -1)
    offset = torch.arange(batches, device=src.device).unsqueeze(1) * rows
    starts = (ptr.reshape(batches, segments + 1).long() + offset).reshape(-1)
    bounds = starts.new_tensor([0, batches * rows])
    full = torch.cat([bounds[:1], starts, bounds[1:]])
    reduced = ops.segment(flat_rows, full, 0, reduce, check=False)[1:]
    reduced = reduced.reshape(batches, segments + 1, -1)[:, :segments]
    return reduced.reshape(*lead, segments, *trail).contiguous()


def segment_csr(
    src: torch.Tensor,
    indptr: torch.Tensor,
    out: torch.Tensor | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Reduce the runs of ``src`` that ``indptr`` delimits, along ``dim = indptr.dim() - 1``:
    ``out[..., s, ...] = reduce(src[..., indptr[..., s]:indptr[..., s+1], ...])``.

    Args:
        src: ``[*lead, M, *trail]`` with ``len(lead) = indptr.dim() - 1``; a float dtype
            (fastcore's kernels) or an integer dtype.
        indptr: int32/int64 ``[*lead, S+1]`` (each leading size matching ``src``'s or 1),
            non-decreasing along its last dimension, values in ``[0, M]``; rows before
            ``indptr[..., 0]`` or from ``indptr[..., -1]`` on join no segment.
        out: ``[*lead, S, *trail]``: overwritten with the result and returned.
        reduce: ``"sum"`` (alias ``"add"``), ``"mean"``, ``"min"`` or ``"max"``.

    Returns:
        ``[*lead, S, *trail]``; an empty segment gives 0. Integer means round toward zero.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_csr
        >>> src = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
        >>> segment_csr(src, torch.tensor([0, 2, 2, 5])).tolist()  # rows 0-1, none, 2-4
        [[3.0], [0.0], [12.0]]
        >>> batched = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> segment_csr(batched, torch.tensor([[0, 1, 3], [0, 2, 3]]), reduce="max").tolist()
        [[1.0, 3.0], [5.0, 6.0]]
    """
    name = _reduce_name(reduce, SEGMENT_REDUCES, "segment_csr")
    return _segment_csr(src, indptr, out, name, "segment_csr")[0]


def segment_sum_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`segment_csr` with ``reduce="sum"``: ``src [*lead, M, *trail]``, ``indptr
    [*lead, S+1]``, result ``[*lead, S, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_sum_csr
        >>> segment_sum_csr(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 3])).tolist()
        [1.0, 5.0]
    """
    return _segment_csr(src, indptr, out, "sum", "segment_sum_csr")[0]


def segment_add_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`segment_sum_csr` under torch_scatter's other name (same shapes).

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_add_csr
        >>> segment_add_csr(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])).tolist()
        [1, 5]
    """
    return _segment_csr(src, indptr, out, "sum", "segment_add_csr")[0]


def segment_mean_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`segment_csr` with ``reduce="mean"`` (integers round toward zero):
    ``src [*lead, M, *trail]``, ``indptr [*lead, S+1]``, result ``[*lead, S, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_mean_csr
        >>> segment_mean_csr(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 3])).tolist()
        [1.0, 2.5]
        >>> segment_mean_csr(torch.tensor([-1, 2, 3]), torch.tensor([0, 2, 3])).tolist()
        [0, 3]
    """
    return _segment_csr(src, indptr, out, "mean", "segment_mean_csr")[0]


def segment_min_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_csr` with ``reduce="min"`` and positions: ``(out, arg)``, both
    ``[*lead, S, *trail]``; ``arg`` the position along ``dim`` of the first minimum,
    ``M = src.size(dim)`` for an empty segment.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_min_csr
        >>> out, arg = segment_min_csr(torch.tensor([4.0, 2.0, 2.0]), torch.tensor([0, 3, 3]))
        >>> out.tolist(), arg.tolist()
        ([2.0, 0.0], [1, 3])
    """
    out, arg = _segment_csr(src, indptr, out, "min", "segment_min_csr")
    return out, arg


def segment_max_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_min_csr` for the maximum: ``(out, arg)``, both ``[*lead, S, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_max_csr
        >>> out, arg = segment_max_csr(torch.tensor([4.0, 2.0, 5.0]), torch.tensor([0, 2, 3]))
        >>> out.tolist(), arg.tolist()
        ([4.0, 5.0], [0, 2])
    """
    out, arg = _segment_csr(src, indptr, out, "max", "segment_max_csr")
    return out, arg


def gather_csr(
    src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Spread each segment's row back over its run: the transpose of :func:`segment_csr`,
    ``out[..., e, ...] = src[..., s, ...]`` for ``indptr[..., s] <= e < indptr[..., s+1]``.

    Args:
        src: ``[*lead, S, *trail]`` with ``len(lead) = indptr.dim() - 1``; any float or
            integer dtype (floats: ``fastcore.ops.gather``, deterministic backward).
        indptr: int32/int64 ``[*lead, S+1]`` (leading sizes matching ``src``'s or 1),
            non-decreasing, values in ``[0, E]``.
        out: ``[*lead, E, *trail]``: written where a segment covers it and returned.

    Returns:
        ``[*lead, E, *trail]`` with ``E = out.size(dim)`` or, without ``out``, the last
        value of ``indptr``; rows no segment covers are 0.

    Examples:
        >>> import torch
        >>> from fastcore.compat import gather_csr
        >>> gather_csr(torch.tensor([10.0, 20.0, 30.0]), torch.tensor([0, 2, 2, 3])).tolist()
        [10.0, 10.0, 30.0]
    """
    op = "gather_csr"
    _check_src(src, op)
    _check_index(indptr, src, op, "indptr")
    if indptr.dim() == 0:
        raise ValueError(f"{op}: indptr must have at least one dimension, got a 0-d tensor")
    dim = indptr.dim() - 1
    ptr = _expand_lead(indptr, src, dim, op, "indptr")
    segments = ptr.shape[-1] - 1
    if src.shape[dim] not in (0, segments):
        raise ValueError(
            f"{op}: src has {src.shape[dim]} rows along dimension {dim} but indptr holds "
            f"{max(segments, 0)} segments (size {ptr.shape[-1]} along its last dimension)"
        )
    if out is not None and isinstance(out, torch.Tensor) and out.dim() == src.dim():
        rows = out.shape[dim]
    else:
        rows = int(ptr.reshape(-1)[-1]) if src.numel() and ptr.numel() else 0
    shape = list(src.shape)
    shape[dim] = rows
    _check_out(out, src, shape, dim, op)
    if src.numel() == 0:
        return out if out is not None else _nothing(src, dim, shape)
    _check_indptr(indptr, rows, op, dim)
    seg = _segment_of_rows(ptr, rows, segments)  # S where no segment covers a row
    if seg.dim() == 1:
        result = _take(src, seg, dim)
        covered = _along(seg < segments, dim, src.dim())
    else:
        lead, trail = src.shape[:dim], src.shape[dim + 1 :]
        batches = math.prod(lead)
        flat = seg.reshape(batches, rows)
        gap = flat == segments
        offset = torch.arange(batches, device=src.device).unsqueeze(1) * segments
        flat = torch.where(gap, batches * segments, flat + offset).reshape(-1)
        result = _take(src.reshape(batches * segments, -1), flat, 0).reshape(*lead, rows, *trail)
        covered = (~gap).reshape(*lead, rows, *([1] * len(trail)))
    if out is None:
        return result
    return out.copy_(torch.where(covered, result, out))


def _take(src: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``src.index_select(dim, index)`` where ``index == src.size(dim)`` reads a zero row."""
    if src.is_floating_point():
        return ops.gather(src, index, dim, check=False).contiguous()  # out of range: zeros
    zero = list(src.shape)
    zero[dim] = 1
    return torch.cat([src, src.new_zeros(zero)], dim).index_select(dim, index)


# ----------------------------------------------------------------------------- segment_coo


def _segment_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None,
    dim_size: DimSize,
    reduce: str,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_src(src, op)
    _check_index(index, src, op, "index")
    if index.dim() == 0:
        raise ValueError(f"{op}: index must have at least one dimension, got a 0-d tensor")
    dim = index.dim() - 1
    size = _as_size(dim_size, op)
    lead_index = _expand_lead(index, src, index.dim(), op, "index")
    if out is not None:
        size = out.shape[dim] if isinstance(out, torch.Tensor) and out.dim() == src.dim() else 0
    elif size is None:
        size = max(int(index.max()) + 1, 0) if lead_index.numel() else 0
    shape = list(src.shape)
    shape[dim] = size
    _check_out(out, src, shape, dim, op)
    rows = src.shape[dim]
    if src.numel() == 0:
        arg = torch.full(shape, rows, dtype=torch.int64, device=src.device)
        return (out if out is not None else _nothing(src, dim, shape)), arg
    check_index_range(index, size, op, "index", dim)
    _check_sorted(index, op, "index")
    if out is None and src.is_floating_point() and reduce in ("sum", "mean"):
        return _segment_sorted(src, lead_index, dim, size, reduce), None
    return _apply(src, _broadcast(lead_index, src, dim, op), dim, size, reduce, out, "trunc")


def _segment_sorted(
    src: torch.Tensor, index: torch.Tensor, dim: int, size: int, reduce: str
) -> torch.Tensor:
    """Float sum/mean by a sorted, validated ``index [*lead, M]``: its CSR pointer is a
    ``searchsorted`` (no sort), then ``fastcore.ops.segment``."""
    line = _lead_line(index)
    if line is not None:
        ptr = torch.searchsorted(
            line.long().contiguous(), torch.arange(size + 1, device=src.device)
        )
        return ops.segment(src, ptr, dim, reduce, check=False).contiguous()
    lead, trail = src.shape[:dim], src.shape[dim + 1 :]
    batches, rows = math.prod(lead), src.shape[dim]
    offset = torch.arange(batches, device=src.device).unsqueeze(1) * size
    keys = (index.reshape(batches, rows).long() + offset).reshape(-1)
    ptr = torch.searchsorted(keys, torch.arange(batches * size + 1, device=src.device))
    reduced = ops.segment(src.reshape(batches * rows, -1), ptr, 0, reduce, check=False)
    return reduced.reshape(*lead, size, *trail).contiguous()


def segment_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Reduce the values of ``src`` sharing a value of a **sorted** ``index``, along
    ``dim = index.dim() - 1``: :func:`scatter` for an index sorted along its last dimension.

    Args:
        src: ``[*lead, M, *trail]`` with ``len(lead) = index.dim() - 1``; a float dtype
            (fastcore's kernels) or an integer dtype.
        index: int32/int64 ``[*lead, M]`` (each size matching ``src``'s or 1), sorted along
            its last dimension, values in ``[0, dim_size)``.
        out: ``[*lead, dim_size, *trail]``: combined with the result as in :func:`scatter`
            and returned.
        dim_size: the output's size along ``dim`` (int, numpy integer or 0-d tensor);
            None takes ``index.max() + 1``; ignored when ``out`` is given.
        reduce: ``"sum"`` (alias ``"add"``), ``"mean"``, ``"min"`` or ``"max"``.

    Returns:
        ``[*lead, dim_size, *trail]``; an empty slot is 0. Integer means round toward zero.

    Raises:
        ValueError: the index decreases somewhere (the place is named); IndexError: a value
            out of range.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_coo
        >>> src = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
        >>> segment_coo(src, torch.tensor([0, 0, 2, 2]), reduce="mean").tolist()  # dim 0
        [[2.0, 3.0], [0.0, 0.0], [6.0, 7.0]]
        >>> batched = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # index [2, 3]: dim 1
        >>> segment_coo(batched, torch.tensor([[0, 0, 1], [0, 1, 1]])).tolist()
        [[3.0, 3.0], [4.0, 11.0]]
        >>> segment_coo(src, torch.tensor([0, 2, 1, 2]))
        Traceback (most recent call last):
            ...
        ValueError: segment_coo: index must be sorted along its last dimension, got index[1] = 2 > index[2] = 1
    """
    name = _reduce_name(reduce, SEGMENT_REDUCES, "segment_coo")
    return _segment_coo(src, index, out, dim_size, name, "segment_coo")[0]


def segment_sum_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`segment_coo` with ``reduce="sum"``: ``src [*lead, M, *trail]``, ``index
    [*lead, M]`` sorted, result ``[*lead, dim_size, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_sum_coo
        >>> segment_sum_coo(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])).tolist()
        [1.0, 5.0]
    """
    return _segment_coo(src, index, out, dim_size, "sum", "segment_sum_coo")[0]


def segment_add_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`segment_sum_coo` under torch_scatter's other name (same shapes).

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_add_coo
        >>> segment_add_coo(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]), dim_size=3).tolist()
        [1, 5, 0]
    """
    return _segment_coo(src, index, out, dim_size, "sum", "segment_add_coo")[0]


def segment_mean_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> torch.Tensor:
    """:func:`segment_coo` with ``reduce="mean"`` (integers round toward zero): ``src
    [*lead, M, *trail]``, ``index [*lead, M]`` sorted, result ``[*lead, dim_size, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_mean_coo
        >>> segment_mean_coo(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])).tolist()
        [1.0, 2.5]
    """
    return _segment_coo(src, index, out, dim_size, "mean", "segment_mean_coo")[0]


def segment_min_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_coo` with ``reduce="min"`` and positions: ``(out, arg)``, both
    ``[*lead, dim_size, *trail]``, ``arg = src.size(dim)`` where no element sets the value.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_min_coo
        >>> out, arg = segment_min_coo(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 0, 2]))
        >>> out.tolist(), arg.tolist()
        ([1.0, 0.0, 2.0], [1, 3, 2])
    """
    out, arg = _segment_coo(src, index, out, dim_size, "min", "segment_min_coo")
    return out, arg


def segment_max_coo(
    src: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    dim_size: DimSize = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_min_coo` for the maximum: ``(out, arg)``, both ``[*lead, dim_size,
    *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import segment_max_coo
        >>> out, arg = segment_max_coo(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 0, 2]))
        >>> out.tolist(), arg.tolist()
        ([3.0, 0.0, 2.0], [0, 3, 2])
    """
    out, arg = _segment_coo(src, index, out, dim_size, "max", "segment_max_coo")
    return out, arg


def gather_coo(
    src: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Read the rows of ``src`` a **sorted** ``index`` names, along ``dim = index.dim() - 1``:
    the transpose of :func:`segment_coo`, ``out[..., e, ...] = src[..., index[..., e], ...]``.

    Args:
        src: ``[*lead, N, *trail]`` with ``len(lead) = index.dim() - 1``; any float or
            integer dtype (floats: ``fastcore.ops.gather``, deterministic backward).
        index: int32/int64 ``[*lead, E]`` (leading sizes matching ``src``'s or 1), sorted
            along its last dimension, values in ``[0, N)``.
        out: ``[*lead, E, *trail]``: overwritten with the result and returned.

    Returns:
        ``[*lead, E, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore.compat import gather_coo
        >>> gather_coo(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0, 0, 1], [1, 1, 1]])).tolist()
        [[1.0, 1.0, 2.0], [4.0, 4.0, 4.0]]
    """
    op = "gather_coo"
    _check_src(src, op)
    _check_index(index, src, op, "index")
    if index.dim() == 0:
        raise ValueError(f"{op}: index must have at least one dimension, got a 0-d tensor")
    dim = index.dim() - 1
    lead_index = _expand_lead(index, src, dim, op, "index")
    rows = index.shape[-1]
    shape = list(src.shape)
    shape[dim] = rows
    _check_out(out, src, shape, dim, op)
    if src.numel() == 0:
        return out if out is not None else _nothing(src, dim, shape)
    size = src.shape[dim]
    check_index_range(index, size, op, "index", dim)
    _check_sorted(index, op, "index")
    line = _lead_line(lead_index)
    if line is not None:
        result = _take(src, line, dim)
    else:
        lead, trail = src.shape[:dim], src.shape[dim + 1 :]
        batches = math.prod(lead)
        offset = torch.arange(batches, device=src.device).unsqueeze(1) * size
        flat = (lead_index.reshape(batches, rows).long() + offset).reshape(-1)
        result = _take(src.reshape(batches * size, -1), flat, 0).reshape(*lead, rows, *trail)
    if out is None:
        return result
    return out.copy_(result)
