"""``fastcore.ops.spmm``: graph convolution as one batched sparse-dense product over any
number of leading dims (batch, time), with gradients for the features and the edge weights.

``y[..., v, ...] = sum over edges e into v of w_e * x[..., src_e, ...]``. It runs the
``fastcore::spmm`` operator on a :class:`fastcore.Graph`'s cached CSR (edges grouped by
destination, each row summed in a fixed order: deterministic, no atomics). Backward:

* w.r.t. ``x``: the same operator over the transpose (edges grouped by source), with the
  weights permuted to that order (and the same ``residual``); the structure carries both
  permutations between the two orders, so the transpose is a swap of its arguments;
* w.r.t. the edge weights: ``fastcore::spmm_edge_grad`` (an SDDMM), ``<dy[dst_e], x[src_e]>``
  summed over every leading dim and the row, in a fixed order.

Both backward operators have their own backward (spmm and its transpose again), so
gradients of any order work.
"""

from typing import Optional

import torch

from fastcore import _backend, reference
from fastcore.ops._autograd import call, register_autograd
from fastcore.ops._checks import (
    FLOAT_DTYPES,
    check_csr,
    check_dtype,
    check_index_range,
    normalize_dim,
)
from fastcore.ops.graph import Graph

_backend.register_op("spmm", ("reference", "cpu", "triton", "cuda"), gpu_order=("cuda", "triton"))


@torch.library.custom_op("fastcore::spmm_triton", mutates_args=())
def _spmm_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    ptr: torch.Tensor,
    col: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
    t_pos: torch.Tensor,
    dim: int,
    residual: bool,
    check: bool,
) -> torch.Tensor:
    _check_layout(x, ptr, dim, residual)
    if check:
        _check_structure_values(x, ptr, col, t_ptr, t_col, t_edge, t_pos, dim)
    from fastcore.kernels import spmm as kernels

    return kernels.spmm(x, weight, ptr, col, dim, residual)


@torch.library.custom_op("fastcore::spmm_edge_grad_triton", mutates_args=())
def _spmm_edge_grad_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    ptr: torch.Tensor,
    col: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
    t_pos: torch.Tensor,
    dim: int,
) -> torch.Tensor:
    from fastcore.kernels import spmm as kernels

    return kernels.spmm_edge_grad(grad, x, ptr, col, dim)


def _check_layout(x, ptr, dim, residual):
    if residual and ptr.numel() - 1 != x.shape[dim]:
        raise ValueError(
            f"spmm: residual needs a square structure, but it has {ptr.numel() - 1} rows for "
            f"{x.shape[dim]} inputs along dimension {dim}"
        )


def _check_structure_values(x, ptr, col, t_ptr, t_col, t_edge, t_pos, dim):
    edges = col.numel()
    check_csr(ptr, None, edges, "spmm", dim)
    check_index_range(col, x.shape[dim], "spmm", "col", dim)
    check_csr(t_ptr, t_edge, edges, "spmm", dim)
    check_index_range(t_col, ptr.numel() - 1, "spmm", "t_col", dim)
    if edges and not torch.equal(t_pos.long()[t_edge.long()], torch.arange(edges, device=x.device)):
        raise ValueError("spmm: t_pos must be the inverse permutation of t_edge")


def _spmm_fake(x, weight, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, residual, check):
    _check_layout(x, ptr, dim, residual)
    shape = list(x.shape)
    shape[dim] = ptr.shape[0] - 1
    return x.new_empty(shape)


def _edge_grad_fake(grad, x, ptr, col, t_ptr, t_col, t_edge, t_pos, dim):
    return x.new_empty(col.shape)


def _register_family(spmm_name: str, edge_grad_name: str) -> None:
    """Fake kernels and autograd for one backend's spmm / spmm_edge_grad operators."""
    spmm_op = getattr(torch.ops.fastcore, spmm_name).default
    edge_grad_op = getattr(torch.ops.fastcore, edge_grad_name).default
    torch.library.register_fake(spmm_op)(_spmm_fake)
    torch.library.register_fake(edge_grad_op)(_edge_grad_fake)

    def transpose_apply(y, weight, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, residual):
        """The transpose product: row u of the result sums weight[k] * y[dst_k] over the
        CSR entries k whose source is u (then adds y[u] when residual)."""
        t_weight = None if weight is None else weight[t_edge]
        return spmm_op(y, t_weight, t_ptr, t_col, ptr, col, t_pos, t_edge, dim, residual, False)

    def spmm_setup(ctx, inputs, output):
        x, weight, ptr, col, t_ptr, t_col, t_edge, t_pos, dim, residual, _ = inputs
        ctx.save_for_backward(x, weight, ptr, col, t_ptr, t_col, t_edge, t_pos)
        ctx.dim, ctx.residual = dim, residual

    def spmm_backward(ctx, grad):
        x, weight, *structure = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = transpose_apply(grad, weight, *structure, ctx.dim, ctx.residual)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = edge_grad_op(grad, x, *structure, ctx.dim)
        return grad_x, grad_w, *([None] * 9)

    def edge_grad_setup(ctx, inputs, output):
        grad, x, *structure, dim = inputs
        ctx.save_for_backward(grad, x, *structure)
        ctx.dim = dim

    def edge_grad_backward(ctx, upstream):
        # out[k] = <grad[v_k], x[col_k]>: linear in grad (rows v_k get upstream[k] * x[col_k])
        # and in x (rows col_k get upstream[k] * grad[v_k]).
        grad, x, *structure = ctx.saved_tensors
        d_grad = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad = spmm_op(x, upstream, *structure, ctx.dim, False, False)
        if ctx.needs_input_grad[1]:
            d_x = transpose_apply(grad, upstream, *structure, ctx.dim, False)
        return d_grad, d_x, *([None] * 7)

    register_autograd(spmm_op, spmm_backward, setup_context=spmm_setup)
    register_autograd(edge_grad_op, edge_grad_backward, setup_context=edge_grad_setup)


