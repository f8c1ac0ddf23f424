"""The basin job's report: ``python -m fastcore.train.basin_report --runs runs/basin``.

Reads the trained runs under ``--runs`` (``hierarchical/`` and ``gru/``, each a
``fastcore.train`` run directory with ``config.yaml`` and ``checkpoints/best.pt``),
forecasts every validation and test window with each, adds the persistence (the last
observed discharge, carried forward over the horizon) and climatology (the training days'
mean for that day of year) baselines, and writes to ``--runs``:

* ``metrics.json``: NSE, KGE, RMSE, MAE, R² per model and split (median over basins, mean
  over lead times, plus per lead), and the per-basin NSE on the test split;
* ``predictions_test.csv``: every test forecast (origin day, lead, basin, predicted and
  observed m³/s), written chunk by chunk; :func:`stream_predictions` does the same while
  forecasting, so a long inference never holds every forecast in memory;
* ``report.md`` with ``loss.png`` (training loss and validation NSE of both runs),
  ``hydrographs.png`` (observed vs forecast at three gauges, lead 1) and ``nse.png``
  (per-basin test NSE of every model).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from fastcore import metrics
from fastcore.data.basin import BasinWindows, Prepared, climatology
from fastcore.train import checkpoint as ckpt_io
from fastcore.train.basin import build, forecast_metrics, predict
from fastcore.train.cli import resolve_config
from fastcore.train.jobs import JobContext

MODELS = ("hierarchical", "gru")


def persistence(windows: BasinWindows, prepared: Prepared) -> torch.Tensor:
    """``[W, S, N]``: the last observed (normalised) discharge at or before each origin
    (0 before a basin's first observation)."""
    target = prepared.target
    days = torch.arange(target.shape[0])[:, None].expand_as(target)
    # the index of the latest observed day so far, per basin (-1: none yet)
    latest = torch.where(torch.isfinite(target), days, -1).cummax(0).values
    filled = torch.nan_to_num(target.gather(0, latest.clamp_min(0)), nan=0.0)
    filled = torch.where(latest >= 0, filled, 0.0)
    last = filled[windows.origins]
    return last[:, None, :].expand(-1, windows.horizon, -1).clone()


def climatology_forecast(windows: BasinWindows, prepared: Prepared) -> torch.Tensor:
    clim = climatology(prepared)
    leads = torch.arange(1, windows.horizon + 1)
    days = windows.origins[:, None] + leads[None, :]
    return clim[prepared.doy[days] - 1]


def write_forecasts_csv(
    path: Path,
    windows: BasinWindows,
    prepared: Prepared,
    chunks: Iterable[tuple[int, torch.Tensor]],
) -> int:
    """Write forecasts arriving as ``(first window index, normalised [w, S, N])`` chunks to
    CSV in m³/s, one chunk at a time (never all of them in memory); returns the rows."""
    scaler = prepared.scaler
    horizon, nodes = windows.horizon, prepared.target.shape[1]
    lead = np.repeat(np.arange(1, horizon + 1), nodes)
    basin = np.tile(np.arange(nodes), horizon)
    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["origin_day", "lead", "basin", "predicted_m3s", "observed_m3s"])
        for start, pred01 in chunks:
            span = range(start, start + pred01.shape[0])
            pred = scaler.inverse(pred01).reshape(len(span), -1).numpy()
            obs = scaler.inverse(windows.batch(span)[2]).reshape(len(span), -1).numpy()
            for w, origin in enumerate(windows.origins[start : span.stop].tolist()):
                observed = ["" if np.isnan(o) else f"{o:.4f}" for o in obs[w]]
                writer.writerows(
                    zip(
                        [origin] * lead.size,
                        lead.tolist(),
                        basin.tolist(),
                        [f"{p:.4f}" for p in pred[w]],
                        observed,
                        strict=True,
                    )
                )
            rows += pred.size
    return rows


def stream_predictions(
    model, windows: BasinWindows, prepared: Prepared, path: Path, device, chunk: int = 64
) -> int:
    """Forecast ``windows`` with ``model`` ``chunk`` windows at a time, each chunk written
    to CSV before the next is computed: a long inference never holds all of them."""
    chunks = (
        (
            start,
            predict(model, windows, chunk, device, range(start, min(start + chunk, len(windows)))),
        )
        for start in range(0, len(windows), chunk)
    )
    return write_forecasts_csv(path, windows, prepared, chunks)


def load_run(run_dir: Path):
    cfg = resolve_config(str(run_dir / "config.yaml"), [])
    ctx = JobContext(torch.device("cpu"), cfg.train.seed, 0, 1, run_dir, cfg.train.precision)
    parts = build(cfg, ctx)
    state = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    ckpt_io.check_fingerprint(state, parts.model, run_dir / "checkpoints" / "best.pt", cfg.job)
    parts.model.load_state_dict(state["model"])
    parts.model.eval()
    return cfg, parts


def curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            train[row["step"]] = row["loss"]
        elif row["kind"] == "val" and "val_nse" in row:
            val[row["step"]] = row["val_nse"]
    return sorted(train.items()), sorted(val.items())


