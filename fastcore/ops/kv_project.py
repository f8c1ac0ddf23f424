"""``fastcore.ops.kv_project`` and ``kv_distill_loss``: a teacher LLM's KV cache mapped onto
a student's shape in one fused pass: resample along time, project head_dim, mix GQA heads.

``out[b,s,t] = sum_h head_mix[s,h] * (sum_j R[t,j] kv[b,h,j]) @ P_h + bias[s]``

With a shared ``dim_proj`` the kernels mix the heads *before* projecting (mixing commutes
with a shared projection), cutting the projection's FLOPs by Ht/Hs. Every layer's K and V
go through one call: pass the groups (layers x K/V) as a list and ``head_mix`` /
``dim_proj`` / ``bias`` with a leading group dimension.

Backends: ``reference`` (the unfused three steps), ``cpu`` (C++), ``triton`` (the GPU path;
also under ``TRITON_INTERPRET=1``). Backward for ``kv`` (only when it requires grad),
``head_mix``, ``dim_proj``, ``bias`` and, for the loss, the student cache: deterministic
(per-chunk sums added in a fixed order, the kv gradient gathered over the transposed
resampling rows). Second-order gradients are not implemented and raise.

A batched :class:`fastcore.Resample` (per-example rows, ``ptr [B, Ts+1]``) resamples
example b of the folded batch with its own rows; the loss's ``mask [B, Ts]`` skips padded
student rows in every kernel (never read into the loss or any gradient), each group's
mean running over the valid rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from fastcore import _backend
from fastcore.ops._checks import FLOAT_DTYPES
from fastcore.ops.resample import Resample
from fastcore.reference import kv_project as reference

_backend.register_op("kv_project", ("reference", "cpu", "triton"), gpu_order=("triton",))
_backend.register_op("kv_distill_loss", ("reference", "cpu", "triton"), gpu_order=("triton",))

LOSSES = ("mse", "cosine")


# --- the Triton family: the same contract as the C++ schemas (csrc/fastcore.cpp).


@torch.library.custom_op("fastcore::kv_project_triton", mutates_args=())
def _kv_project_triton(
    kv: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: Optional[torch.Tensor],
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
) -> torch.Tensor:
    from fastcore.kernels import kv_project as kernels

    return kernels.kv_project_fwd(kv, head_mix, dim_proj, bias, ptr, idx, weight)


@torch.library.custom_op("fastcore::kv_distill_loss_triton", mutates_args=())
def _kv_distill_loss_triton(
    kv: list[torch.Tensor],
    student: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: Optional[torch.Tensor],
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
    loss: str,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from fastcore.kernels import kv_project as kernels

    return kernels.kv_distill_loss_fwd(
        kv, student, head_mix, dim_proj, bias, ptr, idx, weight, loss, mask
    )


@torch.library.custom_op("fastcore::kv_project_backward_triton", mutates_args=())
def _kv_project_backward_triton(
    grad_out: Optional[torch.Tensor],
    kv: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: Optional[torch.Tensor],
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
    student: list[torch.Tensor],
    loss_grad: Optional[torch.Tensor],
    loss: str,
    need_kv: bool,
    mask: Optional[torch.Tensor] = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    from fastcore.kernels import kv_project as kernels

    grad_kv, grad_mix, grad_proj, grad_bias, grad_student = kernels.kv_project_bwd(
        grad_out, kv, head_mix, dim_proj, bias, ptr, idx, weight, t_ptr, t_col, t_edge, need_kv,
        student=student if loss else None, loss_grad=loss_grad, loss=loss, mask=mask,
    )  # fmt: skip
    if grad_bias is None:
        grad_bias = grad_mix.new_empty(0)
    return list(grad_kv or []), grad_mix, grad_proj, grad_bias, list(grad_student or [])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _project_fake(kv, head_mix, dim_proj, bias, ptr, idx, weight, t_ptr, t_col, t_edge):
    b, _, _, _ = kv[0].shape
    # ptr [Ts+1] (shared rows) or [B, Ts+1] (per-example rows)
    return kv[0].new_empty((len(kv), b, head_mix.shape[1], ptr.shape[-1] - 1, dim_proj.shape[-1]))


def _loss_fake(kv, student, head_mix, *rest):
    return kv[0].new_empty((len(kv),), dtype=_acc(kv[0].dtype))


def _backward_fake(
    grad_out, kv, head_mix, dim_proj, bias, ptr, idx, weight, t_ptr, t_col, t_edge,
    student, loss_grad, loss, need_kv, mask=None,
):  # fmt: skip
    acc = _acc(kv[0].dtype)
    grad_kv = [torch.empty_like(t) for t in kv] if need_kv else []
    grad_bias = (
        bias.new_empty(bias.shape, dtype=acc)
        if bias is not None
        else head_mix.new_empty(0, dtype=acc)
    )
    grad_student = [torch.empty_like(s) for s in student] if loss else []
    return (
        grad_kv,
        head_mix.new_empty(head_mix.shape, dtype=acc),
        dim_proj.new_empty(dim_proj.shape, dtype=acc),
        grad_bias,
        grad_student,
    )


def _register_family(project: str, loss: str, backward: str) -> None:
    """Fake kernels and autograd for one backend's three operators."""
    project_op = getattr(torch.ops.fastcore, project).default
    loss_op = getattr(torch.ops.fastcore, loss).default
    backward_op = getattr(torch.ops.fastcore, backward).default
    torch.library.register_fake(project_op)(_project_fake)
    torch.library.register_fake(loss_op)(_loss_fake)
    torch.library.register_fake(backward_op)(_backward_fake)

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    def project_setup(ctx, inputs, output):
        kv, head_mix, dim_proj, bias, *structure = inputs
        ctx.groups = len(kv)
        ctx.has_bias = bias is not None
        ctx.structure_len = len(structure)
        ctx.save_for_backward(*kv, head_mix, dim_proj, bias, *structure)

    def project_backward(ctx, grad_out):
        saved = ctx.saved_tensors
        kv, (head_mix, dim_proj, bias, *structure) = list(saved[: ctx.groups]), saved[ctx.groups :]
        need_kv = any(ctx.needs_input_grad[0])
        grad_kv, g_mix, g_proj, g_bias, _ = backward_op(
            grad_out.contiguous(), kv, head_mix, dim_proj, bias, *structure, [], None, "", need_kv,
            None,
        )  # fmt: skip
        return (
            grad_kv if need_kv else [None] * ctx.groups,
            cast(g_mix, head_mix),
            cast(g_proj, dim_proj),
            cast(g_bias, bias) if ctx.has_bias else None,
            *([None] * ctx.structure_len),
        )

    def loss_setup(ctx, inputs, output):
        kv, student, head_mix, dim_proj, bias, *structure, name, mask = inputs
        ctx.groups = len(kv)
        ctx.has_bias = bias is not None
        ctx.loss = name
        ctx.save_for_backward(*kv, *student, head_mix, dim_proj, bias, mask, *structure)

    def loss_backward(ctx, loss_grad):
        saved = ctx.saved_tensors
        n = ctx.groups
        kv, student = list(saved[:n]), list(saved[n : 2 * n])
        head_mix, dim_proj, bias, mask, *structure = saved[2 * n :]
        need_kv = any(ctx.needs_input_grad[0])
        grad_kv, g_mix, g_proj, g_bias, g_student = backward_op(
            None, kv, head_mix, dim_proj, bias, *structure, student, loss_grad.contiguous(),
            ctx.loss, need_kv, mask,
        )  # fmt: skip
        grads = (
            grad_kv if need_kv else [None] * ctx.groups,
            g_student if any(ctx.needs_input_grad[1]) else [None] * ctx.groups,
            cast(g_mix, head_mix),
            cast(g_proj, dim_proj),
            cast(g_bias, bias) if ctx.has_bias else None,
        )
        # None for the structure, the loss name and the mask as passed (the dispatcher
        # leaves out a mask equal to its default, None).
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))

    def backward_setup(ctx, inputs, output):
        """The backward op saves nothing: its own backward only raises (below)."""

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            "fastcore.ops.kv_project / kv_distill_loss: second-order gradients are not "
            "implemented (the backward is a fused kernel without its own backward)"
        )

    torch.library.register_autograd(project_op, project_backward, setup_context=project_setup)
    torch.library.register_autograd(loss_op, loss_backward, setup_context=loss_setup)
    torch.library.register_autograd(backward_op, no_double_backward, setup_context=backward_setup)


