"""Safe resampling along time: linear index builders and a clamped gather.

Teacher and student sequences rarely have the same length. The original alignment code
indexed past the end ("index 81 is out of bounds for dimension 2 with size 80") and broke
on T = 0 and T = 1. These keep indices as int64 on the data's device, inside ``[0, T)``,
and treat empty sequences as valid.

:class:`Resample` (public as ``fastcore.Resample``) is a linear map between sequence
lengths (teacher -> student time) as CSR rows over the source steps, validated once and
applied by the spmm kernels; :func:`fastcore.ops.kv_project` takes one. A *batched*
Resample holds one set of rows per example of a padded batch (:meth:`Resample.stack`,
:meth:`Resample.from_offsets` with ``[B, T, 2]`` offsets), for tokenizer-aware alignment
of batches whose examples have different lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastcore.ops._checks import FLOAT_DTYPES, check_dtype, normalize_dim
from fastcore.ops._csr import index_csr, inverse_permutation
from fastcore.ops.gather import gather
from fastcore.ops.graph import copy_sharing_tensors, load_structure
from fastcore.ops.spmm import apply_csr

__all__ = ["Resample", "build_safe_linear_indices", "safe_time_resample"]


def _check_length(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def build_safe_linear_indices(
    t_src: int,
    t_dst: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx0, idx1, frac)``, each ``[t_dst]``: output step i is
    ``(1 - frac[i]) * x[idx0[i]] + frac[i] * x[idx1[i]]``, equal to
    ``F.interpolate(mode="linear", align_corners=True)`` (the same float32 arithmetic).

    ``idx0``/``idx1`` are int64 in ``[0, t_src)``, ``frac`` of ``dtype`` (float32 by
    default; positions are computed in it), all on ``device``.
    ``t_src = 1`` repeats the single step; ``t_dst = 0`` gives empty tensors.

    Raises:
        ValueError: ``t_src < 1`` (nothing to interpolate from) or ``t_dst < 0``.
    """
    _check_length(t_src, "build_safe_linear_indices: t_src", 1)
    _check_length(t_dst, "build_safe_linear_indices: t_dst", 0)
    if not dtype.is_floating_point:
        raise TypeError(f"build_safe_linear_indices: dtype must be a float dtype, got {dtype}")
    steps = torch.arange(t_dst, device=device, dtype=dtype)
    if t_dst > 1:
        scale = torch.tensor(t_src - 1, dtype=dtype) / (t_dst - 1)
        position = steps * scale.to(steps.device)
    else:
        position = torch.zeros_like(steps)
    idx0 = position.floor().long().clamp_(0, t_src - 1)
    idx1 = (idx0 + 1).clamp_(max=t_src - 1)
    frac = position - idx0.to(dtype)
    return idx0, idx1, frac


def _check_steps(index: torch.Tensor) -> None:
    if bool(index.isnan().any()):
        raise ValueError("safe_time_resample: indices contain NaN; expected real step numbers")


@torch.library.custom_op("fastcore::checked_steps", mutates_args=())
def _checked_steps(index: torch.Tensor) -> torch.Tensor:
    """_check_steps inside a compiled graph (same error as eager)."""
    _check_steps(index)
    return index.clone()


@_checked_steps.register_fake
def _checked_steps_fake(index):
    return torch.empty_like(index)


def safe_time_resample(
    x: torch.Tensor, indices: torch.Tensor | Sequence[int], dim: int = 2
) -> torch.Tensor:
    """Gather steps of ``x`` along ``dim`` (time) at ``indices``, made safe: the indices are
    cast to int64 on x's device (float indices truncate toward zero) and **clamped** to
    ``[0, T-1]``; ``T == 0`` gives zeros with ``len(indices)`` steps. Differentiable in x
    (the gradient is a deterministic scatter-sum).

    Args:
        x: ``[*lead, T, *trail]`` with T at ``dim`` (``[B, H, T, D]`` KV caches by default);
            a float dtype.
        indices: 1-D ``[M]``: a tensor of any real dtype on any device, or a list of ints.
        dim: the time dimension.

    Returns:
        ``[*lead, M, *trail]``.
    """
    check_dtype(x, FLOAT_DTYPES, "safe_time_resample")
    dim = normalize_dim(dim, x.dim(), "safe_time_resample")
    try:
        index = torch.as_tensor(indices)
    except (RuntimeError, OverflowError):  # a Python int beyond int64: clamped like any other
        index = torch.as_tensor(indices, dtype=torch.float64)
    if index.dim() != 1:
        raise ValueError(f"safe_time_resample: indices must be 1-D, got shape {tuple(index.shape)}")
    if index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"safe_time_resample: indices must be real numbers, got {index.dtype}")
    index = index.to(device=x.device)
    steps = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = index.numel()
    if steps == 0:
        return x.new_zeros(shape) + x.sum() * 0  # zeros, still connected to x's graph
    if index.is_floating_point():
        # Clamped as floats, then truncated: +inf, 1e30 and values past int64 go to the
        # last step, -inf to the first. NaN names no step.
        if torch.compiler.is_compiling():
            index = torch.ops.fastcore.checked_steps(index)
        else:
            _check_steps(index)
        index = index.clamp(0, steps - 1)
    return gather(x, index.long().clamp(0, steps - 1), dim, check=False)


