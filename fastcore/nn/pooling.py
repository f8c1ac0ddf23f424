"""Pooling between the levels of a :class:`fastcore.Hierarchy` and unpooling back.

Pooling reduces the children of every parent (``fastcore.ops.segment_csr`` over the
level's cached CSR); unpooling copies each parent's row to its children
(``fastcore.ops.gather``, or ``gather_add`` fused with a skip connection), and its
gradient is the deterministic segment sum. The
hierarchy was validated when it was built, so neither direction reads index values or
synchronises with the device.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcore.graph import Hierarchy
from fastcore.ops import gather, gather_add, segment_csr
from fastcore.ops.segment import REDUCES


def _node_dim(x: torch.Tensor, dim: int | None) -> int:
    """The node dimension: ``dim``, or by default -3 of ``(B, T, N, F, H)`` and -2 of
    ``(..., N, H)``."""
    if dim is None:
        dim = -3 if x.dim() == 5 else -2
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"node dim {dim} is out of range for a tensor of {x.dim()} dimensions")
    return dim % x.dim()


def _check_nodes(
    x: torch.Tensor, dim: int, expected: int, hierarchy: Hierarchy, level: int, what: str
):
    if x.shape[dim] != expected:
        raise ValueError(
            f"{what}: input has {x.shape[dim]} nodes along dimension {dim} but level "
            f"{hierarchy.level_names[level]!r} has {expected}"
        )


class GraphPooling(nn.Module):
    """Reduce the nodes of one hierarchy level into their parents at the next level.

    Args:
        reduce: ``"sum" | "mean" | "max" | "min"`` over each parent's children (a parent
            always has at least one child after :func:`fastcore.remap_hierarchy_and_graphs_strict`).
        dim: the node dimension of the input; None means -3 for 5-D ``(B, T, N, F, H)``
            input and -2 otherwise (``(..., N, H)``).

    Shape:
        ``x [*lead, N_level, *trail]`` -> ``[*lead, N_{level+1}, *trail]``.

    Examples:
        >>> import torch
        >>> from fastcore import Hierarchy
        >>> from fastcore.nn import GraphPooling
        >>> h = Hierarchy([4, 2], parent_index=[[0, 0, 1, 1]], level_names=["fine", "coarse"])
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [5.0]])  # (N_fine=4, H=1)
        >>> GraphPooling("mean")(x, h, "fine").flatten().tolist()
        [1.5, 4.0]
        >>> GraphPooling("max")(x, h, 0).flatten().tolist()
        [2.0, 5.0]
        >>> GraphPooling("sum")(torch.randn(2, 3, 4, 5, 8), h, "fine").shape  # (B, T, N, F, H)
        torch.Size([2, 3, 2, 5, 8])
    """

    def __init__(self, reduce: str = "mean", dim: int | None = None) -> None:
        super().__init__()
        if reduce not in REDUCES:
            raise ValueError(
                f"GraphPooling: reduce must be one of {', '.join(REDUCES)}; got {reduce!r}"
            )
        self.reduce = reduce
        self.dim = dim

    def forward(self, x: torch.Tensor, hierarchy: Hierarchy, level: int | str) -> torch.Tensor:
        """Pool ``x`` from ``level`` (an index or a name, not the coarsest) to its parents."""
        lvl = hierarchy.level(level)
        if lvl >= hierarchy.num_levels - 1:
            raise ValueError(
                f"GraphPooling: level {hierarchy.level_names[lvl]!r} is the coarsest; it has no parents"
            )
        dim = _node_dim(x, self.dim)
        _check_nodes(x, dim, hierarchy.num_nodes[lvl], hierarchy, lvl, "GraphPooling")
        perm, ptr = hierarchy.pool_csr(lvl)
        return segment_csr(x, perm, ptr, dim, self.reduce, check=False)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, dim={self.dim}"


class GraphUnpooling(nn.Module):
    """Copy every parent's row back to its children: the transpose of sum pooling.

    Args:
        dim: the node dimension, as for :class:`GraphPooling`.

    Shape:
        ``x [*lead, N_{level+1}, *trail]`` -> ``[*lead, N_level, *trail]``; ``skip``, when
        given, has the output's shape and is added (a skip connection).

    Examples:
        >>> import torch
        >>> from fastcore import Hierarchy
        >>> from fastcore.nn import GraphUnpooling
        >>> h = Hierarchy([4, 2], parent_index=[[0, 0, 1, 1]], level_names=["fine", "coarse"])
        >>> parents = torch.tensor([[1.5], [4.0]])  # (N_coarse=2, H=1)
        >>> GraphUnpooling()(parents, h, "fine").flatten().tolist()
        [1.5, 1.5, 4.0, 4.0]
        >>> skip = torch.tensor([[1.0], [2.0], [3.0], [5.0]])
        >>> GraphUnpooling()(parents, h, "fine", skip=skip).flatten().tolist()
        [2.5, 3.5, 7.0, 9.0]
    """

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(
        self,
        x: torch.Tensor,
        hierarchy: Hierarchy,
        level: int | str,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unpool ``x`` from the parents of ``level`` (the finer level, by index or name)."""
        lvl = hierarchy.level(level)
        if lvl >= hierarchy.num_levels - 1:
            raise ValueError(
                f"GraphUnpooling: level {hierarchy.level_names[lvl]!r} is the coarsest; it has no parents"
            )
        dim = _node_dim(x, self.dim)
        _check_nodes(x, dim, hierarchy.num_nodes[lvl + 1], hierarchy, lvl + 1, "GraphUnpooling")
        parents = hierarchy.parent_index(lvl)
        if skip is None:
            return gather(x, parents, dim, check=False)
        expected = list(x.shape)
        expected[dim] = parents.shape[0]
        if list(skip.shape) != expected:
            raise ValueError(
                f"GraphUnpooling: skip has shape {tuple(skip.shape)}, expected {tuple(expected)}"
            )
        return gather_add(x, parents, skip, dim, check=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