_register_family("kv_project_triton", "kv_distill_loss_triton", "kv_project_backward_triton")
if _backend._C is not None:
    _register_family("kv_project", "kv_distill_loss", "kv_project_backward")


# --- argument handling shared by both public functions


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_float(t, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"{op}: {name} dtype {t.dtype} is not supported; expected one of {names}")


def _groups(kv, grouped: int | None, op: str) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """kv as a list of groups ``[B, Ht, Tt, Dt]`` and the leading dims folded into B.
    ``grouped``: the number of groups head_mix declares, or None (one ungrouped kv)."""
    if grouped is None:
        _check_float(kv, "kv", op)
        tensors = [kv]
    elif isinstance(kv, torch.Tensor):
        _check_float(kv, "kv", op)
        if kv.dim() < 4 or kv.shape[0] != grouped:
            raise ValueError(
                f"{op}: head_mix has {grouped} groups, so kv must be [G={grouped}, *lead, Ht, "
                f"Tt, Dt] or a list of {grouped} tensors; got a tensor of shape {tuple(kv.shape)}"
            )
        tensors = list(kv.unbind(0))
    elif isinstance(kv, Sequence):
        if len(kv) != grouped:
            raise ValueError(
                f"{op}: head_mix has {grouped} groups but kv is a list of {len(kv)} tensors"
            )
        tensors = list(kv)
    else:
        raise TypeError(f"{op}: kv must be a tensor or a list of tensors, got {type(kv).__name__}")
    if not tensors:
        raise ValueError(f"{op}: kv holds no groups")
    first = tensors[0]
    for i, t in enumerate(tensors):
        _check_float(t, f"kv[{i}]" if grouped is not None else "kv", op)
        if t.dim() < 3:
            raise ValueError(f"{op}: kv must be [*lead, Ht, Tt, Dt], got shape {tuple(t.shape)}")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{op}: every kv group must match the first ({tuple(first.shape)}, {first.dtype}, "
                f"{first.device}); group {i} is {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    lead = tuple(first.shape[:-3])
    batch = 1
    for size in lead:
        batch *= size
    folded = [t.reshape(batch, *t.shape[-3:]) for t in tensors]
    return folded, lead


def _parameters(head_mix, dim_proj, bias, kv0: torch.Tensor, grouped: bool, op: str):
    """head_mix ``[G, Hs, Ht]``, dim_proj ``[G, (Ht,) Dt, Ds]``, bias ``[G, Hs, Ds]``."""
    ht, dt = kv0.shape[1], kv0.shape[3]
    _check_float(head_mix, "head_mix", op)
    _check_float(dim_proj, "dim_proj", op)
    if bias is not None:
        _check_float(bias, "bias", op)
    if not grouped:
        head_mix, dim_proj = head_mix[None], dim_proj[None]
        bias = None if bias is None else bias[None]
    g, hs = head_mix.shape[0], head_mix.shape[1]
    if head_mix.shape[2] != ht:
        raise ValueError(
            f"{op}: kv has {ht} KV heads (dimension -3) but head_mix {tuple(head_mix.shape[-2:])} "
            f"mixes {head_mix.shape[2]} teacher heads into {hs}; for a GQA model the KV heads are "
            "config.num_key_value_heads, not num_attention_heads"
        )
    if dim_proj.dim() not in (3, 4) or dim_proj.shape[0] != g:
        raise ValueError(
            f"{op}: dim_proj must be [Dt, Ds] or [Ht, Dt, Ds] (with a leading group dimension "
            f"when head_mix has one), got {tuple(dim_proj.shape[1 - int(grouped) :])}"
        )
    if dim_proj.dim() == 4 and dim_proj.shape[1] != ht:
        raise ValueError(
            f"{op}: a per-head dim_proj must have one [Dt, Ds] matrix per teacher KV head "
            f"({ht}), got {dim_proj.shape[1]}"
        )
    if dim_proj.shape[-2] != dt:
        raise ValueError(
            f"{op}: kv has head_dim {dt} but dim_proj maps {dim_proj.shape[-2]} -> "
            f"{dim_proj.shape[-1]}; expected dim_proj [..., {dt}, Ds]"
        )
    ds = dim_proj.shape[-1]
    if bias is not None:
        _check_float(bias, "bias", op)
        if bias.dim() == 2 and bias.shape == (g, hs):
            bias = bias[:, :, None].expand(g, hs, ds)
        elif bias.shape != (g, hs, ds):
            want = f"[{hs}] or [{hs}, {ds}]" if not grouped else f"[{g}, {hs}] or [{g}, {hs}, {ds}]"
            raise ValueError(
                f"{op}: bias must be {want}, got {tuple(bias.shape[1 - int(grouped) :])}"
            )
    for name, t in (("head_mix", head_mix), ("dim_proj", dim_proj), ("bias", bias)):
        if t is not None and t.device != kv0.device:
            raise ValueError(f"{op}: {name} is on {t.device} but kv is on {kv0.device}")
    return head_mix, dim_proj, bias


def _structure(resample, steps: int, lead: tuple, device: torch.device, acc: torch.dtype, op: str):
    """The resampling rows (and their transpose) of ``resample``, or the identity: the
    structure arguments of the operators. Host metadata only, no device sync."""
    if resample is None:
        resample = Resample.identity(steps, device)
    elif not isinstance(resample, Resample):
        raise TypeError(
            f"{op}: resample must be a fastcore.Resample or None, got {type(resample).__name__}"
        )
    if resample.num_src != steps:
        raise ValueError(
            f"{op}: kv has {steps} time steps (dimension -2) but the Resample maps "
            f"{resample.num_src} source steps"
        )
    batch = resample.batch_size
    if batch is not None and batch != _numel(lead):
        raise ValueError(
            f"{op}: the batched Resample holds rows for {batch} examples but kv's leading "
            f"dimensions {lead} hold {_numel(lead)}; they must be equal (one row set per example)"
        )
    if resample.ptr.device != device:
        raise ValueError(
            f"{op}: the Resample is on {resample.ptr.device} but kv is on {device}; use resample.to(device)"
        )
    return (
        resample.ptr,
        resample.idx,
        resample.weight.to(acc),  # float64 in the Resample; the kernels' accumulation type
        resample.t_ptr,
        resample.t_col,
        resample.t_edge,
    )


def _numel(lead: tuple) -> int:
    n = 1
    for size in lead:
        n *= size
    return n


def _mask(mask, lead: tuple, steps: int, device: torch.device, op: str):
    """The loss's row mask ``[*lead, Ts]`` (bool or any real dtype, nonzero = valid) as a
    contiguous bool ``[B, Ts]``, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{op}: mask must be a tensor [*lead, Ts] (nonzero = a valid student position) or "
            f"None, got {type(mask).__name__}"
        )
    if mask.is_complex():
        raise TypeError(f"{op}: mask must be bool, integer or float, got {mask.dtype}")
    expected = (*lead, steps)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{op}: mask must be [*lead, Ts] = {expected} (the student cache's leading "
            f"dimensions and steps), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{op}: mask is on {mask.device} but teacher_kv on {device}")
    return (mask != 0).reshape(_numel(lead), steps).contiguous()


def _prepare(kv, head_mix, dim_proj, resample, bias, op: str):
    if not isinstance(head_mix, torch.Tensor) or head_mix.dim() not in (2, 3):
        raise ValueError(
            f"{op}: head_mix must be [Hs, Ht] or [G, Hs, Ht] (one per group), got {_shape(head_mix)}"
        )
    grouped = head_mix.dim() == 3
    groups, lead = _groups(kv, head_mix.shape[0] if grouped else None, op)
    head_mix, dim_proj, bias = _parameters(head_mix, dim_proj, bias, groups[0], grouped, op)
    kv0 = groups[0]
    structure = _structure(resample, kv0.shape[2], lead, kv0.device, _acc(kv0.dtype), op)
    return groups, lead, grouped, head_mix, dim_proj, bias, structure


def kv_project(
    kv: torch.Tensor | Sequence[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    resample=None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Map a teacher KV cache onto the student's shape in one fused pass:
    ``out[..., s, t, :] = sum_h head_mix[s, h] * (sum_j R[t, j] kv[..., h, j, :]) @ P_h + bias[s]``.

    Args:
        kv: ``[*lead, Ht, Tt, Dt]`` (one layer's K or V), or, with grouped parameters, G
            such tensors as a list or a ``[G, *lead, Ht, Tt, Dt]`` tensor (every layer's K
            and V in one call). Any float dtype; half types accumulate in float32.
        head_mix: ``[Hs, Ht]``, or ``[G, Hs, Ht]`` for G groups. Ht is the teacher's
            ``num_key_value_heads``.
        dim_proj: ``[Dt, Ds]`` (shared by the teacher heads) or ``[Ht, Dt, Ds]`` (one per
            teacher head), with a leading G when grouped.
        resample: a :class:`fastcore.Resample` over Tt teacher steps (``.linear``,
            ``.nearest``, ``.segments``, ``.from_offsets``), or None to keep the Tt steps.
            A batched Resample (``.stack``, ``.from_offsets`` of padded batches) needs
            ``batch_size`` equal to the product of kv's ``lead`` dims; example b is
            resampled with its own rows.
        bias: ``[Hs]`` or ``[Hs, Ds]`` (leading G when grouped), or None.

    Returns:
        ``[*lead, Hs, Ts, Ds]`` (``[G, *lead, Hs, Ts, Ds]`` grouped) in kv's dtype.
        Differentiable in every tensor argument (kv only computed when it requires grad).

    Raises:
        ValueError: shapes that do not fit (naming the values, e.g. head_mix built for
            ``num_attention_heads`` where kv has ``num_key_value_heads``), devices that
            differ, a Resample over another length; TypeError: non-float tensors.
    """
    op = "kv_project"
    groups, lead, grouped, head_mix, dim_proj, bias, structure = _prepare(
        kv, head_mix, dim_proj, resample, bias, op
    )
    backend = _backend.resolve(op, groups[0].device)
    if backend == "reference":
        out = reference.kv_project(groups, head_mix, dim_proj, bias, *structure[:3])
    elif backend == "triton":
        out = torch.ops.fastcore.kv_project_triton(groups, head_mix, dim_proj, bias, *structure)
    else:
        out = torch.ops.fastcore.kv_project(groups, head_mix, dim_proj, bias, *structure)
    out = out.reshape(out.shape[0], *lead, *out.shape[2:])
    return out if grouped else out[0]


def kv_distill_loss(
    teacher_kv: torch.Tensor | Sequence[torch.Tensor],
    student_kv: torch.Tensor | Sequence[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    resample=None,
    bias: Optional[torch.Tensor] = None,
    loss: str = "mse",
    reduction: str = "sum",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The distillation loss between the projected teacher cache and the student's, fused:
    the projected teacher cache is never materialised, forward or backward.

    Per group (layer x K/V): ``"mse"``, the mean squared error over every element, or
    ``"cosine"``, the mean over (batch, head, step) of ``1 - cos`` along Ds (norms clamped
    at 1e-8). ``reduction``: ``"sum"`` over groups (the usual sum over layers), ``"mean"``,
    or ``"none"`` (``[G]``).

    With ``mask``, only valid student positions count: mse is
    ``sum over valid (b, t) of sum_{s,d} (p - s)^2 / (n_valid * Hs * Ds)``, cosine
    ``sum over valid (b, s, t) of (1 - cos) / (n_valid * Hs)``; no valid position gives 0
    (and zero gradients). The kernels skip masked rows: values there (NaN and inf
    included, in the student cache or in teacher steps only masked rows read) reach
    neither the loss nor any gradient.

    Args:
        teacher_kv, head_mix, dim_proj, resample, bias: as :func:`kv_project` (a batched
            Resample included).
        student_kv: the student cache ``[*lead, Hs, Ts, Ds]`` per group (a list, or a
            ``[G, ...]`` tensor when grouped). Differentiable.
        mask: ``[*lead, Ts]`` (the student's attention mask, or
            ``Resample.valid_rows(teacher_mask) & student_mask``), bool or any integer or
            float dtype, nonzero = valid; None: every position counts.

    Returns:
        A float32 scalar (float64 for float64 inputs), or ``[G]`` with ``reduction="none"``.
    """
    op = "kv_distill_loss"
    if loss not in LOSSES:
        raise ValueError(f"{op}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"{op}: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    groups, lead, grouped, head_mix, dim_proj, bias, structure = _prepare(
        teacher_kv, head_mix, dim_proj, resample, bias, op
    )
    if grouped:
        students = (
            list(student_kv.unbind(0)) if isinstance(student_kv, torch.Tensor) else list(student_kv)
        )
    else:
        students = [student_kv]
    kv0 = groups[0]
    steps = structure[0].shape[-1] - 1
    expected = (*lead, head_mix.shape[1], steps, dim_proj.shape[-1])
    if len(students) != len(groups):
        raise ValueError(f"{op}: {len(groups)} teacher groups but {len(students)} student groups")
    for i, s in enumerate(students):
        _check_float(s, "student_kv", op)
        if tuple(s.shape) != expected:
            raise ValueError(
                f"{op}: student group {i} has shape {tuple(s.shape)}; the projected teacher "
                f"is [*lead, Hs, Ts, Ds] = {expected}"
            )
        if s.device != kv0.device:
            raise ValueError(f"{op}: student_kv is on {s.device} but teacher_kv on {kv0.device}")
    rows = _mask(mask, lead, steps, kv0.device, op)
    students = [s.to(kv0.dtype).reshape(kv0.shape[0], *expected[-3:]) for s in students]
    backend = _backend.resolve(op, kv0.device)
    if backend == "reference":
        per_group = reference.kv_distill_loss(
            groups, students, head_mix, dim_proj, bias, *structure[:3], loss, rows
        )
    elif backend == "triton":
        per_group = torch.ops.fastcore.kv_distill_loss_triton(
            groups, students, head_mix, dim_proj, bias, *structure, loss, rows
        )
    else:
        per_group = torch.ops.fastcore.kv_distill_loss(
            groups, students, head_mix, dim_proj, bias, *structure, loss, rows
        )
    if reduction == "none":
        return per_group
    return per_group.sum() if reduction == "sum" else per_group.mean()


def distill_group_loss(
    projected: torch.Tensor,
    student: torch.Tensor,
    loss: str,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One group's :func:`kv_distill_loss` term for an already materialised projection
    ``projected [..., Hs, Ts, Ds]`` and a student cache of the same shape: plain PyTorch
    (autograd through both), for callers that build the projection themselves (e.g. a
    weighted sum of several teachers' projections). Float32, float64 for float64 inputs;
    an empty cache gives 0. ``loss``: ``"mse"`` (mean over elements) or ``"cosine"`` (mean
    over rows of ``1 - cos`` along Ds, each norm clamped below at 1e-8). ``mask``
    ``[..., Ts]`` (nonzero = valid): the mean over the valid rows only, as
    :func:`kv_distill_loss` (masked rows are selected away, never multiplied)."""
    if loss not in LOSSES:
        raise ValueError(f"kv_distill_loss: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    acc = torch.float64 if torch.float64 in (projected.dtype, student.dtype) else torch.float32
    p, s = projected.to(acc), student.to(acc)
    if mask is not None:
        lead = tuple(p.shape[:-3])
        rows = _mask(mask, lead, p.shape[-2], p.device, "distill_group_loss")
        shape = (_numel(lead), *p.shape[-3:])
        return reference.distill_group_loss(p.reshape(shape), s.reshape(shape), loss, rows)
    if p.numel() == 0:
        return (p.sum() + s.sum()) * 0  # 0, still connected to both graphs
    if loss == "mse":
        return (p - s).square().mean()
    eps = 1e-8
    norms = p.norm(dim=-1).clamp_min(eps) * s.norm(dim=-1).clamp_min(eps)
    return (1 - (p * s).sum(-1) / norms).mean()
