"""Ablations of temporal-encoder alignment, written to one JSON file.

``python -m fastcore.train.temporal_ablate --config configs/temporal_align.yaml
--out runs/temporal_ablation [--only a,b] [section.key=value ...]``

Each variant is the job of ``--config`` (plus the trailing overrides, e.g.
``train.max_steps=300`` for a quicker sweep) with the variant's own overrides, trained in
``<out>/<variant>``. Every variant is evaluated on the same held-out items (the evaluation
always uses the equal task mix) and reuses the LM warm-up its settings select
(``<out>/lm-<key>.pt``), so the rows differ only in what the variant changes. The
warm-up's curve probe has the encoder's token layout, so the variants of the layout
(``prefix_tokens_*``, ``tokens_time``) and ``warmup_text_only`` warm up an LM of their own;
the others share one. ``<out>/ablation.json`` maps each variant to its
overrides and its aligned and shuffled-control metrics (overall and per task) and is
rewritten after every variant, so an interrupted sweep keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastcore.train.cli import resolve_config, run

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "kernels_3": ["model.kernel_sizes=[3]"],
    "kernels_3_5_7_9_11": ["model.kernel_sizes=[3, 5, 7, 9, 11]"],
    "depth_1": ["model.depth=1"],
    "depth_3": ["model.depth=3"],
    "pooling_mean": ["model.pooling=mean"],
    "pooling_max": ["model.pooling=max"],
    "prefix_tokens_1": ["model.prefix_tokens=1"],
    "prefix_tokens_4": ["model.prefix_tokens=4"],
    "tokens_time": ["model.tokens=time", "model.prefix_tokens=4"],
    "warmup_text_only": ["model.lm_reader=none"],
    "projector_1": ["model.projector_layers=1"],
    "projector_3": ["model.projector_layers=3"],
    "mix_trend_feasibility": ["data.task_mix=[1, 0, 1]"],
    "mix_bottleneck_heavy": ["data.task_mix=[1, 2, 1]"],
}


def _summary(result: dict) -> dict:
    out = {}
    for cond, scores in result["conditions"].items():
        out[cond] = {
            k: scores[k]
            for k in ("numeric_accuracy", "classification_accuracy", "perplexity", "token_accuracy")
        }
        out[cond]["tasks"] = scores["tasks"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastcore.train.temporal_ablate", description=__doc__
    )
    p.add_argument("--config", default="configs/temporal_align.yaml")
    p.add_argument("--out", default="runs/temporal_ablation")
    p.add_argument("--only", help="comma-separated variant names (default: all)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    args = p.parse_args(argv)
    names = list(VARIANTS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "ablation.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    for name in names:
        overrides = [
            *args.overrides,
            *VARIANTS[name],
            f"run_dir={out / name}",
            f"model.lm_path={out / 'lm-{key}.pt'}",
        ]
        cfg = resolve_config(args.config, overrides)
        if cfg.job != "temporal_align":
            print(f"--config must be a temporal_align job, got {cfg.job!r}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        run(cfg)
        result = json.loads((cfg.run_path / "alignment.json").read_text())
        table[name] = {
            "overrides": VARIANTS[name],
            "common_overrides": args.overrides,
            "seconds": round(time.perf_counter() - start, 1),
            **_summary(result),
        }
        table_path.write_text(json.dumps(table, indent=2))
        a, s = table[name]["aligned"], table[name]["shuffled"]
        print(
            f"{name}: numeric {a['numeric_accuracy']:.3f} (control {s['numeric_accuracy']:.3f})"
            f"  classification {a['classification_accuracy']:.3f} (control "
            f"{s['classification_accuracy']:.3f})",
            flush=True,
        )
    print(f"wrote {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
