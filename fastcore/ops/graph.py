"""``fastcore.Graph``: a directed graph validated once, with the sparse layouts that
:func:`fastcore.ops.spmm` runs (CSR by destination, its transpose and the permutations
between them) computed once, so a convolution over it never reads index values again."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastcore.ops._csr import index_csr, inverse_permutation

__all__ = ["NORMALIZATIONS", "Graph"]

#: A 1-D (or, for edge indices, 2-D) integer array: a torch tensor, a NumPy array or a list.
IndexLike = torch.Tensor | np.ndarray | Sequence[Any]


def find_device(obj: Any, depth: int = 0) -> torch.device | None:
    """The device of the first torch tensor in (shallowly nested) ``obj``, else None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    if depth > 3 or obj is None or isinstance(obj, (str, bytes, np.ndarray)):
        return None
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = find_device(item, depth + 1)
            if found is not None:
                return found
        return None
    if hasattr(obj, "edge_index"):
        return find_device(getattr(obj, "edge_index", None), depth + 1)
    return None


def resolve_device(device: torch.device | str | None, *inputs: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for obj in inputs:
        found = find_device(obj)
        if found is not None:
            return found
    return torch.device("cpu")


def as_int64(x: Any, what: str, device: torch.device) -> torch.Tensor:
    """``x`` as an int64 tensor on ``device`` (any shape); TypeError for non-integers."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.asarray(x)
        if a.size and a.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integers, got NumPy dtype {a.dtype}")
        if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{what} value {int(a.max())} does not fit in int64")
        t = torch.from_numpy(a.astype(np.int64) if a.size else np.zeros(a.shape, np.int64))
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{what} must hold integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def first_true(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0])


NORMALIZATIONS = ("none", "mean", "sym")


def check_edge_index(ei: torch.Tensor, num_nodes: int) -> None:
    """IndexError naming the first edge (and its end) outside ``[0, num_nodes)``."""
    if not ei.shape[1]:
        return
    bad = (ei < 0) | (ei >= num_nodes)
    if bool(bad.any()):
        e = first_true(bad.any(0))
        end = 0 if bool(bad[0, e]) else 1
        v = int(ei[end, e])
        relation = "< 0" if v < 0 else f">= num_nodes {num_nodes}"
        raise IndexError(
            f"Graph: edge index {v} {relation} (edge {e}, {('source', 'target')[end]})"
        )


@torch.library.custom_op("fastcore::checked_edge_index", mutates_args=())
def _checked_edge_index(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    check_edge_index(edge_index, num_nodes)
    return edge_index.clone()


@_checked_edge_index.register_fake
def _checked_edge_index_fake(edge_index, num_nodes):
    return torch.empty_like(edge_index)


class Graph:
    """A directed graph over ``num_nodes`` nodes for :func:`fastcore.ops.spmm`, validated
    once, with the sparse layouts every convolution needs computed once.

    Edge e goes from ``edge_index[0, e]`` (source) to ``edge_index[1, e]`` (destination).
    Cached, all int64 on the graph's device:

    * ``perm [E]``: the edges sorted stably by destination (CSR entry k is edge ``perm[k]``);
      ``ptr [N+1]`` and ``col [E]`` (the source of each CSR entry): the forward's CSR;
    * ``t_ptr [N+1]``, ``t_col [E]`` (the destination of each entry of the edges sorted
      stably by source), ``t_edge [E]`` (each such entry's CSR position) and ``t_pos [E]``
      (its inverse): the transpose, which the backward runs as a swap of the arguments;
    * ``in_degree`` / ``out_degree [N]`` and :meth:`normalization` weights.

    Using a Graph never reads index values again, so it never synchronises with a GPU.

    Args:
        edge_index: int ``[2, E]`` (torch, NumPy or nested lists), values in ``[0, num_nodes)``.
        num_nodes: N.
        edge_attr: optional ``[E, ...]`` edge features, kept in edge order.
        device: where the graph lives; None: edge_index's device (CPU for non-tensors).

    Raises:
        IndexError: an edge index negative or ``>= num_nodes`` (the value and edge named);
        ValueError: a bad shape, ``num_nodes`` or ``edge_attr`` length.
    """

    def __init__(
        self,
        edge_index: IndexLike,
        num_nodes: int,
        edge_attr: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if (
            isinstance(num_nodes, bool)
            or not isinstance(num_nodes, (int, np.integer))
            or num_nodes < 0
        ):
            raise ValueError(f"Graph: num_nodes must be an int >= 0, got {num_nodes!r}")
        dev = resolve_device(device, edge_index)
        ei = as_int64(edge_index, "Graph edge_index", dev)
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise ValueError(f"Graph: edge_index must have shape [2, E], got {tuple(ei.shape)}")
        n = int(num_nodes)
        if torch.compiler.is_compiling():  # the same check, run inside the compiled graph
            ei = torch.ops.fastcore.checked_edge_index(ei, n)
        else:
            check_edge_index(ei, n)
        if edge_attr is not None:
            if (
                not isinstance(edge_attr, torch.Tensor)
                or edge_attr.dim() == 0
                or edge_attr.shape[0] != ei.shape[1]
            ):
                shape = (
                    tuple(edge_attr.shape)
                    if isinstance(edge_attr, torch.Tensor)
                    else type(edge_attr).__name__
                )
                raise ValueError(
                    f"Graph: edge_attr must be a tensor [E={ei.shape[1]}, ...], got {shape}"
                )
            edge_attr = edge_attr.to(dev)
        self.num_nodes = n
        self.edge_index = ei
        self.edge_attr = edge_attr
        src, dst = ei[0], ei[1]
        self.perm, self.ptr = index_csr(dst, n)
        self.col = src[self.perm]
        by_source, self.t_ptr = index_csr(src, n)
        self.t_col = dst[by_source]
        self.t_edge = inverse_permutation(self.perm)[by_source]
        self.t_pos = inverse_permutation(self.t_edge)
        self.in_degree = self.ptr.diff()
        self.out_degree = self.t_ptr.diff()
        self._norms: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    def csr(self) -> tuple[torch.Tensor, ...]:
        """``(ptr, col, t_ptr, t_col, t_edge, t_pos)``: the structure arguments of
        ``fastcore::spmm``."""
        return self.ptr, self.col, self.t_ptr, self.t_col, self.t_edge, self.t_pos

    def normalization(self, kind: str = "sym", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Per-edge weights ``[E]`` in edge order, computed once per (kind, dtype):
        ``"sym"``: ``1 / sqrt(out_degree[src] * in_degree[dst])``; ``"mean"``:
        ``1 / in_degree[dst]`` (each destination averages its incoming rows); ``"none"``: 1."""
        if kind not in NORMALIZATIONS:
            raise ValueError(
                f"Graph.normalization: kind must be one of {', '.join(NORMALIZATIONS)}; got {kind!r}"
            )
        dtype = dtype or torch.get_default_dtype()
        key = (kind, dtype)
        if key not in self._norms:
            src, dst = self.edge_index
            deg_in = self.in_degree.to(dtype)
            if kind == "none":
                w = torch.ones(self.num_edges, dtype=dtype, device=self.device)
            elif kind == "mean":
                w = deg_in[dst].reciprocal()
            else:
                w = (self.out_degree.to(dtype)[src] * deg_in[dst]).rsqrt()
            self._norms[key] = w
        return self._norms[key]

    def to(self, device: torch.device | str) -> Graph:
        """A copy with every tensor on ``device`` (no re-validation)."""
        other = copy.copy(self)
        for name in (
            "edge_index",
            "perm",
            "ptr",
            "col",
            "t_ptr",
            "t_col",
            "t_edge",
            "t_pos",
            "in_degree",
            "out_degree",
        ):
            setattr(other, name, getattr(self, name).to(device))
        if self.edge_attr is not None:
            other.edge_attr = self.edge_attr.to(device)
        other._norms = {k: v.to(device) for k, v in self._norms.items()}
        return other

    def __repr__(self) -> str:
        attr = "" if self.edge_attr is None else f", edge_attr={tuple(self.edge_attr.shape)}"
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}{attr}, device={self.device})"
