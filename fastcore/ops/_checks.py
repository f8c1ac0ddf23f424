"""Input validation shared by every op (the Python twin of csrc/utils.h).

Static checks (shape, dtype, device) cost nothing and run in the public wrappers, also
under ``torch.compile``. Value checks (index ranges, CSR pointers) read the data, which
synchronises with a GPU; they run inside the op implementations, before any kernel.
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def normalize_dim(dim: int, ndim: int, op: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {dim!r} ({type(dim).__name__})")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} is out of range for a tensor of {ndim} dimensions")
    return dim % ndim


def check_index_tensor(index: torch.Tensor, like: torch.Tensor, op: str, name: str) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(index).__name__}")
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(index.shape)}")
    if index.device != like.device:
        raise ValueError(f"{op}: {name} is on {index.device} but src is on {like.device}")


def check_dtype(src: torch.Tensor, allowed: tuple[torch.dtype, ...], op: str) -> None:
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"{op}: src must be a tensor, got {type(src).__name__}")
    if src.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: src dtype {src.dtype} is not supported; expected one of {names}")


def check_like(h: torch.Tensor, expected: dict[str, tuple[int, ...]], tensors, op: str) -> None:
    """ValueError / TypeError unless each of ``tensors`` (named by ``expected``'s keys) is a
    tensor of the expected shape with ``h``'s dtype and device."""
    for name, t in zip(expected, tensors, strict=True):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be {expected[name]}, got {shape}")
        if t.dtype != h.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must equal h's {h.dtype}")
        if t.device != h.device:
            raise ValueError(f"{op}: {name} is on {t.device} but h is on {h.device}")


def check_index_range(index: torch.Tensor, bound: int, op: str, name: str, dim: int) -> None:
    """IndexError naming the offending value unless every value is in [0, bound)."""
    if index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0:
        raise IndexError(
            f"{op}: {name} contains the negative value {lo}; "
            f"expected values in [0, {bound}) for dimension {dim}"
        )
    if hi >= bound:
        raise IndexError(
            f"{op}: {name} value {hi} is out of range for dimension {dim} of size {bound}"
        )


def check_csr(ptr: torch.Tensor, perm: torch.Tensor | None, rows: int, op: str, dim: int) -> None:
    """ValueError/IndexError unless ``ptr`` (and ``perm``) describe a CSR over ``rows`` rows."""
    if ptr.dim() != 1 or ptr.numel() < 1:
        raise ValueError(
            f"{op}: ptr must be 1-D with at least one entry, got shape {tuple(ptr.shape)}"
        )
    p = ptr.long().cpu()
    if int(p[0]) != 0:
        raise ValueError(f"{op}: ptr[0] must be 0, got {int(p[0])}")
    drops = torch.nonzero(p.diff() < 0)
    if drops.numel():
        r = int(drops[0])
        raise ValueError(
            f"{op}: ptr must be non-decreasing, got ptr[{r}]={int(p[r])} > ptr[{r + 1}]={int(p[r + 1])}"
        )
    if int(p[-1]) != rows:
        raise ValueError(
            f"{op}: ptr[-1] must equal the size {rows} of dimension {dim}, got {int(p[-1])}"
        )
    if perm is not None:
        if perm.dim() != 1 or perm.numel() != rows:
            raise ValueError(
                f"{op}: perm must be 1-D of length {rows}, got shape {tuple(perm.shape)}"
            )
        check_index_range(perm, rows, op, "perm", dim)
        if rows:
            most = int(torch.bincount(perm.long(), minlength=rows).max())
            if most != 1:
                raise ValueError(
                    f"{op}: perm must be a permutation of 0..{rows - 1}, but a value repeats {most} times"
                )


# Under torch.compile a value check cannot run in traced Python (it reads the data). These
# operators run it inside the compiled graph, with eager's message: each returns a copy of
# its first input that the caller goes on with, so the check is ordered before the
# kernel that reads the values and is never dropped as dead code.
@torch.library.custom_op("fastcore::checked_index", mutates_args=())
def _checked_index(index: torch.Tensor, bound: int, op: str, name: str, dim: int) -> torch.Tensor:
    check_index_range(index, bound, op, name, dim)
    return index.clone()


@torch.library.custom_op("fastcore::checked_csr", mutates_args=())
def _checked_csr(
    ptr: torch.Tensor, perm: torch.Tensor | None, rows: int, op: str, dim: int
) -> torch.Tensor:
    check_csr(ptr, perm, rows, op, dim)
    return ptr.clone()


@_checked_index.register_fake
def _checked_index_fake(index, bound, op, name, dim):
    return torch.empty_like(index)


@_checked_csr.register_fake
def _checked_csr_fake(ptr, perm, rows, op, dim):
    return torch.empty_like(ptr)


def index_in_range(index: torch.Tensor, bound: int, op: str, name: str, dim: int) -> torch.Tensor:
    """``index`` after :func:`check_index_range`, eager or compiled (same error either way)."""
    if torch.compiler.is_compiling():
        return torch.ops.fastcore.checked_index(index, bound, op, name, dim)
    check_index_range(index, bound, op, name, dim)
    return index


def csr_in_range(
    ptr: torch.Tensor, perm: torch.Tensor | None, rows: int, op: str, dim: int
) -> torch.Tensor:
    """``ptr`` after :func:`check_csr`, eager or compiled (same error either way)."""
    if torch.compiler.is_compiling():
        return torch.ops.fastcore.checked_csr(ptr, perm, rows, op, dim)
    check_csr(ptr, perm, rows, op, dim)
    return ptr
