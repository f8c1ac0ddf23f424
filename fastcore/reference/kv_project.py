"""Reference KV-cache projection: the unfused three steps (resample along time, project
head_dim, mix heads), and the distillation loss on top. The oracle of
``fastcore.ops.kv_project`` / ``kv_distill_loss`` and the benchmark baseline.

The operator-level contract, shared by every backend (``fastcore::kv_project`` and its
backward), works on *groups*: one group per (layer, K or V), so all layers run in one call.

* ``kv``: a list of G tensors ``[B, Ht, Tt, Dt]`` (one per group, same shape and dtype).
* ``head_mix``: ``[G, Hs, Ht]``.
* ``dim_proj``: ``[G, Dt, Ds]`` (shared by the teacher heads) or ``[G, Ht, Dt, Ds]``
  (one per teacher head).
* ``bias``: ``[G, Hs, Ds]`` or None.
* ``ptr [Ts+1]``, ``idx [E]``, ``weight [E]``: the resampling rows (a
  :class:`fastcore.Resample`): student step t is ``sum_k weight[k] * x[idx[k]]`` over
  ``k in [ptr[t], ptr[t+1])``; an empty row gives zeros. Per-example rows (a batched
  Resample): ``ptr [B, Ts+1]`` whose values index the concatenated ``idx``/``weight``,
  example b's step t summing ``weight[k] * x[b, idx[k]]`` over ``k in [ptr[b,t], ptr[b,t+1])``.
* ``mask`` (the loss only): ``[B, Ts]`` bool or None; a False row takes part in nothing
  (its teacher steps are not read into the loss, its student row is ignored) and each
  group's mean runs over the valid rows only (``n_valid * Hs * Ds`` elements for mse,
  ``n_valid * Hs`` rows for cosine; no valid row gives 0).
* Output ``[G, B, Hs, Ts, Ds]`` in kv's dtype:
  ``out[g,b,s,t] = sum_h head_mix[g,s,h] * (sum_k weight[k] kv[g][b,h,idx[k]]) @ P[g](,h) + bias[g,s]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastcore.reference.segment import _acc_dtype


def resample_rows(
    x: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, dim: int
) -> torch.Tensor:
    """``out[..., t, ...] = sum_{k in [ptr[t], ptr[t+1])} weight[k] * x[..., idx[k], ...]``
    along ``dim``, in x's dtype (an empty row gives zeros)."""
    dim = dim % x.dim()
    if ptr.dim() == 2:
        return _resample_batched(x, ptr, idx, weight, dim)
    rows = ptr.numel() - 1
    ptr = ptr.long()
    dst = torch.repeat_interleave(
        torch.arange(rows, device=x.device), ptr.diff(), output_size=idx.numel()
    )
    picked = x.index_select(dim, idx.long())
    shape = [1] * x.dim()
    shape[dim] = -1
    picked = picked * weight.to(x.dtype).view(shape)
    out_shape = list(x.shape)
    out_shape[dim] = rows
    return x.new_zeros(out_shape).index_add(dim, dst, picked)


def _resample_batched(
    x: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, dim: int
) -> torch.Tensor:
    """Per-example rows ``ptr [B, Ts+1]`` along ``dim`` of ``x [B, ...]`` (dim > 0)."""
    batch, rows = ptr.shape[0], ptr.shape[1] - 1
    ptr = ptr.long()
    entries = idx.numel()
    flat_rows = torch.repeat_interleave(
        torch.arange(batch * rows, device=x.device), ptr.diff(dim=1).reshape(-1),
        output_size=entries,
    )  # fmt: skip
    example = torch.repeat_interleave(
        torch.arange(batch, device=x.device), ptr[:, -1] - ptr[:, 0], output_size=entries
    )
    moved = x.movedim(dim, 1)  # [B, Tt, ...]
    picked = moved[example, idx.long()]  # [E, ...]
    picked = picked * weight.to(x.dtype).view(-1, *([1] * (picked.dim() - 1)))
    out = moved.new_zeros(batch * rows, *moved.shape[2:]).index_add(0, flat_rows, picked)
    return out.reshape(batch, rows, *moved.shape[2:]).movedim(1, dim)


