"""CSR helpers shared by the ops: grouping an index by value, and the inverse map."""

from __future__ import annotations

import torch


def index_csr(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, ptr)`` grouping the positions of ``index [M]`` by value in ``[0, size)``.

    The rows ``perm[ptr[v]:ptr[v+1]]`` are the positions m (ascending: the sort is stable)
    where ``index[m] == v``; ``perm`` is int64 ``[M]``, ``ptr`` int64 ``[size + 1]``. No host
    synchronisation. Values outside ``[0, size)`` fall before ``ptr[0]`` or after
    ``ptr[-1]``, so they belong to no segment (callers validate first).

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> perm, ptr = ops.index_csr(torch.tensor([0, 1, 0, 2]), 4)
        >>> perm.tolist()  # positions holding 0, then 1, then 2
        [0, 2, 1, 3]
        >>> ptr.tolist()  # value v owns perm[ptr[v]:ptr[v+1]]; value 3 owns nothing
        [0, 2, 3, 4, 4]
    """
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
        what = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"index_csr: index must be an int32 or int64 tensor, got {what}")
    if index.dim() != 1:
        raise ValueError(f"index_csr: index must be 1-D, got shape {tuple(index.shape)}")
    if isinstance(size, bool) or not isinstance(size, (int, torch.SymInt)) or size < 0:
        raise ValueError(f"index_csr: size must be an int >= 0, got {size!r}")
    sorted_index, perm = torch.sort(index.long(), stable=True)
    bounds = torch.arange(size + 1, device=index.device, dtype=torch.int64)
    return perm, torch.searchsorted(sorted_index, bounds)


def segment_of(perm: torch.Tensor | None, ptr: torch.Tensor, size: int) -> torch.Tensor:
    """The segment each of the ``size`` source rows belongs to: int64 ``[size]`` with
    ``out[perm[k]] = r`` (or ``out[k] = r``) for ``k in [ptr[r], ptr[r+1])``.

    A row in no segment gets ``S = ptr.numel() - 1``, one past the last segment, so that a
    ``gather(..., check=False)`` of a gradient reads zeros for it: the rows before
    ``ptr[0]`` or from ``ptr[-1]`` on (an index_csr built from values out of range) and,
    with ``check=False`` input, rows named only by perm entries outside ``[0, size)`` (which
    the kernels skip). ``ptr`` is read clamped to ``[0, size]`` and non-decreasing, as the
    kernels read a valid one. No host synchronisation: O(size + S) integer work."""
    segments = ptr.shape[0] - 1
    bounds = torch.cummax(ptr.long().clamp(0, size), 0).values
    # entry k lies in segment (number of bounds <= k) - 1: a count, then a running sum.
    starts = torch.bincount(bounds, minlength=size + 1)[: size + 1]
    entry = torch.cumsum(starts, 0)[:size] - 1
    entry = torch.where((entry < 0) | (entry >= segments), segments, entry)
    if perm is None:
        return entry
    perm = perm.long()
    target = torch.where((perm >= 0) & (perm < size), perm, size)
    rows = torch.full((size + 1,), segments, dtype=torch.int64, device=ptr.device)
    return rows.scatter_(0, target, entry)[:size]


def segment_counts(rows: torch.Tensor, segments: int) -> torch.Tensor:
    """Members per segment (int64 ``[segments]``) from :func:`segment_of`'s ``rows``."""
    return torch.bincount(rows, minlength=segments + 1)[:segments]


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (int64, no host synchronisation)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
