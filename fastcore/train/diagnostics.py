"""Gradient diagnostics, the non-finite scan, and memory/parameter reports.

Usable without the Trainer: call :func:`check_gradients` after any ``backward()`` to see
which parameters got no gradient (broken flow), a zero one, a non-finite one, and which
are frozen.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ParamGrad:
    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    has_grad: bool
    norm: float  # NaN when the gradient is missing
    nonfinite: int  # entries that are NaN or +-inf
    zero: bool


@dataclass
class GradientReport:
    """Per-parameter gradient state after a backward.

    ``missing``: parameters that require grad but got none (the graph does not reach
    them); ``zero``: an all-zero gradient; ``nonfinite``: NaN/inf entries; ``frozen``:
    ``requires_grad=False``; ``total_norm``: the global L2 norm of the finite gradients.
    """

    params: list[ParamGrad] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [p.name for p in self.params if p.requires_grad and not p.has_grad]

    @property
    def zero(self) -> list[str]:
        return [p.name for p in self.params if p.has_grad and p.zero]

    @property
    def nonfinite(self) -> list[str]:
        return [p.name for p in self.params if p.nonfinite]

    @property
    def frozen(self) -> list[str]:
        return [p.name for p in self.params if not p.requires_grad]

    @property
    def total_norm(self) -> float:
        return math.sqrt(
            sum(p.norm**2 for p in self.params if p.has_grad and math.isfinite(p.norm))
        )

    @property
    def ok(self) -> bool:
        """Every trainable parameter has a finite, non-zero gradient."""
        return not (self.missing or self.zero or self.nonfinite)

    def summary(self) -> str:
        def names(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        trainable = sum(p.requires_grad for p in self.params)
        parts = [
            f"{trainable} trainable / {len(self.params)} parameters, "
            f"grad norm {self.total_norm:.4g}"
        ]
        for label, xs in (
            ("MISSING grad (no path from the loss)", self.missing),
            ("zero grad", self.zero),
            ("non-finite grad", self.nonfinite),
            ("frozen", self.frozen),
        ):
            if xs:
                parts.append(f"{label}: {names(xs)}")
        return "; ".join(parts)

    def table(self) -> str:
        rows = [("parameter", "shape", "grad norm", "non-finite", "state")]
        for p in self.params:
            if not p.requires_grad:
                state = "frozen"
            elif not p.has_grad:
                state = "MISSING"
            elif p.nonfinite:
                state = "NON-FINITE"
            elif p.zero:
                state = "zero"
            else:
                state = "ok"
            rows.append((p.name, str(list(p.shape)), f"{p.norm:.4g}", str(p.nonfinite), state))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        )


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def check_gradients(model: nn.Module) -> GradientReport:
    """The gradient state of every parameter of ``model`` (a DDP wrapper is unwrapped), in
    one device synchronisation."""
    named = list(_unwrap(model).named_parameters())
    with_grad = [p.grad for _, p in named if p.grad is not None]
    stats = []
    if with_grad:
        stats = (
            torch.stack(
                [
                    torch.stack(
                        [
                            torch.linalg.vector_norm(g.detach().float()),
                            (~torch.isfinite(g.detach())).sum().float(),
                            (g.detach() != 0).any().float(),
                        ]
                    )
                    for g in with_grad
                ]
            )
            .cpu()
            .tolist()
        )
    report = GradientReport()
    it = iter(stats)
    for name, p in named:
        if p.grad is None:
            report.params.append(
                ParamGrad(name, tuple(p.shape), p.requires_grad, False, math.nan, 0, False)
            )
            continue
        norm, bad, nonzero = next(it)
        report.params.append(
            ParamGrad(
                name,
                tuple(p.shape),
                p.requires_grad,
                True,
                norm,
                int(bad),
                nonzero == 0 and not bad,
            )
        )
    return report


def nonfinite_grad_names(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an inf."""
    named = [(n, p.grad) for n, p in _unwrap(model).named_parameters() if p.grad is not None]
    if not named:
        return []
    flags = torch.stack([~torch.isfinite(g).all() for _, g in named]).cpu().tolist()
    return [n for (n, _), bad in zip(named, flags, strict=True) if bad]


def parameter_summary(model: nn.Module) -> str:
    params = list(_unwrap(model).parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in params)
    return f"parameters: {total:,} ({trainable:,} trainable), {size / 2**20:.2f} MiB"


def cpu_rss_bytes() -> int:
    """This process's resident set size."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (``getrusage``'s
    ``ru_maxrss``: KiB on Linux, bytes on macOS); 0 where the platform has no
    ``resource`` module."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    """What a ``[MEM]`` line reports, in MiB: ``cpu_rss_mib`` (this process's resident
    set now), ``cpu_peak_rss_mib`` (its peak since the process started, the job's build
    included: what an out-of-memory kill is about); on CUDA ``cuda_alloc_mib`` /
    ``cuda_reserved_mib`` (tensors allocated / held by the caching allocator now) and
    ``cuda_peak_mib`` / ``cuda_peak_reserved_mib`` (their peaks since the process started
    or the last ``torch.cuda.reset_peak_memory_stats``)."""
    out = {
        "cpu_rss_mib": cpu_rss_bytes() / 2**20,
        "cpu_peak_rss_mib": cpu_peak_rss_bytes() / 2**20,
    }
    if device.type == "cuda":
        out["cuda_alloc_mib"] = torch.cuda.memory_allocated(device) / 2**20
        out["cuda_reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out
