"""Every public op on every backend with its tensor arguments in unusual memory layouts:
each result (forward and gradients) must equal the reference backend's on contiguous
float64 clones of the same values.

Layouts (one argument at a time, the others contiguous):

* ``transposed``: column-major (every dim's stride reversed), so no dim is dense;
* ``expanded``: stride 0 along dim -2 (dim 0 of a 1-D tensor), ``t[..., :1, :].expand``;
* ``broadcast``: stride 0 along dim 0 of a tensor of 2 or more dims (a batch broadcast);
* ``strided``: ``big[1::2]``, a storage offset and every other row, the rows between
  filled with NaN (float) or another valid index (int), so reading them shows;
* ``offset``: contiguous, but starting one element into its storage (misaligned).

The pseudo-argument ``grad_out`` puts the output gradient in those layouts (a
``out.sum().backward()`` hands an op a stride-0 gradient). Each op is one :class:`Spec`
in :data:`SPECS`: how to build its arguments, how to call it, which arguments take which
layouts and which are differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fastcore import Graph, Resample, ops, use_backend
from fastcore.ops._csr import index_csr
from fastcore.testing import assert_close, backend_params, dtype_supported, randint, randn

DTYPES = (torch.float64, torch.float32)
FP64 = (torch.float64,)
ALL_LAYOUTS = ("transposed", "expanded", "broadcast", "strided", "offset")
GRAD_OUT = "grad_out"


# --- layouts: each maps a tensor to one of the same shape (and, but for the stride-0
# layouts, the same values), or None where the layout does not apply.


def _transposed(t: torch.Tensor) -> torch.Tensor | None:
    if t.dim() < 2:
        return None
    order = tuple(reversed(range(t.dim())))
    out = t.permute(order).contiguous().permute(order)
    return out if not out.is_contiguous() else None


def _expanded(t: torch.Tensor) -> torch.Tensor | None:
    dim = -2 if t.dim() >= 2 else 0
    if t.dim() == 0 or t.shape[dim] < 2:
        return None
    return t.narrow(dim, 0, 1).expand(t.shape)


def _broadcast(t: torch.Tensor) -> torch.Tensor | None:
    if t.dim() < 2 or t.shape[0] < 2:
        return None
    return t[:1].expand(t.shape)


def _filler(t: torch.Tensor) -> torch.Tensor:
    """What lies between the rows: NaN for floats; for indices the same values in another
    order (still in range, so a kernel that reads them gives a wrong answer, not a crash)."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return t.flip(0)


def _strided(t: torch.Tensor) -> torch.Tensor | None:
    if t.dim() == 0 or t.shape[0] == 0:
        return None
    big = t.new_empty((2 * t.shape[0], *t.shape[1:]))
    big[0::2] = _filler(t)
    big[1::2] = t
    return big[1::2]


def _offset(t: torch.Tensor) -> torch.Tensor | None:
    if t.numel() == 0:
        return None
    flat = t.new_empty(t.numel() + 1)
    flat[:1] = _filler(t.reshape(-1)[:1])
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "transposed": _transposed,
    "expanded": _expanded,
    "broadcast": _broadcast,
    "strided": _strided,
    "offset": _offset,
}


