"""Reference scatter / segment reductions (sum, mean, max, min): the oracle.

torch_scatter semantics: ``out[..., i, ...]`` reduces every ``src[..., m, ...]`` with
``index[m] == i``; an output slot that receives nothing is 0. Max/min send their gradient
to the first (lowest position) element that attains the extreme; NaN propagates.
"""

from __future__ import annotations

import torch

REDUCES = ("sum", "mean", "max", "min")


def _along(t: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A 1-D ``t`` viewed to broadcast along ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = t.numel()
    return t.view(shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scatter_arg(
    src: torch.Tensor, index: torch.Tensor, dim: int, dim_size: int, reduce: str
) -> torch.Tensor:
    """For max/min: the position along ``dim`` of the element each output takes, or
    ``src.size(dim)`` for an empty slot. int64, the output's shape; no gradient."""
    dim = dim % src.dim()
    size = src.size(dim)
    index = _along(index.long(), dim, src.dim()).expand_as(src)
    shape = list(src.shape)
    shape[dim] = dim_size
    with torch.no_grad():
        extreme = torch.zeros(shape, dtype=src.dtype, device=src.device).scatter_reduce(
            dim, index, src, "amax" if reduce == "max" else "amin", include_self=False
        )
        chosen = extreme.gather(dim, index)
        hit = (src == chosen) | (src.isnan() & chosen.isnan())
        position = _along(torch.arange(size, device=src.device), dim, src.dim()).expand_as(src)
        candidate = torch.where(hit, position, size)
        arg = torch.full(shape, size, dtype=torch.int64, device=src.device)
        return arg.scatter_reduce(dim, index, candidate, "amin", include_self=True)


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -2,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Reduce the rows of ``src`` that share an ``index`` value.

    ``src [*lead, M, *trail]`` with M at ``dim``, ``index [M]`` with values in
    ``[0, dim_size)`` -> ``[*lead, dim_size, *trail]``. Half types accumulate in float32.
    """
    if reduce not in REDUCES:
        raise ValueError(f"scatter: reduce must be one of {REDUCES}, got {reduce!r}")
    dim = dim % src.dim()
    index = index.long()
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() else 0
    shape = list(src.shape)
    shape[dim] = dim_size
    if reduce in ("max", "min"):
        arg = scatter_arg(src, index, dim, dim_size, reduce)
        zero_row = list(src.shape)
        zero_row[dim] = 1
        padded = torch.cat([src, src.new_zeros(zero_row)], dim)  # arg == size reads the zeros
        return padded.gather(dim, arg)
    acc = _acc_dtype(src.dtype)
    out = torch.zeros(shape, dtype=acc, device=src.device).index_add(dim, index, src.to(acc))
    if reduce == "mean":
        count = torch.zeros(dim_size, dtype=acc, device=src.device)
        count = count.index_add(0, index, torch.ones_like(index, dtype=acc))
        out = out / _along(count.clamp(min=1), dim, src.dim())
    return out.to(src.dtype)


def segment_index(ptr: torch.Tensor, size: int) -> torch.Tensor:
    """The segment of each of the ``size`` rows of a CSR pointer ``ptr``: int64 ``[size]``."""
    ptr = ptr.long()
    segments = torch.arange(ptr.numel() - 1, device=ptr.device)
    return torch.repeat_interleave(segments, ptr.diff(), output_size=size)


def segment(
    src: torch.Tensor, ptr: torch.Tensor, dim: int = -2, reduce: str = "sum"
) -> torch.Tensor:
    """``scatter`` for rows already grouped into segments: rows ``ptr[r]:ptr[r+1]`` along
    ``dim`` form output row r (``ptr`` int ``[S+1]``, ``ptr[0] = 0``, ``ptr[-1] = src.size(dim)``)."""
    dim = dim % src.dim()
    index = segment_index(ptr, src.size(dim))
    return scatter(src, index, dim, ptr.numel() - 1, reduce)


def segment_reduce(
    src: torch.Tensor,
    perm: torch.Tensor | None,
    ptr: torch.Tensor,
    dim: int,
    reduce: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of the ``fastcore::segment_reduce`` operator: ``(out, arg)`` where row
    ``perm[k]`` (or k) belongs to segment r for ``k in [ptr[r], ptr[r+1])`` (a row listed
    in no segment takes part in nothing); ``arg`` holds, for max/min, the row each output
    took (``src.size(dim)`` for an empty segment), and is an empty int64 tensor otherwise."""
    dim = dim % src.dim()
    segments = ptr.numel() - 1
    size = src.size(dim)
    # As the kernels read it: ptr clamped to [0, size] (and non-decreasing), perm entries
    # outside [0, size) in no segment. A valid CSR is unchanged by both.
    ptr = torch.cummax(ptr.long().clamp(0, size), 0).values
    position = torch.arange(size, device=src.device)
    entry_segment = torch.searchsorted(ptr, position, right=True) - 1
    # CSR entries before ptr[0] or from ptr[-1] on go to an extra slot, dropped below.
    outside = (entry_segment < 0) | (entry_segment >= segments)
    entry_segment = torch.where(outside, segments, entry_segment)
    index = entry_segment
    if perm is not None:  # row perm[k] is the k-th entry
        perm = perm.long()
        target = torch.where((perm >= 0) & (perm < size), perm, size)
        index = torch.full((size + 1,), segments, dtype=torch.int64, device=src.device)
        index = index.scatter(0, target, entry_segment)[:size]
    out = scatter(src, index, dim, segments + 1, reduce).narrow(dim, 0, segments)
    if reduce not in ("max", "min"):
        return out, torch.empty(0, dtype=torch.int64, device=src.device)
    return out, scatter_arg(src, index, dim, segments + 1, reduce).narrow(dim, 0, segments)
