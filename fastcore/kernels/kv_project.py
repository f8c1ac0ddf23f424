"""Triton launchers for the fused KV-cache projection (``fastcore::kv_project``), its
backward and the fused distillation loss (``fastcore::kv_distill_loss``). The contract is
in fastcore/reference/kv_project.py; the CPU twin is csrc/cpu/kv_project.cpp. The kernels
live by role: kv_project_fwd.py (projection, loss), kv_project_bwd.py (backward) and
_kv_tiles.py (the @triton.jit tiles they share); this file holds the geometry and the
launch functions the op calls.

Groups: ``kv`` (and the student cache) are lists of G tensors, read through a table of
their int64 addresses, so one launch covers every group (``ALIGNED``: every address is
16-byte aligned, so rows load vectorised). Under the interpreter the table holds host
addresses: the interpreter path is for CPU tensors.

Work item = (group g, batch b, tile of BLOCK_T student steps). Program (c, g) walks the
fixed range ``[items * c / chunks, items * (c + 1) / chunks)`` of group g's items;
``chunks`` is a function of the shapes only, so the per-program partial sums (parameter
gradients, losses), reduced afterwards by ``torch.sum`` over the program axis, give the
same bits on every run and every device. No float atomics. Per item, in registers,
accumulating in float32 (float64 for float64 kv), the teacher head dim in NUM_K chunks of
BLOCK_K columns (a P chunk ``[BLOCK_K, Ds]`` is a dot operand; the whole P of a 256-wide
head would not fit in shared memory):

* ``xr[h] = sum_k w_k x[h, idx_k]``: one teacher head (and column chunk) at a time;
* shared ``dim_proj``: ``Z[s] = sum_h M[s,h] xr[h]`` (``[BLOCK_S, BLOCK_T, BLOCK_K]``: heads
  mixed before projecting, Ht/Hs fewer FLOPs), then ``tl.dot`` of the
  ``[BLOCK_S * BLOCK_T, BLOCK_K]`` rows with the P chunk, plus bias;
* per-head ``dim_proj``: ``Y[h] = xr[h] @ P_h`` (``tl.dot``), ``out[s] = sum_h M[s,h] Y[h]``.

Backward (G = the gradient of an output tile: loaded from ``grad_out``, or recomputed from
the recomputed output tile and the student tile for a distillation loss):

* shared: ``dZ = G @ P^T``; ``grad_M[s,h] += <dZ[s], xr[h]>``; ``grad_P += Z^T G``;
  ``grad_bias += sum_t G``. ``dZ`` goes to a student-sized float32 buffer when the kv
  gradient is needed; ``kv_project_bwd_kv_kernel`` gathers it over the transposed rows:
  ``grad_kv[h, j] = sum_s M[s,h] sum_{k in row j} w_k dZ[s, t_k]``.
* per head: ``grad_M[s,h] += <G[s], Y[h]>``, ``dY[h] = sum_s M[s,h] G[s]`` to a buffer;
  ``kv_project_bwd_proj_kernel`` (programs by head) gathers ``A[h, j] = sum_k w_k dY[h, t_k]``
  and forms ``grad_kv[h, j] = A[h, j] @ P_h^T`` and
  ``grad_P_h = sum_j x[h, j]^T A[h, j]`` (= ``sum_t xr[h,t]^T dY[h,t]``), x read in place.

Resampling rows shared by the batch (``ptr [Ts+1]``) or per example (a batched Resample:
``ptr [B, Ts+1]``, ``t_ptr [B, Tt+1]``, offsets into the concatenated entries): the
kernels read example b's row pointers at ``ptr + b * ptr_stride`` (stride 0 or Ts+1).
The loss's optional ``mask [B, Ts]`` (bool/uint8): a masked row gets no entries (no
teacher step read), no loss term and G = 0; the means divide by the valid rows' count,
a device tensor (no sync).

Matrix products are ``tl.dot`` with fp32 accumulation: fp32 operands ("ieee") for float32
kv, half operands (kv's type) for bf16/fp16 kv; float64 uses a broadcast multiply-and-sum
(``tl.dot`` has no float64 on older Triton GPU backends), a correctness path. Head dims
are padded to powers of two >= 16 and masked; Ds is taken whole (up to 256 is the design
range) and Dt in at most 4 chunks. The launchers trust their inputs (fastcore.ops
validates) and never synchronise with the device: every size comes from shapes, each
tile loops to its own longest resampling row.
"""

