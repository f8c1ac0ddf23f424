"""Which implementation of an op runs: ``reference | cpu | triton | cuda``.

Every public op declares the backends it implements with :func:`register_op` and asks
:func:`resolve` on each call. The choice depends on the tensor's device and on what is
usable here:

========== ============== ================================================================
backend    runs on        usable when
========== ============== ================================================================
reference  any device     always (plain PyTorch: the oracle and the fallback)
cpu        CPU tensors    the extension ``fastcore._C`` imported
cuda       CUDA tensors   ``fastcore._C`` was built with CUDA and a GPU is visible
triton     CUDA tensors   ``triton`` is installed and a GPU is visible;
           CPU tensors    also under ``TRITON_INTERPRET=1`` (the interpreter, for tests)
========== ============== ================================================================

``FASTCORE_BACKEND=<name>`` (read at import) or :func:`set_backend` forces one backend for
every op; an op that cannot run the forced backend on the given device raises instead of
silently running something else. Without a forced backend, CPU tensors use ``cpu`` and
CUDA tensors use the op's fastest measured GPU backend, falling back to ``reference``.

An op registered with ``composite=True`` (a fused op that layers call on every device) has
a fast PyTorch composite of its own: :func:`resolve` answers ``"composite"`` where none of
its kernels runs (no GPU kernel yet, or a forced backend the op does not implement), so the
op, not the layer that calls it, owns that choice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_ENV = "FASTCORE_BACKEND"


def _load_extension():
    try:
        from fastcore import _C
    except ImportError as exc:
        warnings.warn(
            f"fastcore: the compiled extension fastcore._C is not importable ({exc}); every op "
            "runs its pure-PyTorch reference. Build it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


_C = _load_extension()
BUILD_INFO: dict[str, bool] = dict(_C.build_info()) if _C is not None else {}
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when a kernel is defined, so it is read once here too.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name


_forced: str | None = _check_name(os.environ[_ENV], _ENV) if os.environ.get(_ENV) else None


def usable(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run on tensors of ``device_type`` ("cpu", "cuda", ...) here."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _C is not None
    if backend == "cuda":
        return device_type == "cuda" and BUILD_INFO.get("cuda", False) and torch.cuda.is_available()
    if backend == "triton":
        if not HAS_TRITON:
            return False
        if device_type == "cuda":
            return torch.cuda.is_available()
        return device_type == "cpu" and TRITON_INTERPRET
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def backends() -> dict[str, bool]:
    """What is built and usable here: backend name -> usable on at least one local device."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {name: any(usable(name, d) for d in device_types) for name in BACKENDS}


def set_backend(name: str | None) -> None:
    """Force ``name`` for every op (``None`` restores the automatic choice)."""
    global _forced
    _forced = None if name is None else _check_name(name, "set_backend")


def get_backend() -> str | None:
    """The forced backend, or ``None`` when each call chooses automatically."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` inside a ``with`` block, restoring the previous setting after it."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@dataclass(frozen=True)
class OpSpec:
    name: str
    backends: tuple[str, ...]
    gpu_order: tuple[str, ...]
    composite: bool = False


_OPS: dict[str, OpSpec] = {}


def register_op(
    name: str, backends: Sequence[str], gpu_order: Sequence[str], composite: bool = False
) -> OpSpec:
    """Declare an op's implemented backends, its GPU preference (fastest measured first) and
    whether it has a composite of its own for devices and forced backends without a kernel."""
    for b in (*backends, *gpu_order):
        _check_name(b, f"register_op({name!r})")
    spec = OpSpec(name, tuple(backends), tuple(gpu_order), composite)
    _OPS[name] = spec
    return spec


def resolve(op: str, device: torch.device) -> str:
    """What runs ``op`` on ``device`` for this call: a backend name, or ``"composite"`` for
    an op registered with one where none of its kernels runs."""
    spec = _OPS[op]
    device_type = device.type
    if _forced is not None:
        if _forced not in spec.backends:
            if spec.composite:
                return "composite"
            raise RuntimeError(
                f"fastcore.ops.{op} has no {_forced!r} backend (forced by {_ENV} or set_backend); "
                f"it implements {', '.join(spec.backends)}"
            )
        if not usable(_forced, device_type):
            here = [b for b in spec.backends if usable(b, device_type)]
            raise RuntimeError(
                f"backend {_forced!r} (forced by {_ENV} or set_backend) cannot run "
                f"fastcore.ops.{op} on a {device_type} tensor here; usable: {', '.join(here)}"
            )
        return _forced
    order = ("cpu",) if device_type == "cpu" else spec.gpu_order if device_type == "cuda" else ()
    for backend in order:
        if backend in spec.backends and usable(backend, device_type):
            return backend
    return "composite" if spec.composite else "reference"
