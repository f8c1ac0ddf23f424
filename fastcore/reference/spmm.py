"""Reference graph convolution (sparse times dense): the oracle of ``fastcore.ops.spmm``."""

from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def spmm(
    x: torch.Tensor,
    edge_index: torch.Tensor,
    edge_weight: torch.Tensor | None = None,
    dim: int = -2,
    num_dst: int | None = None,
) -> torch.Tensor:
    """``y[..., v, ...] = sum over edges e with edge_index[1, e] == v of
    edge_weight[e] * x[..., edge_index[0, e], ...]``: every edge's message, summed at its
    destination. ``x [*lead, N, *trail]`` with N at ``dim``; the output has ``num_dst``
    (default N) rows there. Half types accumulate in float32."""
    dim = dim % x.dim()
    src, dst = edge_index[0].long(), edge_index[1].long()
    acc = _acc_dtype(x.dtype)
    messages = x.index_select(dim, src).to(acc)
    if edge_weight is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        messages = messages * edge_weight.to(acc).view(shape)
    out_shape = list(x.shape)
    out_shape[dim] = x.shape[dim] if num_dst is None else num_dst
    out = torch.zeros(out_shape, dtype=acc, device=x.device).index_add(dim, dst, messages)
    return out.to(x.dtype)


def spmm_csr(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    ptr: torch.Tensor,
    col: torch.Tensor,
    dim: int = -2,
    residual: bool = False,
) -> torch.Tensor:
    """The oracle of the ``fastcore::spmm`` operator: CSR entry k (destination v for
    ``k in [ptr[v], ptr[v+1])``) adds ``weight[k] * x[..., col[k], ...]`` to row v; with
    ``residual`` (a square structure) each row then adds its own ``x[..., v, ...]``, in the
    accumulation type."""
    ptr = ptr.long()
    destinations = torch.repeat_interleave(
        torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff(), output_size=col.numel()
    )
    edge_index = torch.stack([col.long(), destinations])
    if not residual:
        return spmm(x, edge_index, weight, dim, ptr.numel() - 1)
    acc = _acc_dtype(x.dtype)
    out = spmm(x.to(acc), edge_index, None if weight is None else weight.to(acc), dim)
    return (out + x.to(acc)).to(x.dtype)