class Resample(nn.Module):
    """A linear map from ``num_src`` teacher steps to ``num_dst`` student steps as CSR rows:
    student step s is ``sum_k weight[k] * x[idx[k]]`` for ``k in [ptr[s], ptr[s+1])``; an
    empty row gives zeros. Weights are used as given. Validated once; :meth:`apply` runs
    the ``fastcore::spmm`` kernels (deterministic, differentiable in x).

    Build one with :meth:`linear`, :meth:`nearest`, :meth:`segments` or
    :meth:`from_offsets`.

    **Batched** (per-example) rows, for padded batches whose examples align differently
    (:meth:`stack`, :meth:`from_offsets` with ``[B, T, 2]`` offsets, or ``ptr [B, Ts+1]``):
    example b's student step s is ``sum_k weight[k] * x[b, idx[k]]`` for
    ``k in [ptr[b, s], ptr[b, s+1])``. ``ptr``'s values index one concatenated
    ``idx``/``weight`` (example b's entries are ``[ptr[b, 0], ptr[b, -1])`` and
    ``ptr[b+1, 0] == ptr[b, -1]``), ``idx`` holds each example's own source steps in
    ``[0, num_src)``. ``batch_size`` is B (None for shared rows), ``resample[b]`` example b
    as a shared Resample. ``num_src`` / ``num_dst`` are the padded lengths.

    Like :class:`fastcore.Graph`, a Resample is a ``torch.nn.Module`` whose tensors are
    buffers: held by a module it moves with it (``.to``, ``.cuda``; ``.double()`` /
    ``.half()`` cast ``weight``, float64 when built, while the int64 indices keep their
    dtype) and is saved in its ``state_dict`` (``ptr``, ``idx``, ``weight`` and
    ``src_count``, num_src as a 0-d int64 tensor; the transpose is a non-persistent buffer,
    rebuilt on load). A Resample of another size in a checkpoint is an error naming the
    key. ``resample.to(...)`` returns a moved copy and leaves ``resample`` as it is.
    """

    def __init__(
        self,
        ptr: torch.Tensor,
        idx: torch.Tensor,
        weight: torch.Tensor,
        num_src: int,
    ) -> None:
        super().__init__()
        _check_length(num_src, "Resample: num_src", 0)
        ptr, idx = torch.as_tensor(ptr), torch.as_tensor(idx)
        weight = torch.as_tensor(weight)
        for name, t in (("ptr", ptr), ("idx", idx)):
            batched_ptr = name == "ptr" and t.dim() == 2
            if (t.dim() != 1 and not batched_ptr) or t.dtype not in (torch.int32, torch.int64):
                hint = " ([B, Ts+1] for per-example rows)" if name == "ptr" else ""
                raise ValueError(
                    f"Resample: {name} must be 1-D int32/int64, got {t.dtype} "
                    f"{tuple(t.shape)}{hint}"
                )
        if weight.dim() != 1 or weight.shape[0] != idx.shape[0] or not weight.is_floating_point():
            raise ValueError(
                f"Resample: weight must be a 1-D float tensor with one entry per idx ({idx.shape[0]}), "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )
        device = ptr.device
        # Weights kept in float64 (exact for any float input); apply casts to x's dtype.
        ptr, idx, weight = ptr.long(), idx.to(device).long(), weight.to(device, torch.float64)
        _check_rows(ptr, idx, num_src, "Resample")
        self._set_rows(num_src, ptr, idx, weight)

    def _set_rows(
        self, num_src: int, ptr: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor
    ) -> None:
        """Install validated rows and build their transpose (entries grouped by source
        step), which the backward runs, and the permutations between the two orders
        (t_edge[j]: the row entry of transposed entry j; t_pos: its inverse).

        Batched rows (``ptr [B, Ts+1]``): ``t_ptr [B, Tt+1]`` (global positions, example b's
        transposed entries grouped by its source steps), ``t_col`` the local destination
        rows, ``t_edge`` global entry ids."""
        if ptr.dim() == 1:
            by_source, t_ptr = index_csr(idx, num_src)
            dst = torch.repeat_interleave(
                torch.arange(ptr.numel() - 1, device=ptr.device),
                ptr.diff(),
                output_size=idx.numel(),
            )
        else:
            batch, rows = ptr.shape[0], ptr.shape[1] - 1
            example = _entry_examples(ptr, idx.numel())
            flat_rows = torch.repeat_interleave(
                torch.arange(batch * rows, device=ptr.device),
                ptr.diff(dim=1).reshape(-1),
                output_size=idx.numel(),
            )
            dst = flat_rows - example * rows
            by_source, flat_t_ptr = index_csr(example * num_src + idx, batch * num_src)
            t_ptr = flat_t_ptr[_batched_positions(batch, num_src, ptr.device)]
        self._set(
            num_src,
            ptr,
            idx,
            weight,
            t_ptr,
            dst[by_source],
            by_source,
            inverse_permutation(by_source),
        )

    def _set(self, num_src: int, ptr, idx, weight, t_ptr, t_col, t_edge, t_pos) -> None:
        self.num_src = num_src
        self.register_buffer("ptr", ptr)
        self.register_buffer("idx", idx)
        self.register_buffer("weight", weight)
        self.register_buffer(
            "src_count", torch.tensor(num_src, dtype=torch.int64, device=ptr.device)
        )
        for name, t in (("t_ptr", t_ptr), ("t_col", t_col), ("t_edge", t_edge), ("t_pos", t_pos)):
            self.register_buffer(name, t, persistent=False)

    @classmethod
    def _from_parts(cls, num_src: int, ptr, idx, weight, t_ptr, t_col, t_edge, t_pos) -> Resample:
        """A Resample from rows and transpose that are valid by construction (no checks)."""
        out = cls.__new__(cls)
        super(Resample, out).__init__()  # (this spelling traces under torch.compile)
        out._set(num_src, ptr, idx, weight, t_ptr, t_col, t_edge, t_pos)
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        loaded = load_structure(
            self,
            state_dict,
            prefix,
            local_metadata,
            ("ptr", "idx", "weight", "src_count"),
            {"src_count": self.num_src},
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
        if loaded is None:
            return
        try:
            _check_rows(loaded["ptr"], loaded["idx"], self.num_src, "Resample")
        except (ValueError, IndexError) as err:
            error_msgs.append(f"{prefix}ptr/idx: {err}")
            return
        if torch.equal(loaded["ptr"], self.ptr) and torch.equal(loaded["idx"], self.idx):
            self.weight = loaded["weight"]
        else:
            self._set_rows(self.num_src, loaded["ptr"], loaded["idx"], loaded["weight"])

    @property
    def num_dst(self) -> int:
        """Student steps (rows; for a batched Resample, the padded length)."""
        return self._buffers["ptr"].shape[-1] - 1

    @property
    def batch_size(self) -> int | None:
        """B of a batched (per-example) Resample; None for rows shared by a whole batch."""
        ptr = self._buffers["ptr"]
        return None if ptr.dim() == 1 else ptr.shape[0]

    def __getitem__(self, b: int) -> Resample:
        """Example ``b`` of a batched Resample as a shared one (``num_src`` / ``num_dst``
        the padded lengths: its padded rows are empty). Reads two row pointers on the host."""
        batch = self.batch_size
        if batch is None:
            raise TypeError(
                "Resample: indexing needs a batched Resample (Resample.stack / from_offsets "
                "with [B, T, 2] offsets); this one's rows are shared by the whole batch"
            )
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"Resample: an example index must be an int, got {type(b).__name__}")
        if not -batch <= b < batch:
            raise IndexError(f"Resample: example {b} is out of range for a batch of {batch}")
        b %= batch
        buf = self._buffers
        ptr, t_ptr = buf["ptr"][b], buf["t_ptr"][b]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return Resample._from_parts(
            self.num_src,
            (ptr - lo).clone(),
            buf["idx"][lo:hi].clone(),
            buf["weight"][lo:hi].clone(),
            (t_ptr - lo).clone(),
            buf["t_col"][lo:hi].clone(),
            buf["t_edge"][lo:hi] - lo,
            buf["t_pos"][lo:hi] - lo,
        )

    def valid_rows(self, teacher_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Which student steps are real: bool ``[Ts]`` (shared rows) or ``[B, Ts]``
        (batched). A row is valid when it reads at least one source step and, with a
        ``teacher_mask [B, Tt]`` (nonzero = a real teacher token; the result is then
        ``[B, Ts]`` also for shared rows), only source steps the mask marks valid. Use it
        (and the student's attention mask) as ``kv_distill_loss``'s ``mask``. Tensor ops
        only, no host synchronisation."""
        buf = self._buffers
        ptr, idx = buf["ptr"], buf["idx"]
        nonempty = ptr[..., 1:] > ptr[..., :-1]
        if teacher_mask is None:
            return nonempty
        batch = self.batch_size
        what = "Resample.valid_rows"
        if not isinstance(teacher_mask, torch.Tensor):
            raise TypeError(
                f"{what}: teacher_mask must be a tensor, got {type(teacher_mask).__name__}"
            )
        if teacher_mask.is_complex():
            raise TypeError(f"{what}: teacher_mask must be bool or real, got {teacher_mask.dtype}")
        want = f"[{'B' if batch is None else batch}, {self.num_src}]"
        if (
            teacher_mask.dim() != 2
            or teacher_mask.shape[1] != self.num_src
            or (batch is not None and teacher_mask.shape[0] != batch)
        ):
            raise ValueError(
                f"{what}: teacher_mask must be {want} (batch, teacher steps), got "
                f"{tuple(teacher_mask.shape)}"
            )
        if teacher_mask.device != ptr.device:
            raise ValueError(
                f"{what}: teacher_mask is on {teacher_mask.device} but the Resample on {ptr.device}"
            )
        invalid = teacher_mask == 0
        if batch is None:
            bad = invalid[:, idx].long()  # [B, E]
            cum = torch.cat([bad.new_zeros(bad.shape[0], 1), bad.cumsum(1)], 1)
            bad_rows = cum[:, ptr[1:]] - cum[:, ptr[:-1]]
            return nonempty[None] & (bad_rows == 0)
        bad = invalid[_entry_examples(ptr, idx.numel()), idx].long()  # [E]
        cum = torch.cat([bad.new_zeros(1), bad.cumsum(0)])
        return nonempty & (cum[ptr[:, 1:]] == cum[ptr[:, :-1]])

    @classmethod
    def linear(cls, t_src: int, t_dst: int, device: torch.device | str | None = None) -> Resample:
        """``F.interpolate(mode="linear", align_corners=True)`` from t_src to t_dst steps
        (t_src = 0: every row empty, so zeros)."""
        _check_length(t_src, "Resample.linear: t_src", 0)
        _check_length(t_dst, "Resample.linear: t_dst", 0)
        if t_src == 0:
            return cls.segments(torch.zeros(t_dst + 1, dtype=torch.long, device=device), [], [], 0)
        idx0, idx1, frac = build_safe_linear_indices(t_src, t_dst, device, dtype=torch.float64)
        idx = torch.stack([idx0, idx1], 1).flatten()
        weight = torch.stack([1 - frac, frac], 1).flatten()
        ptr = torch.arange(0, 2 * t_dst + 1, 2, device=idx.device)
        return cls(ptr, idx, weight, t_src)

    @classmethod
    def identity(cls, steps: int, device: torch.device | str | None = None) -> Resample:
        """Every step maps to itself (``steps`` rows of one entry, weight 1). In eager mode
        the result is cached per length and device and may be shared: move it with
        ``.to()`` (a copy), not in place."""
        _check_length(steps, "Resample.identity: steps", 0)
        device = torch.device("cpu") if device is None else torch.device(device)
        return _identity(steps, device)

    @classmethod
    def nearest(cls, t_src: int, t_dst: int, device: torch.device | str | None = None) -> Resample:
        """``F.interpolate(mode="nearest-exact")``: step s takes source
        ``min(floor((s + 0.5) * t_src / t_dst), t_src - 1)`` (t_src = 0: zeros)."""
        _check_length(t_src, "Resample.nearest: t_src", 0)
        _check_length(t_dst, "Resample.nearest: t_dst", 0)
        if t_src == 0:
            return cls.segments(torch.zeros(t_dst + 1, dtype=torch.long, device=device), [], [], 0)
        # floor((s + 0.5) * t_src / t_dst) in exact integer arithmetic (float positions
        # round exact ties down).
        steps = torch.arange(t_dst, dtype=torch.long)
        idx = ((2 * steps + 1) * t_src).div(2 * t_dst, rounding_mode="floor")
        idx = idx.clamp_(max=t_src - 1).to(device)
        ptr = torch.arange(t_dst + 1, device=device)
        return cls(ptr, idx, torch.ones(t_dst, device=device), t_src)

    @classmethod
    def segments(cls, ptr, idx, weight, t_src: int) -> Resample:
        """General rows: student step s is ``sum weight[k] * x[idx[k]]`` over
        ``k in [ptr[s], ptr[s+1])`` (``ptr [Ts+1]``, ``idx`` and ``weight [E]``)."""
        ptr = torch.as_tensor(ptr)
        idx = torch.as_tensor(idx, device=ptr.device)
        if idx.numel() == 0 and idx.is_floating_point():  # an empty list
            idx = idx.long()
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(
                f"Resample.segments: idx must hold integer source steps, got {idx.dtype}"
            )
        weight = torch.as_tensor(weight, device=ptr.device)
        if weight.is_complex():
            raise TypeError(f"Resample.segments: weight must be real, got {weight.dtype}")
        if not weight.is_floating_point():
            weight = weight.double()
        return cls(ptr, idx.long(), weight, t_src)

    @classmethod
    def stack(
        cls,
        resamples: Sequence[Resample],
        num_src: int | None = None,
        num_dst: int | None = None,
    ) -> Resample:
        """B shared Resamples (one per example; lengths may differ) as one batched
        Resample with ``batch_size == B``: ``num_src`` is the padded teacher length,
        ``num_dst`` the padded student length (each defaults to the longest example's).
        A shorter example's extra rows are empty (zeros); its source steps keep their
        numbers (a padded teacher step is never read).

        Raises:
            ValueError: no Resamples, a batched one, Resamples on different devices, or a
                ``num_src`` / ``num_dst`` shorter than an example's (naming it).
            TypeError: something that is not a Resample.
        """
        what = "Resample.stack"
        resamples = list(resamples)
        if not resamples:
            raise ValueError(f"{what}: needs at least one Resample (one per example)")
        for i, r in enumerate(resamples):
            if not isinstance(r, Resample):
                raise TypeError(f"{what}: example {i} is a {type(r).__name__}, not a Resample")
            if r.batch_size is not None:
                raise ValueError(
                    f"{what}: example {i} is already batched (batch_size {r.batch_size}); "
                    "stack single-example Resamples"
                )
        device = resamples[0].ptr.device
        for i, r in enumerate(resamples):
            if r.ptr.device != device:
                raise ValueError(
                    f"{what}: example {i} is on {r.ptr.device} but example 0 on {device}"
                )
        sizes = {}
        for name, given, attr in (("num_src", num_src, "num_src"), ("num_dst", num_dst, "num_dst")):
            longest = max(getattr(r, attr) for r in resamples)
            if given is None:
                given = longest
            _check_length(given, f"{what}: {name}", 0)
            for i, r in enumerate(resamples):
                if getattr(r, attr) > given:
                    raise ValueError(
                        f"{what}: example {i} has {name} = {getattr(r, attr)}, more than the "
                        f"padded {name} = {given}"
                    )
            sizes[name] = given
        ptrs, offset = [], 0
        for r in resamples:
            ptr = r.ptr.long()
            pad = ptr[-1:].expand(sizes["num_dst"] - r.num_dst)
            ptrs.append(torch.cat([ptr, pad]) + offset)
            offset += r.idx.numel()
        idx = torch.cat([r.idx.long() for r in resamples])
        weight = torch.cat([r.weight.to(torch.float64) for r in resamples])
        return cls(torch.stack(ptrs), idx, weight, sizes["num_src"])

    @classmethod
    def from_offsets(
        cls,
        teacher_offsets,
        student_offsets,
        teacher_mask=None,
        student_mask=None,
    ) -> Resample:
        """Tokenizer-aware alignment: student token s averages the teacher tokens whose
        character spans overlap its own (``offsets [T, 2]`` of ``(start, end)``, end
        exclusive, as tokenizers' ``offset_mapping`` gives). A student token that overlaps
        no teacher token (an empty span, a special token) gets an empty row: zeros.

        Padded batches: ``teacher_offsets [B, Tt, 2]`` and ``student_offsets [B, Ts, 2]``
        give a batched Resample (``batch_size`` B, rows per example, indexed by padded
        position). ``teacher_mask [B, Tt]`` / ``student_mask [B, Ts]`` (attention masks,
        nonzero = a real token; ``[T]`` for one example) leave masked positions out: a
        masked student position gets an empty row, a masked teacher position is never
        read. Without masks every position counts (HF pads' ``(0, 0)`` offsets are empty
        spans, so they give empty rows and are never read anyway). Example b equals the
        single-example map of its valid positions, placed at their padded positions.

        Raises:
            ValueError: offsets not ``[T, 2]`` / ``[B, T, 2]``, a 2-D and a 3-D one mixed,
                different batch sizes, a mask of the wrong shape.
            TypeError: non-integer offsets, a complex mask.
        """
        teacher = _offsets(teacher_offsets, "teacher_offsets")
        student = _offsets(student_offsets, "student_offsets")
        if teacher.dim() != student.dim():
            raise ValueError(
                "Resample.from_offsets: teacher_offsets and student_offsets must both be one "
                "example's [T, 2] or both a padded batch's [B, T, 2] (a batch's must be "
                f"resampled per example), got shape {tuple(teacher.shape)} for teacher_offsets "
                f"and {tuple(student.shape)} for student_offsets"
            )
        if teacher.dim() == 3 and teacher.shape[0] != student.shape[0]:
            raise ValueError(
                f"Resample.from_offsets: teacher_offsets hold {teacher.shape[0]} examples but "
                f"student_offsets {student.shape[0]}"
            )
        student = student.to(teacher.device)
        t_mask = _offset_mask(teacher_mask, teacher, "teacher_mask", "teacher_offsets")
        s_mask = _offset_mask(student_mask, student, "student_mask", "student_offsets")
        if teacher.dim() == 2:
            ptr, cols, weight = _overlap_rows(teacher, student, t_mask, s_mask)
            return cls(ptr, cols, weight, teacher.shape[0])
        ptrs, all_cols, weights, offset = [], [], [], 0
        for b in range(teacher.shape[0]):
            ptr, cols, weight = _overlap_rows(
                teacher[b],
                student[b],
                None if t_mask is None else t_mask[b],
                None if s_mask is None else s_mask[b],
            )
            ptrs.append(ptr + offset)
            offset += cols.numel()
            all_cols.append(cols)
            weights.append(weight)
        if not ptrs:  # an empty batch
            ptr = torch.zeros(0, student.shape[1] + 1, dtype=torch.long, device=teacher.device)
            return cls(ptr, teacher.new_zeros(0), torch.zeros(0), teacher.shape[1])
        return cls(torch.stack(ptrs), torch.cat(all_cols), torch.cat(weights), teacher.shape[1])

    def to(self, *args: Any, **kwargs: Any) -> Resample:
        """A copy with every tensor moved or cast as ``nn.Module.to`` would (``weight``
        takes a float dtype, the indices stay int64; no re-validation). This Resample is
        left as it is; a module holding it moves it in place with its own ``.to()``."""
        return nn.Module.to(copy_sharing_tensors(self), *args, **kwargs)

    def apply(self, x: Any, dim: int = 2) -> Any:
        """``x [*lead, num_src, *trail]`` (time at ``dim``) -> ``[*lead, num_dst, *trail]``.

        (Called with a function instead of a tensor, this is ``nn.Module.apply(fn)``, so that
        ``model.apply(init_fn)`` on a module holding a Resample still works.)"""
        if not isinstance(x, torch.Tensor) and callable(x):
            return nn.Module.apply(self, x)
        check_dtype(x, FLOAT_DTYPES, "Resample.apply")
        dim = normalize_dim(dim, x.dim(), "Resample.apply")
        if x.shape[dim] != self.num_src:
            raise ValueError(
                f"Resample.apply: x has {x.shape[dim]} steps along dimension {dim}, but this "
                f"Resample maps {self.num_src} source steps"
            )
        b = self._buffers  # read directly: nn.Module's attribute lookup is slow
        if x.device != b["ptr"].device:
            raise ValueError(
                f"Resample.apply: x is on {x.device} but the Resample on {b['ptr'].device}; "
                "use resample.to(device), or hold it in the module so that module.to() moves it"
            )
        batch = self.batch_size
        if batch is None:
            return apply_csr(x, b["weight"].to(x.dtype), self.csr(), dim)
        if dim == 0 or x.shape[0] != batch:
            raise ValueError(
                f"Resample.apply: this Resample holds rows for {batch} examples, so x's "
                f"dimension 0 must be the batch ({batch}) and time another dimension; got "
                f"shape {tuple(x.shape)} with time at dimension {dim}"
            )
        # Example b's rows over rows b * Ts + s of a block-diagonal structure that reads
        # step b * Tt + j of x with its time moved next to the batch.
        moved = x.movedim(dim, 1)
        rest = moved.shape[2:]
        flat = moved.reshape(batch * self.num_src, *rest)
        if not rest:
            flat = flat.unsqueeze(-1)
        out = apply_csr(flat, b["weight"].to(x.dtype), self._flat_csr(), 0)
        return out.reshape(batch, self.num_dst, *rest).movedim(1, dim)

    def _flat_csr(self) -> tuple[torch.Tensor, ...]:
        """A batched Resample's rows as one block-diagonal structure over flattened
        ``(b, t)``: ``(ptr [B*Ts+1], idx [E] in [0, B*Tt), t_ptr [B*Tt+1], t_col, t_edge,
        t_pos)`` (tensor ops, no host synchronisation)."""
        b = self._buffers
        ptr, idx, t_ptr = b["ptr"], b["idx"], b["t_ptr"]
        example = _entry_examples(ptr, idx.numel())
        end = ptr.new_zeros(1) if ptr.shape[0] == 0 else ptr[-1, -1:]
        flat_ptr = torch.cat([ptr[:, :-1].reshape(-1), end])
        flat_t_ptr = torch.cat([t_ptr[:, :-1].reshape(-1), end])
        return (
            flat_ptr,
            idx + example * self.num_src,
            flat_t_ptr,
            b["t_col"] + example[b["t_edge"]] * self.num_dst,
            b["t_edge"],
            b["t_pos"],
        )

    def csr(self) -> tuple[torch.Tensor, ...]:
        """``(ptr, idx, t_ptr, t_col, t_edge, t_pos)``: the structure arguments of
        ``fastcore::spmm`` (rows over the source steps, their transpose, the permutations).
        Batched: ``ptr [B, Ts+1]`` and ``t_ptr [B, Tt+1]`` (see the class docstring)."""
        b = self._buffers
        return b["ptr"], b["idx"], b["t_ptr"], b["t_col"], b["t_edge"], b["t_pos"]

    def __repr__(self) -> str:
        batch = "" if self.batch_size is None else f"batch_size={self.batch_size}, "
        return (
            f"Resample({batch}num_src={self.num_src}, num_dst={self.num_dst}, "
            f"entries={self.idx.numel()})"
        )


def _check_rows(ptr: torch.Tensor, idx: torch.Tensor, num_src: int, what: str) -> None:
    """ValueError / IndexError unless ``ptr`` starts at 0, never decreases and ends at
    ``len(idx)``, and every ``idx`` lies in ``[0, num_src)``. Batched ``ptr [B, Ts+1]``:
    each example's row pointer never decreases and starts where the previous one ends."""
    p = ptr.cpu()
    if p.dim() == 2:
        _check_batched_ptr(p, idx.numel(), what)
    elif p.numel() < 1 or int(p[0]) != 0 or bool((p.diff() < 0).any()) or int(p[-1]) != idx.numel():
        raise ValueError(
            f"{what}: ptr must start at 0, never decrease and end at len(idx) = {idx.numel()}, "
            f"got {p.tolist() if p.numel() <= 8 else p}"
        )
    if idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= num_src:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{what}: source step {bad} is out of range for {num_src} steps")


def _check_batched_ptr(p: torch.Tensor, entries: int, what: str) -> None:
    """The per-example row pointers ``[B, Ts+1]`` (on the host) of a batched Resample."""
    batch = p.shape[0]
    if p.shape[1] < 1:
        raise ValueError(
            f"{what}: a batched ptr must be [B, Ts+1] with Ts >= 0, got {tuple(p.shape)}"
        )
    if batch == 0:
        if entries:
            raise ValueError(f"{what}: a batch of 0 examples has no entries, got {entries}")
        return
    starts = torch.cat([p.new_zeros(1), p[:-1, -1]])
    for b in torch.nonzero((p[:, 0] != starts) | (p.diff(dim=1) < 0).any(1)).flatten()[:1].tolist():
        row = p[b].tolist() if p.shape[1] <= 8 else p[b]
        raise ValueError(
            f"{what}: example {b}'s row pointer must start at {int(starts[b])} (0, or where "
            f"example {b - 1} ends) and never decrease, got {row}"
        )
    if int(p[-1, -1]) != entries:
        raise ValueError(
            f"{what}: the last example's row pointer must end at len(idx) = {entries}, "
            f"got {int(p[-1, -1])}"
        )


def _entry_examples(ptr: torch.Tensor, entries: int) -> torch.Tensor:
    """The example of each entry of a batched Resample (``ptr [B, Ts+1]``): int64 ``[E]``."""
    return torch.repeat_interleave(
        torch.arange(ptr.shape[0], device=ptr.device), ptr[:, -1] - ptr[:, 0], output_size=entries
    )


def _batched_positions(batch: int, steps: int, device) -> torch.Tensor:
    """``[B, steps+1]`` positions ``b * steps + j`` into a flattened ``[B*steps+1]`` pointer."""
    return (
        torch.arange(batch, device=device)[:, None] * steps
        + torch.arange(steps + 1, device=device)[None, :]
    )


_IDENTITY_CACHE: dict[tuple[int, torch.device], Resample] = {}


def _offsets(offsets, name: str) -> torch.Tensor:
    """A tokenizer's offset map as int64 ``[T, 2]`` (one example) or ``[B, T, 2]`` (a padded
    batch); anything else is an error naming it."""
    t = torch.as_tensor(offsets)
    if t.numel() == 0 and t.dim() < 2:
        t = t.reshape(0, 2).long()
    if t.dim() not in (2, 3) or t.shape[-1] != 2:
        raise ValueError(
            f"Resample.from_offsets: {name} must be [T, 2] (start, end) pairs, got shape "
            f"{tuple(t.shape)} ([B, T, 2] for a padded batch)"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"Resample.from_offsets: {name} must be integers, got {t.dtype}")
    return t.long()


def _offset_mask(mask, offsets: torch.Tensor, name: str, of: str) -> torch.Tensor | None:
    """An attention mask ``[*offsets.shape[:-1]]`` as bool on the offsets' device (nonzero =
    valid), or None."""
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if m.is_complex():
        raise TypeError(f"Resample.from_offsets: {name} must be bool or real, got {m.dtype}")
    if tuple(m.shape) != tuple(offsets.shape[:-1]):
        raise ValueError(
            f"Resample.from_offsets: {name} must have the shape of {of} without its last "
            f"dimension, {tuple(offsets.shape[:-1])}, got {tuple(m.shape)}"
        )
    return m.to(offsets.device) != 0


def _overlap_rows(
    teacher: torch.Tensor,
    student: torch.Tensor,
    t_mask: torch.Tensor | None,
    s_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example's ``(ptr, idx, weight)``: each student token (``[Ts, 2]`` spans) averages
    the teacher tokens (``[Tt, 2]``) whose spans overlap its own; masked positions (False)
    take part in nothing."""
    t_start, t_end = teacher[:, 0], teacher[:, 1]
    s_start, s_end = student[:, 0:1], student[:, 1:2]
    overlap = (t_start < s_end) & (s_start < t_end) & (t_start < t_end) & (s_start < s_end)
    if t_mask is not None:
        overlap &= t_mask[None, :]
    if s_mask is not None:
        overlap &= s_mask[:, None]
    rows, cols = overlap.nonzero(as_tuple=True)  # row-major: grouped by student token
    counts = overlap.sum(1)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    weight = 1.0 / counts[rows].float()
    return ptr, cols, weight


def _identity(steps: int, device: torch.device) -> Resample:
    """The identity rows, built without validation (they are valid by construction) and,
    in eager mode, cached per length and device (a few per process). A cached one that was
    moved or cast in place since (it may be held by a module) is rebuilt."""
    key = (steps, device)
    if not torch.compiler.is_compiling():
        cached = _IDENTITY_CACHE.get(key)
        if cached is not None and cached.weight.dtype == torch.float64:
            on = cached.ptr.device
            if on.type == device.type and (device.index is None or on.index == device.index):
                return cached
    ptr = torch.arange(steps + 1, device=device)
    rows = torch.arange(steps, device=device)
    weight = torch.ones(steps, dtype=torch.float64, device=device)
    other = Resample._from_parts(steps, ptr, rows, weight, ptr, rows, rows, rows)
    if not torch.compiler.is_compiling():
        if len(_IDENTITY_CACHE) >= 32:
            _IDENTITY_CACHE.clear()
        _IDENTITY_CACHE[key] = other
    return other