def plots(out: Path, runs: dict[str, Path], test: dict, windows, prepared, gauges) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in runs.items():
        tr, va = curves(run_dir)
        a.plot([s for s, _ in tr], [v for _, v in tr], label=name, lw=0.8)
        b.plot([s for s, _ in va], [v for _, v in va], "o-", label=name)
    a.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    b.set(xlabel="step", ylabel="median NSE", title="validation NSE (all leads)")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    scaler = prepared.scaler
    obs = scaler.inverse(windows.targets())
    fig, axes = plt.subplots(len(gauges), 1, figsize=(11, 2.6 * len(gauges)), sharex=True)
    for ax, (n, label) in zip(axes, gauges, strict=True):
        days = windows.origins + 1
        ax.plot(days, obs[:, 0, n], "k-", lw=1.2, label="observed")
        for name, pred in test["pred"].items():
            ax.plot(days, scaler.inverse(pred)[:, 0, n], lw=0.9, label=name)
        ax.set(ylabel="m³/s", title=label)
    axes[0].legend(ncol=5, fontsize=8)
    axes[-1].set_xlabel("day (test split), lead 1")
    fig.tight_layout()
    fig.savefig(out / "hydrographs.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4))
    order = torch.argsort(test["nse_basin"]["hierarchical"], descending=True)
    for name, values in test["nse_basin"].items():
        ax.plot(values[order].clamp(min=-1.0).numpy(), ".", label=name, ms=4)
    ax.set(
        xlabel="fine basin (sorted by the hierarchical model's NSE)",
        ylabel="test NSE (clipped at -1)",
        title="per-basin NSE, lead 1",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "nse.png", dpi=110)
    plt.close(fig)


def report(runs_root: Path) -> dict:
    runs = {name: runs_root / name for name in MODELS}
    for path in runs.values():
        if not (path / "checkpoints" / "best.pt").is_file():
            raise FileNotFoundError(f"run {str(path)!r} has no checkpoints/best.pt: train it first")
    loaded = {name: load_run(path) for name, path in runs.items()}
    cfg, parts = loaded["hierarchical"]
    prepared: Prepared = parts.val_set.data
    results: dict = {"models": {}, "config": {"data": cfg.data.__dict__}}
    test_store: dict = {"pred": {}, "nse_basin": {}}
    for split in ("val", "test"):
        windows = BasinWindows(prepared, split, cfg.data.lookback, cfg.data.horizon)
        preds = {name: predict(p.model, windows, 64, "cpu") for name, (_, p) in loaded.items()}
        preds["persistence"] = persistence(windows, prepared)
        preds["climatology"] = climatology_forecast(windows, prepared)
        obs = prepared.scaler.inverse(windows.targets())
        for name, pred in preds.items():
            m = forecast_metrics(pred, windows, prepared)
            results["models"].setdefault(name, {})[split] = m
            if split == "test":
                test_store["pred"][name] = pred
                basin = metrics.per_basin(prepared.scaler.inverse(pred[:, 0]), obs[:, 0])
                test_store["nse_basin"][name] = basin["nse"]
        if split == "test":
            test_windows = windows
    results["test_nse_per_basin"] = {
        k: [None if math.isnan(x) else x for x in v.tolist()]
        for k, v in test_store["nse_basin"].items()
    }
    test_pred = test_store["pred"]["hierarchical"]  # already computed: written in chunks
    rows = write_forecasts_csv(
        runs_root / "predictions_test.csv",
        test_windows,
        prepared,
        ((s, test_pred[s : s + 64]) for s in range(0, test_pred.shape[0], 64)),
    )
    results["predictions_test_rows"] = rows
    (runs_root / "metrics.json").write_text(json.dumps(results, indent=1))

    upstream = parts.model.static[:, 2] if hasattr(parts.model, "static") else None
    order = torch.argsort(upstream, descending=True) if upstream is not None else torch.arange(3)
    gauges = [
        (int(order[0]), f"largest basin (#{int(order[0])})"),
        (int(order[len(order) // 2]), f"median basin (#{int(order[len(order) // 2])})"),
        (int(order[-1]), f"smallest basin (#{int(order[-1])})"),
    ]
    plots(runs_root, runs, test_store, test_windows, prepared, gauges)
    write_markdown(runs_root, results, cfg)
    return results


def write_markdown(out: Path, results: dict, cfg) -> None:
    lines = [
        "# Basin forecasting report",
        "",
        f"Data: {cfg.data.network} network, {cfg.data.years} simulated years, lookback "
        f"{cfg.data.lookback} days, horizon {cfg.data.horizon} days. Metrics on de-normalised "
        "discharge (m³/s): median over fine basins, mean over lead times.",
        "",
    ]
    for split in ("val", "test"):
        lines += [
            f"## {split}",
            "",
            "| model | NSE | KGE | RMSE | MAE | R² | NSE by lead |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, per in results["models"].items():
            m = per[split]
            leads = ", ".join(f"{v:.3f}" for v in m["nse_lead"])
            lines.append(
                f"| {name} | {m['nse']:.3f} | {m['kge']:.3f} | {m['rmse']:.2f} | "
                f"{m['mae']:.2f} | {m['r2']:.3f} | {leads} |"
            )
        lines.append("")
    lines += [
        "## Plots",
        "",
        "![losses](loss.png)",
        "",
        "![hydrographs](hydrographs.png)",
        "",
        "![per-basin NSE](nse.png)",
        "",
        f"Every test forecast: `predictions_test.csv` ({results['predictions_test_rows']} rows).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcore.train.basin_report")
    p.add_argument("--runs", default="runs/basin", help="the directory holding the runs")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = report(Path(args.runs))
    for split in ("val", "test"):
        print(
            f"{split}: "
            + "  ".join(
                f"{name} NSE {per[split]['nse']:.3f}" for name, per in results["models"].items()
            )
        )
    print(f"report: {Path(args.runs) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
