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
    sorted_index, perm = torch.sort(index.long(), stable=True)
    bounds = torch.arange(size + 1, device=index.device, dtype=torch.int64)
    return perm, torch.searchsorted(sorted_index, bounds)


def segment_of(perm: torch.Tensor | None, ptr: torch.Tensor, size: int) -> torch.Tensor:
    """The segment each of the ``size`` source rows belongs to: int64 ``[size]`` with
    ``out[perm[k]] = r`` (or ``out[k] = r``) for ``k in [ptr[r], ptr[r+1])``."""
    segments = torch.arange(ptr.shape[0] - 1, device=ptr.device)
    rows = torch.repeat_interleave(segments, ptr.diff(), output_size=size)
    if perm is None:
        return rows
    return torch.empty_like(rows).scatter_(0, perm.long(), rows)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (int64, no host synchronisation)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