from __future__ import annotations

import torch
import triton

from fastcore.kernels.kv_project_bwd import (
    kv_project_bwd_kernel,
    kv_project_bwd_kv_kernel,
    kv_project_bwd_proj_kernel,
)
from fastcore.kernels.kv_project_fwd import kv_distill_loss_fwd_kernel, kv_project_fwd_kernel

# Programs of the chunked grids: about two per H100 SM. A constant, not the device's SM
# count, so the partial sums (hence the gradients) are the same bits on every device.
PROGRAMS = 264
# Elements of a program's largest register tile (BLOCK_S x BLOCK_T x head dim); float64
# (the broadcast products) gets smaller tiles.
TILE = 4096
TILE_FP64 = 2048
# Elements of a P chunk [BLOCK_K, Ds] (a dot operand staged in shared memory).
PROJ_TILE = 16384
# At most this many Dt chunks (the per-chunk grad_dim_proj accumulators are unrolled).
MAX_K_CHUNKS = 4
# The loss codes of the kernels ("": the plain backward of kv_project).
LOSS_CODES = {"": 0, "mse": 1, "cosine": 2}
# The kernels' arithmetic (_kv_tiles.py) by kv dtype; other dtypes (float32): "ieee".
MODES = {torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


class _Geometry:
    """Shapes, arithmetic and tile sizes of one call."""

    def __init__(self, kv, head_mix, dim_proj, ptr):
        self.G = len(kv)
        self.B, self.Ht, self.Tt, self.Dt = kv[0].shape
        self.Hs = head_mix.shape[1]
        self.Ts = ptr.shape[-1] - 1
        self.ptr_stride = self.Ts + 1 if ptr.dim() == 2 else 0
        self.Ds = dim_proj.shape[-1]
        self.per_head = dim_proj.dim() == 4
        self.mode = MODES.get(kv[0].dtype, "ieee")
        self.fp64 = self.mode == "fp64"
        self.acc = torch.float64 if self.fp64 else torch.float32
        self.tile = TILE_FP64 if self.fp64 else TILE
        self.block_s = triton.next_power_of_2(max(self.Hs, 1))
        self.block_h = triton.next_power_of_2(max(self.Ht, 1))
        self.block_dt = max(16, triton.next_power_of_2(max(self.Dt, 1)))
        self.block_ds = max(16, triton.next_power_of_2(max(self.Ds, 1)))
        # Dt in NUM_K chunks of BLOCK_K columns: a P chunk [BLOCK_K, Ds] within PROJ_TILE.
        k_cap = max(16, PROJ_TILE // self.block_ds)
        self.block_k = min(self.block_dt, 1 << (k_cap.bit_length() - 1))
        self.num_k = triton.cdiv(self.block_dt, self.block_k)
        if self.num_k > MAX_K_CHUNKS:
            raise NotImplementedError(
                f"kv_project (triton): teacher head_dim {self.Dt} with student head_dim "
                f"{self.Ds} needs {self.num_k} chunks of {self.block_k} columns; at most "
                f"{MAX_K_CHUNKS} are supported"
            )
        if self.per_head:
            # [BLOCK_S, BLOCK_T, Ds] tiles; tl.dot rows: BLOCK_T >= 16.
            self.block_t = self._rows(self.block_s * self.block_ds, self.Ts, 16)
        else:
            # [BLOCK_S, BLOCK_T, BLOCK_K | Ds] tiles; tl.dot rows: BLOCK_S * BLOCK_T >= 16.
            width = max(self.block_k, self.block_ds)
            self.block_t = self._rows(self.block_s * width, self.Ts, max(1, 16 // self.block_s))
        self.tiles = triton.cdiv(self.Ts, self.block_t)
        self.items = self.B * self.tiles
        self.chunks = chunks_for(self.items, self.G)

    def _rows(self, per_row: int, steps: int, least: int) -> int:
        """A power-of-two row count: per_row elements a row within the tile, at most 64
        and the steps rounded up, at least ``least``."""
        rows = max(1, self.tile // per_row)
        rows = 1 << (rows.bit_length() - 1)
        rows = min(rows, 64, triton.next_power_of_2(max(steps, 1)))
        return max(rows, least)

    def dims(self) -> tuple[int, ...]:
        """The size arguments of the projecting kernels: ``B, Ht, Tt, Dt, Hs, Ts, Ds``."""
        return self.B, self.Ht, self.Tt, self.Dt, self.Hs, self.Ts, self.Ds

    def common(self) -> dict:
        """The constexprs every projecting kernel takes."""
        return dict(
            MODE=self.mode,
            BLOCK_K=self.block_k,
            NUM_K=self.num_k,
            BLOCK_DS=self.block_ds,
        )


def chunks_for(items: int, groups: int) -> int:
    """Programs per group of the chunked grids: a function of the shapes only."""
    return max(1, min(items, triton.cdiv(PROGRAMS, max(groups, 1))))


def _address_table(tensors) -> tuple[torch.Tensor, bool]:
    """The int64 addresses of ``tensors`` (contiguous) on their device, and whether all
    are 16-byte aligned. On CUDA the table goes up from pinned memory without blocking:
    no device sync."""
    addrs = [t.data_ptr() for t in tensors]
    table = torch.tensor(addrs, dtype=torch.int64)
    device = tensors[0].device
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    return table, all(a % 16 == 0 for a in addrs)


def _contiguous(tensors) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def kv_project_fwd(
    kv: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """fastcore::kv_project: ``[G, B, Hs, Ts, Ds]`` in kv's dtype."""
    geo = _Geometry(kv, head_mix, dim_proj, ptr)
    out = torch.empty(
        (geo.G, geo.B, geo.Hs, geo.Ts, geo.Ds), dtype=kv[0].dtype, device=kv[0].device
    )
    if out.numel() == 0:
        return out
    kv = _contiguous(kv)
    table, aligned = _address_table(kv)
    mix = head_mix.contiguous()
    kv_project_fwd_kernel[(geo.chunks, geo.G)](
        table, kv[0], mix, dim_proj.contiguous(), mix if bias is None else bias.contiguous(),
        ptr.contiguous(), idx.contiguous(), weight.contiguous(), out, geo.ptr_stride,
        *geo.dims(), geo.chunks,
        PER_HEAD=geo.per_head,
        HAS_BIAS=bias is not None,
        ALIGNED=aligned,
        BLOCK_S=geo.block_s,
        BLOCK_T=geo.block_t,
        num_warps=8,
        **geo.common(),
    )  # fmt: skip
    return out


def _loss_count(geo: _Geometry, loss: str, mask: torch.Tensor | None = None):
    """N of a group's mean: every element (mse) or every row (cosine); with a mask, of the
    valid rows only, as an int64 device tensor (no sync)."""
    rows = geo.B * geo.Hs * geo.Ts if mask is None else mask.sum() * geo.Hs
    return rows * geo.Ds if loss == "mse" else rows


def kv_distill_loss_fwd(
    kv: list[torch.Tensor],
    student: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    loss: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """fastcore::kv_distill_loss: the per-group losses ``[G]`` (float32; float64 for
    float64 kv), each output tile recomputed and compared in registers; per-program
    float64 partial sums, then ``torch.sum``. An empty cache gives 0. ``mask [B, Ts]``:
    masked rows skipped, the mean over the valid ones (none: 0)."""
    geo = _Geometry(kv, head_mix, dim_proj, ptr)
    if _loss_count(geo, loss) == 0:
        return torch.zeros(geo.G, dtype=geo.acc, device=kv[0].device)
    count = _loss_count(geo, loss, mask)
    if mask is not None:
        count = count.clamp_min(1)  # no valid row: the partial sums are 0
    part = torch.empty((geo.G, geo.chunks), dtype=torch.float64, device=kv[0].device)
    kv, student = _contiguous(kv), _contiguous(student)
    kv_table, kv_aligned = _address_table(kv)
    st_table, st_aligned = _address_table(student)
    mix = head_mix.contiguous()
    kv_distill_loss_fwd_kernel[(geo.chunks, geo.G)](
        kv_table, kv[0], st_table, student[0], mix, dim_proj.contiguous(),
        mix if bias is None else bias.contiguous(),
        ptr.contiguous(), idx.contiguous(), weight.contiguous(), part, geo.ptr_stride,
        part if mask is None else mask.contiguous(),
        *geo.dims(), geo.chunks,
        LOSS=LOSS_CODES[loss],
        PER_HEAD=geo.per_head,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        ALIGNED=kv_aligned and st_aligned,
        BLOCK_S=geo.block_s,
        BLOCK_T=geo.block_t,
        num_warps=8,
        **geo.common(),
    )  # fmt: skip
    return (part.sum(1) / count).to(geo.acc)


def kv_project_bwd(
    grad_out: torch.Tensor | None,
    kv: list[torch.Tensor],
    head_mix: torch.Tensor,
    dim_proj: torch.Tensor,
    bias: torch.Tensor | None,
    ptr: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    t_ptr: torch.Tensor,
    t_col: torch.Tensor,
    t_edge: torch.Tensor,
    need_kv: bool,
    student: list[torch.Tensor] | None = None,
    loss_grad: torch.Tensor | None = None,
    loss: str = "",
    mask: torch.Tensor | None = None,
) -> tuple[
    list[torch.Tensor] | None,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    list[torch.Tensor] | None,
]:
    """The backward of kv_project (``grad_out [G, B, Hs, Ts, Ds]``) or of kv_distill_loss
    (``grad_out`` None; ``student`` groups, ``loss_grad [G]``, ``loss`` "mse"/"cosine",
    the loss's ``mask [B, Ts]`` or None).

    Returns ``(grad_kv, grad_head_mix, grad_dim_proj, grad_bias, grad_student)``: grad_kv G
    tensors in kv's dtype when ``need_kv`` else None; parameter gradients in float32
    (float64 for float64 kv), grad_bias None without bias; grad_student G tensors in the
    student's dtype for a loss, else None. Deterministic (no atomics; per-program partial
    sums reduced by ``torch.sum``)."""
    geo = _Geometry(kv, head_mix, dim_proj, ptr)
    G, B, Ht, Tt, Dt, Hs, Ts, Ds = geo.G, *geo.dims()
    device, acc = kv[0].device, geo.acc
    code = 0 if grad_out is not None else LOSS_CODES[loss]
    chunks = geo.chunks
    gm_part = torch.empty((G, chunks, Hs, Ht), dtype=acc, device=device)
    gb_part = (
        torch.empty((G, chunks, Hs, Ds), dtype=acc, device=device) if bias is not None else gm_part
    )
    gp_part = (
        gm_part if geo.per_head else torch.empty((G, chunks, Dt, Ds), dtype=acc, device=device)
    )
    need_mid = geo.per_head or need_kv
    if not need_mid:
        mid = gm_part
    elif geo.per_head:
        mid = torch.empty((G, B, Ht, Ts, Ds), dtype=acc, device=device)
    else:
        mid = torch.empty((G, B, Hs, Ts, Dt), dtype=acc, device=device)
    kv = _contiguous(kv)
    kv_table, aligned = _address_table(kv)
    if code:
        student = _contiguous(student)
        st_table, st_aligned = _address_table(student)
        grad_student = [torch.empty_like(t) for t in student]
        gst_table, gst_aligned = _address_table(grad_student)
        aligned = aligned and st_aligned and gst_aligned
        st_first, gst_first = student[0], grad_student[0]
        if mask is None:
            count = max(_loss_count(geo, loss), 1)
        else:
            count = _loss_count(geo, loss, mask).clamp_min(1).to(acc)
        scale = (loss_grad.to(device=device, dtype=acc) / count).contiguous()
        go = gm_part
    else:
        st_table, st_first, scale = kv_table, kv[0], gm_part
        gst_table, gst_first, grad_student = kv_table, gm_part, None
        go = grad_out.contiguous()
    mix = head_mix.contiguous()
    proj = dim_proj.contiguous()
    w = weight.contiguous()
    has_mask = code != 0 and mask is not None
    kv_project_bwd_kernel[(chunks, G)](
        kv_table, kv[0], st_table, st_first, go, scale, mix, proj,
        mix if bias is None else bias.contiguous(),
        ptr.contiguous(), idx.contiguous(), w, gst_table, gst_first,
        mid, gm_part, gp_part, gb_part, geo.ptr_stride,
        gm_part if mask is None else mask.contiguous(),
        *geo.dims(), chunks,
        LOSS=code,
        PER_HEAD=geo.per_head,
        HAS_BIAS=bias is not None,
        HAS_MASK=has_mask,
        NEED_MID=need_mid,
        ALIGNED=aligned,
        BLOCK_S=geo.block_s,
        BLOCK_H=geo.block_h,
        BLOCK_T=geo.block_t,
        num_warps=8,
        **geo.common(),
    )  # fmt: skip
    grad_kv = None
    gkv_table, gkv_first = kv_table, gm_part
    if need_kv:
        grad_kv = [torch.empty_like(t) for t in kv]
        gkv_table, gkv_aligned = _address_table(grad_kv)
        aligned = aligned and gkv_aligned
        gkv_first = grad_kv[0]
    t_ptr, t_col, t_edge = t_ptr.contiguous(), t_col.contiguous(), t_edge.contiguous()
    t_stride = Tt + 1 if t_ptr.dim() == 2 else 0
    if geo.per_head:
        # [BLOCK_J, Dt | Ds] tiles; tl.dot rows (and reduction): BLOCK_J >= 16.
        block_j = geo._rows(max(geo.block_k, geo.block_ds), Tt, 16)
        chunks_j = chunks_for(B * triton.cdiv(Tt, block_j), G * Ht)
        gp_part = torch.empty((G, chunks_j, Ht, Dt, Ds), dtype=acc, device=device)
        if gp_part.numel():
            kv_project_bwd_proj_kernel[(chunks_j, Ht, G)](
                kv_table, kv[0], mid, proj, w, t_ptr, t_col, t_edge, gkv_table, gkv_first,
                gp_part, t_stride, gp_part if not has_mask else mask.contiguous(),
                B, Ht, Tt, Dt, Ts, Ds, chunks_j,
                NEED_KV=need_kv,
                HAS_MASK=has_mask,
                ALIGNED=aligned,
                BLOCK_J=block_j,
                num_warps=8,
                **geo.common(),
            )  # fmt: skip
    elif need_kv and grad_kv[0].numel():
        block_j = geo._rows(geo.block_s * geo.block_dt, Tt, 1)
        chunks_j = chunks_for(B * triton.cdiv(Tt, block_j), G)
        kv_project_bwd_kv_kernel[(chunks_j, G)](
            mid, mix, w, t_ptr, t_col, t_edge, gkv_table, gkv_first, t_stride,
            B, Ht, Tt, Dt, Hs, Ts, chunks_j,
            ALIGNED=aligned,
            MODE=geo.mode,
            BLOCK_S=geo.block_s,
            BLOCK_J=block_j,
            BLOCK_DT=geo.block_dt,
            num_warps=8,
        )  # fmt: skip
    grad_mix = gm_part.sum(1)
    grad_proj = gp_part.sum(1).view(dim_proj.shape)
    grad_bias = gb_part.sum(1) if bias is not None else None
    return grad_kv, grad_mix, grad_proj, grad_bias, grad_student
