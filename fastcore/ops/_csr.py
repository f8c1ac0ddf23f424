"""CSR helpers shared by the ops: grouping an index by value, and the inverse map."""

from __future__ import annotations

import torch


def index_csr(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, ptr)`` grouping the positions of ``index [M]`` by value in ``[0, size)``.

    The rows ``perm[ptr[v]:ptr[v+1]]`` are the positions m (ascending: the sort is stable)
    where ``index[m] == v``; ``perm`` is int64 ``[M]``, ``ptr`` int64 ``[size + 1]``. No host
    synchronisation. Values outside ``[0, size)`` fall before ``ptr[0]`` or after
    ``ptr[-1]``, so they belong to no segment (callers validate first).
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
