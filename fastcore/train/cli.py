"""``python -m fastcore.train --config configs/X.yaml [section.key=value ...]`` (its
``__main__`` calls :func:`main`); :func:`resolve_config` and :func:`run` for scripts.

The same command under ``torchrun --nproc_per_node=N -m fastcore.train ...`` runs DDP.
``--resume PATH|latest`` continues a run exactly; ``--describe [JOB]`` prints every config
field with its default and documentation.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastcore.train import checkpoint as ckpt_io
from fastcore.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    describe,
    load_raw,
    validate,
)
from fastcore.train.distributed import setup, teardown
from fastcore.train.jobs import JobContext, load_job
from fastcore.train.trainer import (
    Trainer,
    TrainingDiverged,
    close_logging,
    configure_logging,
    log_to_files,
    seed_everything,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastcore.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--resume", help="a checkpoint path, or 'latest' in the run's checkpoints/")
    p.add_argument(
        "--describe",
        nargs="?",
        const="",
        metavar="JOB",
        help="print every config field (and JOB's data/model fields) and exit",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.lr=3e-4)")
    return p.parse_args(argv)


def resolve_config(config: str | None, overrides: list[str]) -> Config:
    """The validated :class:`Config` of a YAML file with ``section.key=value`` overrides:
    every bad key or value is a one-line :class:`ConfigError` naming it."""
    raw = apply_overrides(load_raw(config), overrides)
    name = raw.get("job", Config.job)
    if not isinstance(name, str):
        raise ConfigError(f"job: expected str, got {name!r}")
    job = load_job(name)
    return build_config(raw, job.DataConfig, job.ModelConfig)


def run(cfg: Config, resume: str | None = None) -> dict[str, float]:
    """Train ``cfg``'s job (validated again first, so a config changed in code is checked
    too); returns the last validation metrics."""
    validate(cfg)
    dist_info = setup(cfg.train.device)
    # Global switches this run sets are put back afterwards (runs inside a larger program).
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    try:
        configure_logging(cfg.run_path, dist_info.rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.train.seed)
        ctx = JobContext(
            device=dist_info.device,
            seed=cfg.train.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            run_dir=cfg.run_path,
            precision=cfg.train.precision,
        )
        parts = load_job(cfg.job).build(cfg, ctx)
        return Trainer(cfg, parts, dist_info).fit(resume)
    except Exception as error:
        log_to_files(f"fastcore.train: error: {type(error).__name__}: {error}")
        raise
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        close_logging()
        teardown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.describe is not None:
            lines = describe(Config)
            if args.describe:
                job = load_job(args.describe)
                lines += [
                    "data:",
                    *describe(job.DataConfig, "  "),
                    "model:",
                    *describe(job.ModelConfig, "  "),
                ]
            print("\n".join(lines))
            return 0
        cfg = resolve_config(args.config, args.overrides)
        run(cfg, args.resume)
    except (
        ConfigError,
        FileNotFoundError,
        ckpt_io.CheckpointError,
        TrainingDiverged,
        ValueError,
    ) as e:
        print(f"fastcore.train: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0