def _map(fn, value):
    """``fn`` over a tensor or each tensor of a list; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [fn(t) for t in value]
    return value


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list):
        return list(value)
    return []


def relayout(value, layout: str):
    """``value`` (a tensor or a list of tensors) in ``layout``, or None where it does not
    apply to every tensor."""
    out = _map(LAYOUTS[layout], value)
    return None if any(t is None for t in (out if isinstance(out, list) else [out])) else out


# --- the ops


@dataclass(frozen=True)
class Spec:
    """One op: ``build(dtype, device)`` gives its named arguments (tensors, lists of
    tensors, anything else); ``call(**args)`` runs it (a tensor or a tuple whose first
    item is the differentiable output); ``relayout`` names the arguments to put in each
    layout (``no_expand``: those whose values must not repeat, CSR pointers and
    permutations); ``grads`` the differentiable ones; ``interpreted_dtypes`` the dtypes run
    on the Triton interpreter (slow: the fused KV ops run float64 only there, as the layout
    handling of their launchers does not depend on the dtype; on a GPU every dtype runs)."""

    backend: str
    build: Callable[[torch.dtype, str], dict[str, Any]]
    call: Callable[..., Any]
    relayout: tuple[str, ...]
    grads: tuple[str, ...] = ()
    no_expand: tuple[str, ...] = ()
    interpreted_dtypes: tuple[torch.dtype, ...] = DTYPES


def _r(shape, dtype, device, seed, scale=1.0):
    return randn(shape, dtype, device, seed) * scale


def _build_gather(dtype, device):
    return {
        "src": _r((3, 7, 4), dtype, device, 1),
        "index": randint(7, (5,), torch.int32, device, 2),
    }


def _build_gather_add(dtype, device):
    return {**_build_gather(dtype, device), "base": _r((3, 5, 4), dtype, device, 3)}


def _build_scatter(dtype, device):
    return {
        "src": _r((2, 6, 3), dtype, device, 4),
        "index": randint(4, (6,), torch.int64, device, 5),
    }


def _build_segment(dtype, device):
    return {
        "src": _r((2, 7, 3), dtype, device, 6),
        "ptr": torch.tensor([0, 2, 2, 5, 7], dtype=torch.int32, device=device),
    }


def _build_segment_csr(dtype, device):
    perm, ptr = index_csr(randint(4, (7,), torch.int64, device, 7), 4)
    return {"src": _r((2, 7, 3), dtype, device, 8), "perm": perm, "ptr": ptr}


def _build_spmm(dtype, device):
    return {
        "x": _r((2, 6, 3), dtype, device, 9),
        "edge_index": randint(6, (2, 11), torch.int64, device, 10),
        "edge_weight": _r((11,), dtype, device, 11),
    }


def _build_resample_rows(device):
    """Uneven resampling rows over 6 source steps (an empty row, a repeated source)."""
    return {
        "rs_ptr": torch.tensor([0, 2, 2, 5, 6], device=device),
        "rs_idx": torch.tensor([0, 3, 5, 1, 1, 4], device=device),
        "rs_weight": randn((6,), torch.float64, device, 12),
    }


def _resample(rs_ptr, rs_idx, rs_weight):
    return Resample.segments(rs_ptr, rs_idx, rs_weight, 6)


def _build_kv(dtype, device, grouped, per_head, tensor_groups=False, student=False, batch=()):
    """kv ``[*batch, Ht, 6, Dt]`` (G of them when grouped: a list, or a ``[G, ...]`` tensor
    with ``tensor_groups``), the parameters, the student cache and uneven resampling rows.
    Without ``batch`` the kernels run one batch row (the interpreter's time goes with it)."""
    Ht, Dt, Hs, Ds, G = 3, 5, 2, 4, 2
    lead = (G,) if grouped else ()
    kv_shape = (*batch, Ht, 6, Dt)
    if tensor_groups:
        kv = _r((G, *kv_shape), dtype, device, 20)
    elif grouped:
        kv = [_r(kv_shape, dtype, device, 20 + g) for g in range(G)]
    else:
        kv = _r(kv_shape, dtype, device, 20)
    proj_shape = (*lead, Ht, Dt, Ds) if per_head else (*lead, Dt, Ds)
    args = {
        "kv": kv,
        "head_mix": _r((*lead, Hs, Ht), dtype, device, 30),
        "dim_proj": _r(proj_shape, dtype, device, 31, Dt**-0.5),
        "bias": _r((*lead, Hs) if grouped else (*lead, Hs, Ds), dtype, device, 32),
        **_build_resample_rows(device),
    }
    if student:
        st_shape = (*batch, Hs, 4, Ds)
        if grouped:
            args["student"] = [_r(st_shape, dtype, device, 40 + g) for g in range(G)]
        else:
            args["student"] = _r(st_shape, dtype, device, 40)
    return args


def _kv_project(kv, head_mix, dim_proj, bias, rs_ptr, rs_idx, rs_weight):
    return ops.kv_project(kv, head_mix, dim_proj, _resample(rs_ptr, rs_idx, rs_weight), bias)


def _kv_distill(loss):
    def call(kv, student, head_mix, dim_proj, bias, rs_ptr, rs_idx, rs_weight):
        resample = _resample(rs_ptr, rs_idx, rs_weight)
        return ops.kv_distill_loss(
            kv, student, head_mix, dim_proj, resample, bias, loss=loss, reduction="none"
        )

    return call


def _build_linear_norm_residual(dtype, device):
    F, H = 3, 4
    return {
        "h": _r((2, 3, F, H), dtype, device, 50),
        "x": _r((2, 3, F, H), dtype, device, 51),
        "weight": _r((F, H, H), dtype, device, 52, 0.5),
        "bias": _r((F, H), dtype, device, 53),
        "gamma": _r((F, H), dtype, device, 54),
        "beta": _r((F, H), dtype, device, 55),
    }


def _build_time_conv(dtype, device):
    return {
        "x": _r((2, 5, 3, 4), dtype, device, 60),
        "weight": _r((3, 4), dtype, device, 61),
        "bias": _r((4,), dtype, device, 62),
    }


def _build_feature_mlp(dtype, device):
    F, H, K = 3, 4, 6
    return {
        "h": _r((2, 3, F, H), dtype, device, 70),
        "w1": _r((F, H, K), dtype, device, 71, 0.5),
        "b1": _r((F, K), dtype, device, 72),
        "w2": _r((F, K, H), dtype, device, 73, 0.5),
        "b2": _r((F, H), dtype, device, 74),
    }


def _build_safe_time_resample(dtype, device):
    # float steps out of range on both sides (clamped), and a fractional one (truncated)
    steps = torch.tensor([-3.0, 0.0, 4.7, 9.0, 2.0, 1.5], dtype=torch.float64, device=device)
    return {"x": _r((2, 3, 5, 4), dtype, device, 80), "indices": steps}


def _build_resample_apply(dtype, device):
    return {"x": _r((2, 3, 6, 4), dtype, device, 81), **_build_resample_rows(device)}


KV_ARGS = ("kv", "head_mix", "dim_proj", "bias")
KV_ROWS = ("rs_ptr", "rs_idx", "rs_weight")

SPECS: dict[str, Spec] = {
    "gather": Spec(
        "gather",
        _build_gather,
        lambda src, index: ops.gather(src, index, 1),
        ("src", "index", GRAD_OUT),
        ("src",),
    ),
    "gather_add": Spec(
        "gather_add",
        _build_gather_add,
        lambda src, index, base: ops.gather_add(src, index, base, -2),
        ("src", "index", "base", GRAD_OUT),
        ("src", "base"),
    ),
    "scatter_mean": Spec(
        "segment",
        _build_scatter,
        lambda src, index: ops.scatter(src, index, 1, 5, reduce="mean"),
        ("src", "index", GRAD_OUT),
        ("src",),
    ),
    "scatter_arg_max": Spec(
        "segment",
        _build_scatter,
        lambda src, index: ops.scatter_arg(src, index, -2, 5, reduce="max"),
        ("src", "index", GRAD_OUT),
        ("src",),
    ),
    "segment_min": Spec(
        "segment",
        _build_segment,
        lambda src, ptr: ops.segment(src, ptr, 1, reduce="min"),
        ("src", "ptr", GRAD_OUT),
        ("src",),
        no_expand=("ptr",),
    ),
    "segment_csr_sum": Spec(
        "segment",
        _build_segment_csr,
        lambda src, perm, ptr: ops.segment_csr(src, perm, ptr, 1),
        ("src", "perm", "ptr", GRAD_OUT),
        ("src",),
        no_expand=("perm", "ptr"),
    ),
    "spmm_graph": Spec(
        "spmm",
        _build_spmm,
        lambda x, edge_index, edge_weight: ops.spmm(x, Graph(edge_index, 6), edge_weight, 1),
        ("x", "edge_index", "edge_weight", GRAD_OUT),
        ("x", "edge_weight"),
    ),
    "spmm_edge_index_residual": Spec(
        "spmm",
        _build_spmm,
        lambda x, edge_index, edge_weight: ops.spmm(x, edge_index, edge_weight, residual=True),
        ("x", "edge_index", "edge_weight", GRAD_OUT),
        ("x", "edge_weight"),
    ),
    "kv_project": Spec(
        "kv_project",
        lambda dtype, device: _build_kv(dtype, device, grouped=False, per_head=False, batch=(2,)),
        _kv_project,
        (*KV_ARGS, *KV_ROWS, GRAD_OUT),
        KV_ARGS,
        no_expand=("rs_ptr",),
        interpreted_dtypes=FP64,
    ),
    "kv_project_grouped_per_head": Spec(
        "kv_project",
        lambda dtype, device: _build_kv(dtype, device, grouped=True, per_head=True),
        _kv_project,
        (*KV_ARGS, GRAD_OUT),
        KV_ARGS,
        interpreted_dtypes=FP64,
    ),
    "kv_project_grouped_tensor": Spec(
        "kv_project",
        lambda dtype, device: _build_kv(
            dtype, device, grouped=True, per_head=False, tensor_groups=True
        ),
        _kv_project,
        (*KV_ARGS, GRAD_OUT),
        KV_ARGS,
        interpreted_dtypes=FP64,
    ),
    "kv_distill_loss_mse": Spec(
        "kv_distill_loss",
        lambda dtype, device: _build_kv(dtype, device, grouped=False, per_head=False, student=True),
        _kv_distill("mse"),
        (*KV_ARGS, "student", GRAD_OUT),
        (*KV_ARGS, "student"),
        interpreted_dtypes=FP64,
    ),
    "kv_distill_loss_cosine_grouped_per_head": Spec(
        "kv_distill_loss",
        lambda dtype, device: _build_kv(dtype, device, grouped=True, per_head=True, student=True),
        _kv_distill("cosine"),
        (*KV_ARGS, "student", GRAD_OUT),
        (*KV_ARGS, "student"),
        interpreted_dtypes=FP64,
    ),
    "linear_norm_residual": Spec(
        "linear_norm_residual",
        _build_linear_norm_residual,
        lambda h, x, weight, bias, gamma, beta: ops.linear_norm_residual(
            h, x, weight, bias, gamma, beta, 0.7
        ),
        ("h", "x", "weight", "bias", "gamma", "beta", GRAD_OUT),
        ("h", "x", "weight", "bias", "gamma", "beta"),
    ),
    "time_conv": Spec(
        "time_conv",
        _build_time_conv,
        lambda x, weight, bias: ops.time_conv(x, weight, bias),
        ("x", "weight", "bias", GRAD_OUT),
        ("x", "weight", "bias"),
    ),
    "time_conv_reverse": Spec(
        "time_conv",
        _build_time_conv,
        lambda x, weight, bias: ops.time_conv(x, weight, bias, reverse=True),
        ("x", GRAD_OUT),
        ("x", "weight", "bias"),
    ),
    "feature_mlp": Spec(
        "feature_mlp",
        _build_feature_mlp,
        ops.feature_mlp,
        ("h", "w1", "b1", "w2", "b2", GRAD_OUT),
        ("h", "w1", "b1", "w2", "b2"),
    ),
    "safe_time_resample": Spec(
        "gather",
        _build_safe_time_resample,
        lambda x, indices: ops.safe_time_resample(x, indices, dim=2),
        ("x", "indices", GRAD_OUT),
        ("x",),
    ),
    "resample_apply": Spec(
        "spmm",
        _build_resample_apply,
        lambda x, rs_ptr, rs_idx, rs_weight: _resample(rs_ptr, rs_idx, rs_weight).apply(x, 2),
        ("x", *KV_ROWS, GRAD_OUT),
        ("x",),
        no_expand=("rs_ptr",),
    ),
}


def _outputs(spec: Spec, args: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    out = spec.call(**args)
    return out if isinstance(out, tuple) else (out,)


def _applicable(spec: Spec, arg: str, layout: str) -> bool:
    if layout in ("expanded", "broadcast") and arg in spec.no_expand:
        return False
    args = spec.build(torch.float64, "cpu")
    if arg == GRAD_OUT:
        with use_backend("reference"):
            value = _outputs(spec, args)[0]
    else:
        value = args[arg]
    return relayout(value, layout) is not None


def _cases() -> list:
    cases = []
    for name, spec in SPECS.items():
        for arg in spec.relayout:
            for layout in ALL_LAYOUTS:
                if not _applicable(spec, arg, layout):
                    continue
                for p in backend_params(spec.backend):
                    device, backend = p.values
                    interpreted = backend == "triton" and device == "cpu"
                    dtypes = spec.interpreted_dtypes if interpreted else DTYPES
                    dtypes = tuple(d for d in dtypes if dtype_supported(backend, device, d))
                    cases.append(
                        pytest.param(
                            name, arg, layout, device, backend, dtypes,
                            id=f"{name}-{arg}-{layout}-{p.id}",
                            marks=p.marks,
                        )
                    )  # fmt: skip
    return cases


def _contiguous64(t: torch.Tensor) -> torch.Tensor:
    """A dense copy of ``t``, float64 if it is floating point."""
    t = t.detach().clone(memory_format=torch.contiguous_format)
    return t.double() if t.is_floating_point() else t


def _run(spec: Spec, args: dict[str, Any], backend: str, upstream: Callable):
    """The outputs and the gradients (of ``spec.grads``, in order) of one call, the output
    gradient ``upstream(output)``."""
    args = {
        k: _map(lambda t: t.detach().requires_grad_(), v) if k in spec.grads else v
        for k, v in args.items()
    }
    inputs = [t for k in spec.grads for t in _tensors(args[k])]
    with use_backend(backend):
        outs = _outputs(spec, args)
        if not inputs:
            return outs, []
        grads = torch.autograd.grad(outs[0], inputs, upstream(outs[0]))
    return outs, grads


def check_layout(name: str, arg: str, layout: str, device: str, backend: str, dtype) -> None:
    """Op ``name`` on ``backend`` with ``arg`` in ``layout``: its outputs and gradients
    equal the reference backend's on contiguous float64 clones of the same values."""
    spec = SPECS[name]
    args = spec.build(dtype, device)
    grad_layout = LAYOUTS[layout] if arg == GRAD_OUT else lambda t: t
    if arg != GRAD_OUT:
        args[arg] = relayout(args[arg], layout)
        assert all(not t.is_contiguous() or t.storage_offset() for t in _tensors(args[arg])), (
            "the layout under test must be unusual"
        )

    def upstream(out: torch.Tensor) -> torch.Tensor:
        return grad_layout(randn(out.shape, torch.float64, device, 99).to(out.dtype))

    outs, grads = _run(spec, args, backend, upstream)
    ref_args = {k: _map(_contiguous64, v) for k, v in args.items()}
    ref_outs, ref_grads = _run(
        spec, ref_args, "reference", lambda out: _contiguous64(upstream(out))
    )

    what = f"{name} ({arg} {layout}, {backend}, {dtype})"
    for i, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        if out.is_floating_point():
            assert_close(out, ref, dtype, f"{what} output {i}")
        else:
            assert torch.equal(out, ref), f"{what} output {i}: {out} != {ref}"
    names = [k if len(_tensors(args[k])) == 1 else f"{k}[{j}]"
             for k in spec.grads for j in range(len(_tensors(args[k])))]  # fmt: skip
    for grad_name, grad, ref in zip(names, grads, ref_grads, strict=True):
        assert_close(grad, ref, dtype, f"{what} grad {grad_name}")


@pytest.mark.parametrize(("name", "arg", "layout", "device", "backend", "dtypes"), _cases())
def test_layout_matches_contiguous_reference(name, arg, layout, device, backend, dtypes):
    assert dtypes, "every case runs at least one dtype"
    for dtype in dtypes:
        check_layout(name, arg, layout, device, backend, dtype)
