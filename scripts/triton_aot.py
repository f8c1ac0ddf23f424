"""Compile every Triton kernel in ``fastcore/kernels/`` for a GPU ahead of time, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, how the suite runs the kernels on a CPU) never
lowers a kernel to the GPU: a kernel that does not compile for the chip passes every CPU
test. This script closes that gap. It calls fastcore's public ops through their Triton
backend on CPU tensors at the benchmark shapes (``bench/``), forward and backward, in
every dtype each op accepts. Each kernel launch is intercepted before it reaches a driver
(nothing runs): Triton's own JIT binder computes the launch's specialisation for the
target (signature, constexprs, alignment and divisibility attributes, options) exactly as
it would on the GPU, and each distinct specialisation is then compiled with
``triton.compile`` down to a cubin for the target (default ``sm_90``, H100/H200).

Inputs whose size would not fit this machine have their leading (batch x time) extent
reduced; the constexprs (tile shapes) depend on the inner extents, which are kept, and the
reduced row counts stay above the tile height, so the specialisations compiled are the
ones the bench shapes launch. Outputs (which no kernel fills here) come from zero-filled
allocations, so an index output stays in range for the host code that follows.

Every ``@triton.jit`` function in ``fastcore/kernels/`` whose name ends in ``_kernel`` is an entry
point and must be launched (and compiled) in every dtype its op accepts; helpers are
compiled as part of the kernels that call them.

Usage:
    python scripts/triton_aot.py [--arch 90] [--quick] [--jobs N] [--json FILE]

``--quick`` keeps one shape per op (all dtypes and variants): the set ``make test`` runs.
Exit status 1 when a kernel fails to compile or an entry point is never launched.
Run it without ``TRITON_INTERPRET`` (it removes the variable and re-executes itself).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
if "TRITON_CACHE_DIR" not in os.environ:
    # A fresh cache: every specialisation is really compiled, none found from an earlier run.
    _CACHE = tempfile.TemporaryDirectory(prefix="triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = _CACHE.name

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction, create_function_from_signature

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)
# Largest tensor an input may be here (bytes); larger bench shapes lose leading rows.
MAX_BYTES = 256 * 2**20


@dataclass
class Launch:
    kernel: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.kernel.fn.__module__}.{self.kernel.fn.__name__}"

    def key(self) -> str:
        return json.dumps(
            [
                self.name,
                self.signature,
                sorted((str(k), repr(v)) for k, v in self.constexprs.items()),
                sorted((str(k), repr(v)) for k, v in self.attrs.items()),
                sorted(self.options.items(), key=str),
            ],
            default=str,
        )


class Recorder:
    """Replaces ``JITFunction.run``: binds and specialises each launch for ``target`` and
    records it instead of launching."""

    def __init__(self, target: GPUTarget):
        from triton.compiler import make_backend

        self.target = target
        self.backend = make_backend(target)
        self.binders: dict[int, object] = {}
        self.launches: dict[str, Launch] = {}
        self.case = ""
        self.saved = None

    def run(self, kernel: JITFunction, *args, grid, warmup, **kwargs):
        from triton import knobs

        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self.binders.get(id(kernel))
        if binder is None:
            binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
            self.binders[id(kernel)] = binder
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        launch = Launch(kernel, signature, constexprs, attrs, dict(options.__dict__))
        launch = self.launches.setdefault(launch.key(), launch)
        launch.cases.add(self.case)
        return None

    def __enter__(self):
        recorder = self
        self.saved = JITFunction.run

        def run(kernel, *args, grid, warmup, **kwargs):
            return recorder.run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        JITFunction.run = run
        # Nothing runs, so outputs keep what their allocation held; allocate them zeroed so
        # that an index a kernel would have written (segment max's argmax) is in range for
        # the host code after it.
        self.allocators = torch.empty, torch.empty_like
        torch.empty = _zeroed(torch.zeros, keeps_format=False)
        torch.empty_like = _zeroed(torch.zeros_like, keeps_format=True)
        return self

    def __exit__(self, *exc):
        JITFunction.run = self.saved
        torch.empty, torch.empty_like = self.allocators


def _zeroed(allocate, keeps_format: bool):
    def empty(*args, **kwargs):
        if not keeps_format:
            kwargs.pop("memory_format", None)
        return allocate(*args, **kwargs)

    return empty


# ---------------------------------------------------------------------------------------
# The ops at the bench shapes


def _bench(name: str):
    """A bench module's shape lists, imported from bench/ by path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_aot_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fit(lead: int, row_elems: int, dtype: torch.dtype) -> int:
    """The leading extent, reduced (a multiple of 16) so that one tensor fits MAX_BYTES."""
    size = torch.empty((), dtype=dtype).element_size()
    most = max(16, MAX_BYTES // max(1, row_elems * size) // 16 * 16)
    return min(lead, most)


def _rand(shape, dtype, grad=False):
    t = (
        torch.randn(shape, dtype=torch.float32).to(dtype)
        if dtype.is_floating_point
        else (torch.randint(-100, 100, shape, dtype=dtype))
    )
    return t.requires_grad_(grad and dtype.is_floating_point)


def _backward(out):
    if out.requires_grad:
        out.backward(torch.ones_like(out))


def gather_cases(quick: bool):
    from fastcore import ops

    shapes = _bench("test_bench_gather").SHAPES[: 1 if quick else None]
    for bt, n, h in shapes:
        for dtype in (*FLOATS, *INTS):
            lead = _fit(bt, n * h, dtype)
            index = torch.randint(0, n // 5, (n,))

            def run(lead=lead, n=n, h=h, dtype=dtype, index=index):
                src = _rand((lead, n // 5, h), dtype, grad=True)
                _backward(ops.gather(src, index, -2))
                if dtype.is_floating_point:
                    base = _rand((lead, n, h), dtype, grad=True)
                    _backward(ops.gather_add(src, index, base, -2))

            yield f"gather {bt}x{n}x{h} {dtype}", dtype, run


def pool_cases(quick: bool):
    from fastcore import ops

    bench = _bench("test_bench_pool")
    shapes = [(bt, n, hf) for bt in bench.BT for n in bench.N for hf in bench.HF]
    for bt, n, hf in shapes[: 1 if quick else None]:
        for dtype in FLOATS:
            lead = _fit(bt, n * hf, dtype)
            parents = max(1, n // 5)
            index = torch.randint(0, parents, (n,))
            counts = torch.bincount(index, minlength=parents)
            ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            perm = torch.argsort(index, stable=True)

            def run(
                lead=lead, n=n, hf=hf, dtype=dtype, index=index, ptr=ptr, perm=perm, parents=parents
            ):
                for reduce in ("sum", "mean", "max", "min"):
                    src = _rand((lead, n, hf), dtype, grad=True)
                    _backward(ops.scatter(src, index, -2, parents, reduce))
                    _backward(ops.segment(src, ptr, -2, reduce))
                    _backward(ops.segment_csr(src, perm, ptr, -2, reduce))

            yield f"pool {bt}x{n}x{hf} {dtype}", dtype, run


def spmm_cases(quick: bool):
    from fastcore import Graph, ops

    for b, t, n, f, h, e in _bench("test_bench_spmm").SPMM_CASES[: 1 if quick else None]:
        g = torch.Generator().manual_seed(0)
        graph = Graph(torch.randint(0, n, (2, e), generator=g), n)
        for dtype in FLOATS:
            lead = _fit(b * t, n * f * h, dtype)

            def run(lead=lead, n=n, f=f, h=h, dtype=dtype, graph=graph, e=e):
                for weighted in (False, True):
                    for residual in (False, True):
                        x = _rand((lead, n, f, h), dtype, grad=True)
                        w = _rand((e,), dtype, grad=True) if weighted else None
                        _backward(ops.spmm(x, graph, w, dim=-3, residual=residual))

            yield f"spmm B{b}T{t}N{n}F{f}H{h}E{e} {dtype}", dtype, run


def time_conv_cases(quick: bool):
    from fastcore import ops

    for b, t, n, c, k in _bench("test_bench_time_conv").CASES[: 1 if quick else None]:
        for dtype in FLOATS:

            def run(b=b, t=t, n=n, c=c, k=k, dtype=dtype):
                for reverse in (False, True):
                    for with_bias in (False, True):
                        x = _rand((b, t, n, c), dtype, grad=True)
                        w = _rand((k, c), dtype, grad=True)
                        bias = _rand((c,), dtype, grad=True) if with_bias else None
                        _backward(ops.time_conv(x, w, bias, reverse))

            yield f"time_conv B{b}T{t}N{n}C{c}K{k} {dtype}", dtype, run


def kv_cases(quick: bool):
    from fastcore import Resample, ops

    bench = _bench("test_bench_kv_project")
    ht, dt, hs, ds = bench.HT, bench.DT, bench.HS, bench.DS
    # Every CPU and GPU bench case's time steps; one batch and one layer's K and V (the
    # group count and the batch change the grid, not the specialisation).
    steps = sorted({(tt, ts) for _, tt, ts in bench.KV_CASES} | {(4096, 3686)})
    for tt, ts in steps[: 1 if quick else None]:
        resample = Resample.linear(tt, ts)
        for dtype in FLOATS:

            def run(tt=tt, ts=ts, dtype=dtype, resample=resample):
                for per_head in (False, True):
                    kv = [_rand((1, ht, tt, dt), dtype, grad=True) for _ in range(2)]
                    mix = _rand((2, hs, ht), torch.float32, grad=True)
                    proj_shape = (2, ht, dt, ds) if per_head else (2, dt, ds)
                    proj = _rand(proj_shape, torch.float32, grad=True)
                    bias = _rand((2, hs, ds), torch.float32, grad=True)
                    _backward(ops.kv_project(kv, mix, proj, resample, bias).sum())
                    student = [_rand((1, hs, ts, ds), dtype, grad=True) for _ in range(2)]
                    for loss in ("mse", "cosine"):
                        _backward(ops.kv_distill_loss(kv, student, mix, proj, resample, bias, loss))

            yield f"kv_project Tt{tt}->Ts{ts} Ht{ht}Dt{dt}->Hs{hs}Ds{ds} {dtype}", dtype, run


CASES = (gather_cases, pool_cases, spmm_cases, time_conv_cases, kv_cases)


# ---------------------------------------------------------------------------------------


def entry_points() -> dict[str, JITFunction]:
    """Every ``*_kernel`` JIT function defined in fastcore.kernels."""
    import fastcore.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            own = isinstance(value, JITFunction) and value.fn.__module__ == module.__name__
            if own and name.endswith("_kernel"):
                found[f"{module.__name__}.{name}"] = value
    return found


def _compile(launch: Launch, target: GPUTarget) -> tuple[str, float, int]:
    from triton.compiler import ASTSource

    start = time.perf_counter()
    src = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(src, target=target, options=launch.options)
    cubin = compiled.asm.get("cubin", b"")
    if not cubin:
        raise RuntimeError(f"{launch.name}: no cubin produced")
    return launch.name, time.perf_counter() - start, len(cubin)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the compiled specialisations here")
    args = parser.parse_args(argv)

    import fastcore
    from fastcore import _backend

    # The kernels are real JIT functions here (no interpreter); allow the Triton backend
    # on CPU tensors so that the ops reach their launchers, which only get recorded.
    _backend.TRITON_INTERPRET = True
    target = GPUTarget("cuda", args.arch, 32)
    recorder = Recorder(target)
    failures = []
    dtypes_seen: dict[str, set] = {}
    with recorder, fastcore.use_backend("triton"):
        for make in CASES:
            for case, dtype, run in make(args.quick):
                recorder.case = case
                before = {k: set(v.cases) for k, v in recorder.launches.items()}
                try:
                    run()
                except Exception:
                    failures.append(
                        f"{case}: the op failed before compiling\n{traceback.format_exc()}"
                    )
                for key, launch in recorder.launches.items():
                    if case in launch.cases and case not in before.get(key, set()):
                        dtypes_seen.setdefault(launch.name, set()).add(str(dtype))
                print(f"recorded  {case}", flush=True)

    for name in sorted(set(entry_points()) - set(dtypes_seen)):
        failures.append(f"{name}: never launched by any op case (add a case to this script)")

    launches = list(recorder.launches.values())
    print(
        f"compiling {len(launches)} specialisations of {len(dtypes_seen)} kernels for "
        f"{target.backend} sm_{target.arch} ({args.jobs} jobs)",
        flush=True,
    )
    start = time.perf_counter()
    compiled = []
    # Threads: triton.compile spends its time in MLIR passes and ptxas (no GIL).
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_compile, launch, target): launch for launch in launches}
        for future in concurrent.futures.as_completed(futures):
            launch = futures[future]
            try:
                compiled.append(future.result())
            except Exception:
                failures.append(
                    f"{launch.name} {launch.signature} {launch.constexprs}: compile failed\n"
                    f"{traceback.format_exc()}"
                )
    seconds = time.perf_counter() - start
    for name in sorted(dtypes_seen):
        count = sum(1 for launch in launches if launch.name == name)
        print(f"  {name}: {count} specialisations, dtypes {', '.join(sorted(dtypes_seen[name]))}")
    print(
        f"compiled {len(compiled)}/{len(launches)} in {seconds:.1f} s, "
        f"{sum(n for _, _, n in compiled) / 2**20:.1f} MiB of cubin"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        "kernel": launch.name,
                        "signature": launch.signature,
                        "constexprs": {str(k): repr(v) for k, v in launch.constexprs.items()},
                        "cases": sorted(launch.cases),
                    }
                    for launch in launches
                ],
                f,
                indent=1,
            )
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