def kv_project_group(
    kv: torch.Tensor,
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor | None,
    idx: torch.Tensor | None,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One group, the three unfused steps: ``kv [B, Ht, Tt, Dt]`` -> ``[B, Hs, Ts, Ds]``
    (``head_mix [Hs, Ht]``, ``dim_proj [Dt, Ds]`` or ``[Ht, Dt, Ds]``, ``bias [Hs, Ds]``
    or None; ``ptr`` None: no resampling). Computed in kv's dtype, half types in float32.
    ``mask [B, Ts]`` (bool): the resampled rows of False steps are replaced by zeros
    (selected, not multiplied: a NaN there goes nowhere, forward or backward)."""
    acc = _acc_dtype(kv.dtype)
    x = kv.to(acc)
    if ptr is not None:
        x = resample_rows(x, ptr, idx, weight, dim=2)  # 1. time:   [B, Ht, Ts, Dt]
    if mask is not None:
        x = torch.where(mask[:, None, :, None], x, x.new_zeros(()))
    projected = torch.matmul(x, dim_proj.to(acc))  # 2. head_dim: [B, Ht, Ts, Ds]
    out = torch.einsum("sh,bhtd->bstd", head_mix.to(acc), projected)  # 3. heads
    if bias is not None:
        out = out + bias.to(acc)[:, None, :]
    return out.to(kv.dtype)


def kv_project(
    kv: Sequence[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor | None,
    idx: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """The operator contract (module docstring): G groups -> ``[G, B, Hs, Ts, Ds]``."""
    outs = [
        kv_project_group(
            kv[g], head_mix[g], dim_proj[g], None if bias is None else bias[g], ptr, idx, weight
        )
        for g in range(len(kv))
    ]
    return torch.stack(outs)


def distill_group_loss(
    projected: torch.Tensor,
    student: torch.Tensor,
    loss: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One group's loss between the projected teacher ``[B, Hs, Ts, Ds]`` and the student
    cache of the same shape, in float32 (float64 for float64 inputs):

    * ``"mse"``: the mean over every element of ``(projected - student)^2``;
    * ``"cosine"``: the mean over every (b, s, t) of ``1 - cos(projected, student)`` along
      Ds, each norm clamped below at 1e-8 (as ``F.cosine_similarity``'s eps).

    An empty cache gives 0. ``mask [B, Ts]`` (bool): only the True rows count, the mean
    over them (none gives 0); the False rows of both sides are selected away (never
    multiplied), so a NaN there changes nothing, forward or backward."""
    acc = torch.float64 if torch.float64 in (projected.dtype, student.dtype) else torch.float32
    p, s = projected.to(acc), student.to(acc)
    if p.numel() == 0:
        return (p.sum() + s.sum()) * 0  # 0, still connected to both graphs
    if mask is not None:
        return _masked_group_loss(p, s, loss, mask)
    if loss == "mse":
        return (p - s).square().mean()
    if loss == "cosine":
        eps = 1e-8
        dot = (p * s).sum(-1)
        norms = p.norm(dim=-1).clamp_min(eps) * s.norm(dim=-1).clamp_min(eps)
        return (1 - dot / norms).mean()
    raise ValueError(f"kv_distill_loss: loss must be 'mse' or 'cosine', got {loss!r}")


def _masked_group_loss(
    p: torch.Tensor, s: torch.Tensor, loss: str, mask: torch.Tensor
) -> torch.Tensor:
    rows = mask[:, None, :].expand(p.shape[:-1])  # [B, Hs, Ts]
    zero = p.new_zeros(())
    p = torch.where(rows[..., None], p, zero)
    s = torch.where(rows[..., None], s, zero)
    count = mask.sum().to(torch.float64) * p.shape[1]
    if loss == "mse":
        count = count * p.shape[-1]
        terms = (p - s).square().sum(-1)
    elif loss == "cosine":
        eps = 1e-8
        norms = p.norm(dim=-1).clamp_min(eps) * s.norm(dim=-1).clamp_min(eps)
        terms = 1 - (p * s).sum(-1) / norms
    else:
        raise ValueError(f"kv_distill_loss: loss must be 'mse' or 'cosine', got {loss!r}")
    total = torch.where(rows, terms, zero).sum()
    return (total / count.clamp_min(1)).to(p.dtype)


def kv_distill_loss(
    kv: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor | None,
    idx: torch.Tensor | None,
    weight: torch.Tensor | None,
    loss: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group losses ``[G]`` between the projected teacher groups and ``student`` (a list
    of G tensors ``[B, Hs, Ts, Ds]``): the unfused path, which materialises every projected
    group. ``mask [B, Ts]`` (bool) or None: see the module docstring."""
    losses = [
        distill_group_loss(
            kv_project_group(
                kv[g],
                head_mix[g],
                dim_proj[g],
                None if bias is None else bias[g],
                ptr,
                idx,
                weight,
                mask,
            ),
            student[g],
            loss,
            mask,
        )
        for g in range(len(kv))
    ]
    if not losses:
        return torch.zeros(0, dtype=torch.float32, device=head_mix.device)
    return torch.stack(losses)