_register_family("spmm_triton", "spmm_edge_grad_triton")
if _backend._C is not None:
    _register_family("spmm", "spmm_edge_grad")


def spmm(
    x: torch.Tensor,
    graph: Graph | torch.Tensor,
    edge_weight: Optional[torch.Tensor] = None,
    dim: int = -2,
    *,
    residual: bool = False,
) -> torch.Tensor:
    """Graph convolution over every leading dim in one call:
    ``y[..., v, ...] = sum over edges e with dst_e == v of edge_weight[e] * x[..., src_e, ...]``
    (plus ``x[..., v, ...]`` with ``residual``).

    Args:
        x: ``[*lead, N, *trail]`` with the N nodes at ``dim``; float16/bfloat16/float32/
            float64 (half types accumulate in float32). ``*trail`` is the row that moves
            along each edge: ``F*H`` for a river graph over ``(B, T, N, F, H)`` with
            ``dim=-3``, ``H`` for a causal graph over ``(B, T, N*F, H)``.
        graph: a :class:`fastcore.Graph` over N nodes (validated once, cached layouts: use
            this in a model), or an ``edge_index`` int ``[2, E]`` (row 0 source, row 1
            destination), validated and laid out on every call.
        edge_weight: ``[E]`` in edge order (the order of ``graph.edge_index``), x's dtype, or
            None for 1. Differentiable.
        dim: the node dimension.
        residual: return ``x + spmm(x, graph, edge_weight)`` in the same pass: each row sums
            its incoming edges, then adds its own input row (in the accumulation type); the
            backward likewise adds the output gradient to the transposed product.

    Returns:
        ``[*lead, N, *trail]``. Deterministic (sorted CSR, fixed summation order).

    Raises:
        IndexError: an edge index out of ``[0, N)`` (only when ``graph`` is an edge_index;
            a Graph checked its own at construction); ValueError: a graph over a different
            number of nodes, or an ``edge_weight`` of the wrong length or device;
            TypeError: wrong dtypes.

    Examples:
        >>> import torch
        >>> from fastcore import Graph, ops
        >>> g = Graph(torch.tensor([[0, 1, 2], [1, 2, 0]]), num_nodes=3)  # 0->1->2->0
        >>> x = torch.tensor([[1.0], [10.0], [100.0]])
        >>> ops.spmm(x, g, dim=0).flatten().tolist()
        [100.0, 1.0, 10.0]
        >>> ops.spmm(x, g, torch.tensor([0.5, 0.5, 0.5]), dim=0, residual=True).flatten().tolist()
        [51.0, 10.5, 105.0]
    """
    check_dtype(x, FLOAT_DTYPES, "spmm")
    dim = normalize_dim(dim, x.dim(), "spmm")
    if isinstance(graph, torch.Tensor):
        graph = Graph(graph, x.shape[dim], device=x.device)
    elif not isinstance(graph, Graph):
        raise TypeError(
            f"spmm: graph must be a fastcore.Graph or an edge_index tensor, got {type(graph).__name__}"
        )
    if graph.num_nodes != x.shape[dim]:
        raise ValueError(
            f"spmm: the graph has {graph.num_nodes} nodes but x has {x.shape[dim]} along dimension {dim}"
        )
    if graph.device != x.device:
        raise ValueError(
            f"spmm: the graph is on {graph.device} but x is on {x.device}; use graph.to(device)"
        )
    weight = None
    if edge_weight is not None:
        if (
            not isinstance(edge_weight, torch.Tensor)
            or edge_weight.dim() != 1
            or edge_weight.shape[0] != graph.num_edges
        ):
            shape = (
                tuple(edge_weight.shape)
                if isinstance(edge_weight, torch.Tensor)
                else type(edge_weight).__name__
            )
            raise ValueError(
                f"spmm: edge_weight must be 1-D with one entry per edge ({graph.num_edges}), got {shape}"
            )
        if edge_weight.dtype != x.dtype:
            raise TypeError(
                f"spmm: edge_weight dtype {edge_weight.dtype} must equal x's dtype {x.dtype}"
            )
        if edge_weight.device != x.device:
            raise ValueError(f"spmm: edge_weight is on {edge_weight.device} but x is on {x.device}")
        weight = edge_weight[graph.perm]  # CSR order
    return apply_csr(x, weight, graph.csr(), dim, residual=bool(residual))


def apply_csr(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    structure: tuple[torch.Tensor, ...],
    dim: int,
    residual: bool = False,
) -> torch.Tensor:
    """Run the ``fastcore::spmm`` operator on the chosen backend for a validated structure
    ``(ptr, col, t_ptr, t_col, t_edge, t_pos)`` (a :class:`fastcore.Graph`'s, or a
    rectangular one such as a :class:`fastcore.Resample`'s) and CSR-ordered ``weight``;
    ``dim`` normalised."""
    backend = _backend.resolve("spmm", x.device)
    if backend == "reference":
        _check_layout(x, structure[0], dim, residual)
        return reference.spmm_csr(x, weight, structure[0], structure[1], dim, residual)
    op = torch.ops.fastcore.spmm_triton if backend == "triton" else torch.ops.fastcore.spmm
    return call(op, x, weight, *structure, dim, residual, False)
