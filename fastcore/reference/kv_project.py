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
  ``k in [ptr[t], ptr[t+1])``; an empty row gives zeros.
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


def kv_project_group(
    kv: torch.Tensor,
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor | None,
    idx: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """One group, the three unfused steps: ``kv [B, Ht, Tt, Dt]`` -> ``[B, Hs, Ts, Ds]``
    (``head_mix [Hs, Ht]``, ``dim_proj [Dt, Ds]`` or ``[Ht, Dt, Ds]``, ``bias [Hs, Ds]``
    or None; ``ptr`` None: no resampling). Computed in kv's dtype, half types in float32."""
    acc = _acc_dtype(kv.dtype)
    x = kv.to(acc)
    if ptr is not None:
        x = resample_rows(x, ptr, idx, weight, dim=2)  # 1. time:   [B, Ht, Ts, Dt]
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


def distill_group_loss(projected: torch.Tensor, student: torch.Tensor, loss: str) -> torch.Tensor:
    """One group's loss between the projected teacher ``[B, Hs, Ts, Ds]`` and the student
    cache of the same shape, in float32 (float64 for float64 inputs):

    * ``"mse"``: the mean over every element of ``(projected - student)^2``;
    * ``"cosine"``: the mean over every (b, s, t) of ``1 - cos(projected, student)`` along
      Ds, each norm clamped below at 1e-8 (as ``F.cosine_similarity``'s eps).

    An empty cache gives 0."""
    acc = torch.float64 if torch.float64 in (projected.dtype, student.dtype) else torch.float32
    p, s = projected.to(acc), student.to(acc)
    if p.numel() == 0:
        return (p.sum() + s.sum()) * 0  # 0, still connected to both graphs
    if loss == "mse":
        return (p - s).square().mean()
    if loss == "cosine":
        eps = 1e-8
        dot = (p * s).sum(-1)
        norms = p.norm(dim=-1).clamp_min(eps) * s.norm(dim=-1).clamp_min(eps)
        return (1 - dot / norms).mean()
    raise ValueError(f"kv_distill_loss: loss must be 'mse' or 'cosine', got {loss!r}")


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
) -> torch.Tensor:
    """Per-group losses ``[G]`` between the projected teacher groups and ``student`` (a list
    of G tensors ``[B, Hs, Ts, Ds]``): the unfused path, which materialises every projected
    group."""
    losses = [
        distill_group_loss(
            kv_project_group(
                kv[g], head_mix[g], dim_proj[g], None if bias is None else bias[g], ptr, idx, weight
            ),
            student[g],
            loss,
        )
        for g in range(len(kv))
    ]
    if not losses:
        return torch.zeros(0, dtype=torch.float32, device=head_mix.device)
    return torch.stack(losses)
