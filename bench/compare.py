"""Turn a pytest-benchmark JSON run into fastcore's ratio table and results file.

    python bench/compare.py RUN.json [RUN.json ...] [--out bench/results] [--tag NAME]

Each RUN.json is one pytest-benchmark process (``make bench`` runs one per bench file, so
that one file's memory does not carry into the next) with its own copy benchmark: its
groups are graded against the copy bandwidth of the same process.

For each benchmark group (op, direction, shape) every provider's median is compared with
the group's best baseline (the fastest of what users run today, ``baseline=True``)
measured in the same run:

* ``time ratio`` = provider median / best baseline median (below 1 is faster),
* ``speedup`` = best baseline median / provider median,
* ``GB/s`` = the bytes the operation must move / median, and ``of copy`` = that bandwidth
  as a fraction of the machine's copy bandwidth measured in the same run,
* ``peak MB`` = the peak extra memory of one call, where the benchmark records it.

Writes ``<out>/<device>-<date>.md`` (the table) and ``<out>/<device>-<date>.json`` (machine
info, copy bandwidth, the table's rows and the raw run), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that set how CPU memory is allocated: glibc's (make bench's
# BENCH_ENV) and the operators' output cache (fastcore.ops.memory).
ALLOCATOR_ENV = ("MALLOC_", "FASTCORE_CPU_CACHE")


def allocator_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ALLOCATOR_ENV)}


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        # allocator settings of the run (see BENCH_ENV in the Makefile)
        "malloc_env": allocator_env(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def device_slug(info: dict) -> str:
    name = info["gpu"] or f"cpu{info['cores']}-{info['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def build_rows(run: dict) -> tuple[float | None, list[dict]]:
    benches = run["benchmarks"]
    copy = [b for b in benches if b["extra_info"].get("op") == "copy"]
    copy_bw = copy[0]["extra_info"]["bytes"] / copy[0]["stats"]["median"] if copy else None
    groups: dict[str, list[dict]] = {}
    for b in benches:
        if b["extra_info"].get("op") != "copy":
            groups.setdefault(b["group"], []).append(b)
    rows = []
    for group, members in sorted(groups.items()):
        base = sorted(
            (b for b in members if b["extra_info"].get("baseline")),
            key=lambda b: b["stats"]["median"],
        )
        base_median = base[0]["stats"]["median"] if base else None
        for b in sorted(members, key=lambda b: b["stats"]["median"]):
            info, median = b["extra_info"], b["stats"]["median"]
            # Whole training steps record samples, not bytes: throughput instead of GB/s.
            bandwidth = info["bytes"] / median if "bytes" in info else None
            rows.append(
                {
                    "group": group,
                    "op": info["op"],
                    "direction": info["direction"],
                    "shape": info["shape"],
                    "provider": info["provider"],
                    "baseline": base[0]["extra_info"]["provider"] if base else None,
                    "median_s": median,
                    "iqr_s": b["stats"]["iqr"],
                    "rounds": b["stats"]["rounds"],
                    "time_ratio": median / base_median if base_median else None,
                    "speedup": base_median / median if base_median else None,
                    "gb_per_s": bandwidth / 1e9 if bandwidth else None,
                    "copy_fraction": bandwidth / copy_bw if copy_bw and bandwidth else None,
                    "samples_per_s": info["samples"] / median if "samples" in info else None,
                    "peak_mb": info["peak_bytes"] / 2**20 if "peak_bytes" in info else None,
                }
            )
    return copy_bw, rows


def table(copy_bws: list[float | None], rows: list[dict], info: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"# Benchmarks on {info['gpu'] or info['cpu']} ({info['cores']} cores), torch {info['torch']}",
        "",
        f"Allocator environment: {' '.join(f'{k}={v}' for k, v in info['malloc_env'].items()) or 'default'}.",
        "",
        "Copy bandwidth (measured in each process): "
        f"{', '.join(f(bw and bw / 1e9, '.1f') for bw in copy_bws)} GB/s. "
        "time ratio = provider / best baseline median (lower is better); speedup = its "
        "inverse; the best baseline is the fastest of what users run today in each group.",
        "",
        "| op | dir | shape | provider | median ms | best baseline | time ratio | speedup | GB/s | of copy | peak MB | samples/s |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['direction']} | {r['shape']} | {r['provider']} | "
            f"{r['median_s'] * 1e3:.3f} | {r['baseline'] or '-'} | {f(r['time_ratio'], '.2f')} | {f(r['speedup'], '.2f')}x | "
            f"{f(r['gb_per_s'], '.1f')} | {f(r['copy_fraction'], '.0%')} | {f(r.get('peak_mb'), '.0f')} | "
            f"{f(r.get('samples_per_s'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", type=Path, nargs="+", help="pytest-benchmark --benchmark-json outputs"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix for the file names (a partial run)")
    args = parser.parse_args()

    runs = [json.loads(path.read_text()) for path in args.runs]
    info = machine_info()
    # The allocator settings the benchmarks ran under, as each recorded them (this process's
    # own environment only for results recorded without them).
    recorded = {
        json.dumps(b["extra_info"]["allocator_env"], sort_keys=True)
        for r in runs
        for b in r["benchmarks"]
        if "allocator_env" in b["extra_info"]
    }
    if len(recorded) > 1:
        raise SystemExit(f"the runs were measured under different allocator settings: {recorded}")
    if recorded:
        info["malloc_env"] = json.loads(recorded.pop())
    copy_bws, rows = [], []
    for run in runs:
        copy_bw, run_rows = build_rows(run)
        copy_bws.append(copy_bw)
        rows += run_rows
    text = table(copy_bws, rows, info)
    stem = f"{device_slug(info)}-{datetime.date.today().isoformat()}"
    if args.tag:
        stem += f"-{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    result = {
        "machine": info,
        "copy_bandwidth_gb_per_s": [bw and bw / 1e9 for bw in copy_bws],
        "rows": rows,
        "raw": runs,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
