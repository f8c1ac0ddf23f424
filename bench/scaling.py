"""How the cost grows: pooling, unpooling and spmm from 1k to 1M nodes, in a plain process
and with the training layer's allocator setting, beside the baselines and the machine's copy
bandwidth measured at the same size.

    .venv/bin/python bench/scaling.py                # the three settings, each in its own process
    .venv/bin/python bench/scaling.py --quick        # 1k and 10k only (a minute)

Cases: ``x [BT, N, 64]`` float32 with (BT, N) = (64, 1k), (64, 10k), (16, 100k), (2, 1M);
pooling onto N/5 parents (every parent has a child, the rest random) as
``fastcore.nn.GraphPooling`` runs it (``segment_csr`` with the level's cached CSR), sum and
mean, against ``index_add_`` (and its count division); unpooling (``gather``) against
``index_select``; spmm over a random graph with 3N edges (x and edge-weight gradients off:
the baseline's CSR values take none) against ``torch.sparse.mm`` with the CSR built once and
``x`` already in its ``(N, BT*64)`` layout (the best case for the baseline), forward and
forward+backward.

Every op's time is the median of repeated calls after a warm-up, each call allocating its
output as user code does; the op, its baseline and the copy run in interleaved rounds, so
the three see the same machine (on a shared VM the bandwidth drifts over seconds). "% copy"
is the op's minimal traffic (bytes read + written once) over its time, as a fraction of the bandwidth of ``copy_`` of the same input into a
preallocated tensor at that size (the machine's bandwidth, no allocation: the ops pay for
their output's, so the plain setting's page faults count against them).

``plain``: the process as a user starts it (fastcore's operators allocate their outputs
from the blocks their earlier outputs freed, ``fastcore.ops.memory``, on by default; every
other tensor from malloc). ``kept``: the allocator setting the training layer switches on
(``fastcore.train.allocator.keep_freed_memory``: every CPU tensor through that cache).
``uncached``: ``FASTCORE_CPU_CACHE=0``, everything from malloc, as before the operators had
the cache (each call pays its output's page faults). Each setting runs in its own process. Results: ``bench/results/<machine>-<date>-scaling.{json,md,png}``.

``--device cuda`` runs the same sweep on the GPU (one setting, ``cuda``: PyTorch's caching
allocator; every call synchronised), as ``make gpu-check``'s long set does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from compare import device_slug, machine_info  # bench/compare.py: the same machine record

ROOT = Path(__file__).resolve().parents[1]
H = 64
CASES = [(64, 1_000), (64, 10_000), (16, 100_000), (2, 1_000_000)]
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timeit(fns, min_time: float, min_reps: int = 5, max_reps: int = 200) -> list[float]:
    """Median seconds per call of each of ``fns``, measured in interleaved rounds (one call
    of each in turn, after two warm-up calls each) so that all of them see the same machine:
    on a shared VM the bandwidth drifts over seconds, and timing them one after the other
    compared different machines."""
    for fn in fns:
        fn()
        fn()
    _sync()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or (
        time.perf_counter() - start < min_time * len(fns) and len(times[0]) < max_reps
    ):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            _sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def measure(bt: int, n: int, min_time: float) -> list[dict]:
    from fastcore import Graph, ops
    from fastcore.ops import index_csr

    g = torch.Generator().manual_seed(0)
    parents = n // 5
    x = torch.randn(bt, n, H, generator=g)
    index = torch.cat(
        [torch.arange(parents), torch.randint(0, parents, (n - parents,), generator=g)]
    )
    index = index[torch.randperm(n, generator=g)]
    perm, ptr = index_csr(index, parents)
    counts = torch.bincount(index, minlength=parents).clamp_min(1).to(x.dtype)[:, None]
    pooled = torch.randn(bt, parents, H, generator=g)
    edges = 3 * n
    edge_index = torch.randint(0, n, (2, edges), generator=g)
    graph = Graph(edge_index, n)
    weight = torch.rand(edges, generator=g)
    adjacency = torch.sparse_coo_tensor(
        torch.stack([edge_index[1], edge_index[0]]), weight, (n, n)
    ).to_sparse_csr()
    x_rows = x.permute(1, 0, 2).reshape(n, bt * H).contiguous()  # the baseline's layout
    grad_y = torch.randn(bt, n, H, generator=g)
    grad_rows = grad_y.permute(1, 0, 2).reshape(n, bt * H).contiguous()
    if DEVICE.type != "cpu":  # built on the CPU from the same seed, then moved
        x, index, perm, ptr, counts, pooled, weight, x_rows, grad_y, grad_rows = (
            t.to(DEVICE)
            for t in (x, index, perm, ptr, counts, pooled, weight, x_rows, grad_y, grad_rows)
        )
        graph, adjacency = graph.to(DEVICE), adjacency.to(DEVICE)
    xg = x.clone().requires_grad_()
    xg_rows = x_rows.clone().requires_grad_()

    in_bytes, pooled_bytes = x.nbytes, pooled.nbytes
    idx_bytes = 8 * n
    spmm_fwd_bytes = 2 * x.nbytes + edges * (8 + 4 + 8)  # x read once, y written, edges

    def pool(reduce):
        return lambda: ops.segment_csr(x, perm, ptr, 1, reduce, check=False)

    def base_pool(mean):
        def run():
            out = torch.zeros(bt, parents, H, device=DEVICE).index_add_(1, index, x)
            return out / counts if mean else out

        return run

    def spmm_fb():
        y = ops.spmm(xg, graph, weight, dim=1)
        y.backward(grad_y)
        xg.grad = None

    def sparse_fb():
        y = torch.sparse.mm(adjacency, xg_rows)
        y.backward(grad_rows)
        xg_rows.grad = None

    rows = []
    dst = torch.empty_like(x)

    def copy():
        dst.copy_(x)

    specs = [
        (
            "pool sum",
            pool("sum"),
            base_pool(False),
            "index_add_",
            in_bytes + pooled_bytes + idx_bytes,
        ),
        (
            "pool mean",
            pool("mean"),
            base_pool(True),
            "index_add_ / count",
            in_bytes + pooled_bytes + idx_bytes,
        ),
        (
            "unpool",
            lambda: ops.gather(pooled, index, 1, check=False),
            lambda: pooled.index_select(1, index),
            "index_select",
            pooled_bytes + in_bytes + idx_bytes,
        ),
        (
            "spmm fwd",
            lambda: ops.spmm(x, graph, weight, dim=1),
            lambda: torch.sparse.mm(adjacency, x_rows),
            "torch.sparse.mm (CSR)",
            spmm_fwd_bytes,
        ),
        ("spmm fwd+bwd", spmm_fb, sparse_fb, "torch.sparse.mm (CSR)", 2 * spmm_fwd_bytes),
    ]
    for name, ours, base, base_name, traffic in specs:
        t_ours, t_base, t_copy = timeit([ours, base, copy], min_time)
        copy_bw = 2 * in_bytes / t_copy
        rows.append(
            {
                "op": name,
                "BT": bt,
                "N": n,
                "H": H,
                "rows": bt * n,
                "fastcore_s": t_ours,
                "baseline": base_name,
                "baseline_s": t_base,
                "speedup": t_base / t_ours,
                "traffic_bytes": traffic,
                "copy_GBps": copy_bw / 1e9,
                "fastcore_GBps": traffic / t_ours / 1e9,
                "pct_copy": 100 * traffic / t_ours / copy_bw,
            }
        )
        print(
            f"  {name:13s} BT{bt:<3d} N{n:<8d} fastcore {t_ours * 1e3:9.3f} ms  "
            f"{base_name} {t_base * 1e3:9.3f} ms  x{t_base / t_ours:5.2f}  "
            f"{rows[-1]['pct_copy']:5.1f}% of copy ({copy_bw / 1e9:.1f} GB/s)",
            flush=True,
        )
    return rows


def child(setting: str, cases, min_time: float) -> list[dict]:
    global DEVICE
    if setting == "cuda":
        DEVICE = torch.device("cuda")
        print(f"[{setting}] {torch.cuda.get_device_name()}", flush=True)
    elif setting == "kept":
        from fastcore.train.allocator import keep_freed_memory

        print(f"[{setting}] {keep_freed_memory()}", flush=True)
    elif setting == "uncached":
        from fastcore.ops import memory

        memory.cache_outputs(False)
        print(f"[{setting}] FASTCORE_CPU_CACHE=0: the operators' outputs from malloc", flush=True)
    else:
        print(f"[{setting}] the process as it starts (the operators' output cache on)", flush=True)
    out = []
    for bt, n in cases:
        for row in measure(bt, n, min_time):
            row["setting"] = setting
            out.append(row)
    return out


def write_report(rows: list[dict], stem: Path, info: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = [
        f"# Scaling: pooling, unpooling, spmm from 1k to 1M nodes ({info['date']})",
        "",
        f"{info['gpu'] if any(r['setting'] == 'cuda' for r in rows) else info['cpu']}, "
        f"{info['cores']} cores, torch {info['torch']}, {info['threads']} "
        f"threads, float32, H = {H}. Command: `{info['command']}` (bench/scaling.py says "
        "what each column means).",
        "",
        "| setting | op | BT x N | fastcore ms | baseline | baseline ms | speedup | "
        "fastcore GB/s | copy GB/s | % copy |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['op']} | {r['BT']} x {r['N']:,} | {r['fastcore_s'] * 1e3:.3f} | "
            f"{r['baseline']} | {r['baseline_s'] * 1e3:.3f} | {r['speedup']:.2f}x | "
            f"{r['fastcore_GBps']:.2f} | {r['copy_GBps']:.2f} | {r['pct_copy']:.0f}% |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ops_ = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops_), figsize=(4 * len(ops_), 3.6), sharey=False)
    for ax, op in zip(axes, ops_, strict=True):
        for setting, style in (("plain", "-"), ("kept", "--"), ("uncached", "-."), ("cuda", ":")):
            sel = [r for r in rows if r["op"] == op and r["setting"] == setting]
            if not sel:
                continue
            work = [r["rows"] for r in sel]
            ax.loglog(work, [r["fastcore_s"] * 1e3 for r in sel], "o" + style, color="C0",
                      label=f"fastcore ({setting})")  # fmt: skip
            ax.loglog(work, [r["baseline_s"] * 1e3 for r in sel], "s" + style, color="C1",
                      label=f"{sel[0]['baseline']} ({setting})")  # fmt: skip
        ax.set_title(op)
        ax.set_xlabel("rows (BT x N)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per call")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k nodes only")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--settings", default=None, help="default: plain,kept,uncached (cpu), cuda")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", help="result stem (default bench/results/<machine>-<date>-scaling)"
    )
    args = parser.parse_args()
    cases = CASES[:2] if args.quick else CASES
    if args.child:
        rows = child(args.child, cases, args.min_time)
        Path(args.out).write_text(json.dumps(rows))
        return
    settings = args.settings or ("cuda" if args.device == "cuda" else "plain,kept,uncached")
    rows = []
    for setting in settings.split(","):
        tmp = ROOT / "bench" / f".scaling-{setting}.json"
        cmd = [sys.executable, __file__, "--child", setting, "--out", str(tmp),
               "--min-time", str(args.min_time)] + (["--quick"] if args.quick else [])  # fmt: skip
        subprocess.run(cmd, check=True)
        rows += json.loads(tmp.read_text())
        tmp.unlink()
    info = machine_info()
    info["threads"] = info["torch_threads"]
    info["date"] = dt.date.today().isoformat()
    info["command"] = "python bench/scaling.py" + (" --quick" if args.quick else "")
    if args.device == "cuda":
        info["command"] += " --device cuda"
        info["gpu"] = torch.cuda.get_device_name()
    stem = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / f"{device_slug(info)}-{info['date']}-scaling"
    )
    write_report(rows, stem, info)
    print(f"wrote {stem}.md/.json/.png")
    worst = min((r for r in rows if r["op"].startswith("pool")), key=lambda r: r["pct_copy"])
    print(
        f"lowest pooling bandwidth: {worst['pct_copy']:.0f}% of copy ({worst['setting']}, N={worst['N']:,})"
    )
    assert all(math.isfinite(r["fastcore_s"]) for r in rows)


if __name__ == "__main__":
    main()
