"""``python -m fastcore.train --config configs/X.yaml [section.key=value ...]`` (its
``__main__`` calls :func:`main`); :func:`resolve_config` and :func:`run` for scripts.

The same command under ``torchrun --nproc_per_node=N -m fastcore.train ...`` runs DDP.
``--resume PATH|latest`` continues a run exactly; ``--describe [JOB]`` prints every config
field with its default and documentation, and ``--config X --describe`` every field of
X's job with its value in X (and the overrides) (:func:`describe_config`). ``python -m fastcore.train evaluate --run DIR``
evaluates a run's checkpoint on a split and writes its metrics and predictions
(:func:`evaluate_run`); :func:`load_run` gives a script the run's config and model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcore.train import checkpoint as ckpt_io
from fastcore.train.allocator import kept_freed_memory
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
from fastcore.train.jobs import JobContext, JobParts, load_job
from fastcore.train.trainer import (
    Trainer,
    TrainingDiverged,
    close_logging,
    configure_logging,
    evaluate_dataset,
    log_to_files,
    seed_everything,
)

log = logging.getLogger("fastcore.train")

SPLITS = ("train", "val", "test")

EVALUATE_USAGE = (
    "python -m fastcore.train evaluate --run DIR [--split val|test|train] "
    "[--checkpoint best|last|PATH] [--out FILE.json] [section.key=value ...]"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The training command's arguments (``--config``, ``--resume``, ``--describe`` and
    the overrides); argparse exits with status 2 on a malformed command line."""
    p = argparse.ArgumentParser(
        prog="python -m fastcore.train",
        description=__doc__.split("\n")[0],
        epilog=f"evaluate a finished run: {EVALUATE_USAGE} (see 'evaluate --help')",
    )
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--resume", help="a checkpoint path, or 'latest' in the run's checkpoints/")
    p.add_argument(
        "--describe",
        nargs="?",
        const="",
        metavar="JOB",
        help="print every config field (and JOB's data/model fields) with its default and "
        "exit; with --config, the fields of the config's job with their values in it",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.lr=3e-4)")
    return p.parse_args(argv)


def parse_evaluate_args(argv: list[str]) -> argparse.Namespace:
    """The ``evaluate`` subcommand's arguments (``argv`` without the word ``evaluate``)."""
    p = argparse.ArgumentParser(
        prog="python -m fastcore.train evaluate",
        description="Evaluate a run's checkpoint on a split: its metrics and predictions, "
        "written into the run directory (docs/training.md, 'Evaluating a run').",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="the run's directory (run_dir)")
    p.add_argument("--split", default="val", choices=SPLITS, help="the split (default: val)")
    p.add_argument(
        "--checkpoint",
        default="best",
        metavar="best|last|PATH",
        help="best.pt (default; the newest step checkpoint when the run has none), last "
        "(the newest step-*.pt), or a checkpoint file (a path, or a name in DIR/checkpoints)",
    )
    p.add_argument(
        "--out",
        metavar="FILE.json",
        help="the metrics file (default DIR/eval/<split>-<checkpoint>.json); the predictions "
        "go next to it, as FILE.pt",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value applied to the run's config (e.g. train.device=cpu)",
    )
    return p.parse_args(argv)


def resolve_config(config: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The validated :class:`~fastcore.train.config.Config` of a YAML file with
    ``section.key=value`` overrides, as the command builds it.

    The file's ``job:`` (default ``example``) selects the job (:func:`load_job`), whose
    ``DataConfig``/``ModelConfig`` type the ``data``/``model`` sections; every field's type
    and range is checked.

    Args:
        config: the YAML file (``configs/<job>.yaml``, a run's ``config.yaml``), or None
            for the defaults alone.
        overrides: ``section.key=value`` items applied to the file first, values parsed as
            YAML (``train.lr=3e-4``, ``train.betas=[0.9,0.95]``, ``train.patience=null``).

    Returns:
        The config; ``run(cfg)`` trains it.

    Raises:
        FileNotFoundError: ``config`` does not exist.
        ConfigError: the first bad key or value (unknown, wrong type, out of range, an
            unknown job), named in one line.

    Examples:
        >>> cfg = resolve_config("configs/example.yaml", ["model.hidden=8", "train.lr=3e-4"])
        >>> cfg.job, cfg.model.hidden, cfg.train.lr
        ('example', 8, 0.0003)
    """
    raw = apply_overrides(load_raw(config), list(overrides))
    name = raw.get("job", Config.job)
    if not isinstance(name, str):
        raise ConfigError(f"job: expected str, got {name!r}")
    job = load_job(name)
    return build_config(raw, job.DataConfig, job.ModelConfig)


def describe_config(
    job: str | None = None, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> list[str]:
    """What ``--describe`` prints: one line per config field, with its meaning and what a
    valid value is.

    Without ``config`` and ``overrides``: the defaults of the common sections, and of
    ``job``'s ``data``/``model`` sections when a job is named. With them: the config
    :func:`resolve_config` builds (its job, or ``job`` when only overrides are given), every
    field showing its value and, where that is not the default, ``default X``; a first
    comment line names the job and the file.

    Raises:
        ConfigError: an unknown job, a bad value in the file, or ``job`` that differs from
            the config's ``job:``.
        FileNotFoundError: ``config`` does not exist.

    Examples:
        >>> lines = describe_config(config="configs/example.yaml", overrides=["train.lr=3e-4"])
        >>> lines[0]
        "# job example from configs/example.yaml with train.lr=3e-4: each field's value ('default X' where it is not the default)"
        >>> next(x for x in lines if x.startswith("  lr:"))
        '  lr: 0.0003  # default 0.001; a finite float > 0; AdamW peak learning rate'
    """
    if config is None and not overrides:
        lines = describe(Config)
        if job:
            module = load_job(job)
            lines += [
                "data:",
                *describe(module.DataConfig, "  "),
                "model:",
                *describe(module.ModelConfig, "  "),
            ]
        return lines
    extra = [f"job={job}"] if job and config is None else []
    cfg = resolve_config(config, [*extra, *overrides])
    if job and cfg.job != job:
        raise ConfigError(
            f"--describe {job}: the config {str(config)!r} runs job {cfg.job!r}; name no job "
            "(--config X --describe) to describe the config's"
        )
    where = str(config) if config is not None else "the defaults"
    if overrides:
        where += " with " + " ".join(overrides)
    return [
        f"# job {cfg.job} from {where}: each field's value ('default X' where it is not the "
        "default)",
        *describe(Config, values=cfg),
        "data:",
        *describe(type(cfg.data), "  ", cfg.data),
        "model:",
        *describe(type(cfg.model), "  ", cfg.model),
    ]


@contextlib.contextmanager
def run_switches(cfg: Config) -> Iterator[str]:
    """``train.threads``, ``train.deterministic`` and ``train.keep_freed_memory``
    (:mod:`fastcore.train.allocator`) switched on for the block and put back afterwards (a
    run inside a larger program leaves the process as it found it). Yields the allocator's
    log line."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        with kept_freed_memory(cfg.train.keep_freed_memory) as allocator:
            yield allocator
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])


def run(cfg: Config, resume: str | None = None) -> dict[str, float]:
    """Train ``cfg``'s job: what the command does after :func:`resolve_config`.

    ``cfg`` is validated again first, so a config changed in code (``dataclasses.replace``)
    is checked as strictly as a resolved one. Under torchrun every process calls this.

    Args:
        cfg: the config.
        resume: a checkpoint path, ``latest`` (the newest ``step-*.pt`` in the run's
            ``checkpoints/``), or None for a fresh run.

    Returns:
        The last validation's metrics (``val_loss``, ``val_<metric>``; ``{}`` for a job
        without a validation set).

    Raises:
        ConfigError: a bad value, or a ``checkpoint.best_metric`` the job does not report.
        CheckpointError: ``resume`` is missing, unreadable or from another model.
        TrainingDiverged: ``train.nan_patience`` non-finite steps in a row.
        ValueError / FileNotFoundError: what the job's ``build`` rejects (its data).
    """
    validate(cfg)
    dist_info = setup(cfg.train.device)
    try:
        with run_switches(cfg) as allocator:
            configure_logging(cfg.run_path, dist_info.rank)
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
            trainer = Trainer(cfg, parts, dist_info)
            trainer.allocator_note = allocator
            return trainer.fit(resume)
    except Exception as error:
        log_to_files(f"fastcore.train: error: {type(error).__name__}: {error}")
        raise
    finally:
        close_logging()
        teardown()


# ---------------------------------------------------------------- finished runs


@dataclass
class LoadedRun:
    """A run loaded from its directory by :func:`load_run`.

    Attributes:
        cfg: the run's resolved config (its ``config.yaml``; ``run_dir`` set to the
            directory it was loaded from).
        parts: the job built again from ``cfg`` (datasets, hooks), its model holding the
            checkpoint's weights, in eval mode, on ``device``.
        checkpoint: the checkpoint file loaded.
        state: that checkpoint's contents (``step``, ``best``, ``metrics``, ...: see
            docs/training.md, "Checkpoints").
        device: where the model is.
    """

    cfg: Config
    parts: JobParts
    checkpoint: Path
    state: dict[str, Any]
    device: torch.device

    @property
    def model(self) -> nn.Module:
        """The job's model with the checkpoint's weights."""
        return self.parts.model


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """The checkpoint file ``which`` names in the run ``run_dir``.

    ``best``: ``checkpoints/best.pt``, or, when the run wrote none (no validation set, or no
    validation finished), the newest ``step-*.pt`` with a warning saying so; ``last``: the
    newest ``step-*.pt``; anything else: a file path, or a file name in ``checkpoints/``.

    Raises:
        CheckpointError: the run has no checkpoint of that kind.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    steps = ckpt_io.step_checkpoints(ckpt_dir)
    if which == "best":
        best = ckpt_dir / "best.pt"
        if best.is_file():
            return best
        if not steps:
            raise ckpt_io.CheckpointError(
                f"run {str(run_dir)!r} has no checkpoint: neither best.pt nor a step-*.pt in "
                f"{str(ckpt_dir)!r}"
            )
        log.warning(
            "no best.pt in %s (only a validation that improves checkpoint.best_metric writes "
            "one); using the newest step checkpoint, %s",
            ckpt_dir,
            steps[-1].name,
        )
        return steps[-1]
    if which == "last":
        if not steps:
            raise ckpt_io.CheckpointError(
                f"--checkpoint last: no step-*.pt checkpoint in {str(ckpt_dir)!r}"
            )
        return steps[-1]
    path = Path(which)
    if not path.is_file() and (ckpt_dir / which).is_file():
        path = ckpt_dir / which
    return path


def load_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> LoadedRun:
    """A run's config and model, with a checkpoint's weights, ready for inference.

    Reads ``<run_dir>/config.yaml`` (the resolved config the run wrote), builds the job
    from it again (the same data, splits and normalisation, under the run's
    ``train.threads``), and loads the checkpoint's weights into its model (checked against
    the model first). The model is returned in eval mode.

    Args:
        run_dir: the run's directory.
        checkpoint: ``best`` (default; falls back to the newest step checkpoint, with a
            warning, when the run has no best.pt), ``last`` (the newest ``step-*.pt``), or a
            checkpoint file (a path, or a name in ``<run_dir>/checkpoints``).
        overrides: ``section.key=value`` items applied to the run's config (for example
            ``train.device=cpu``).
        device: where to put the model (default: the config's ``train.device``).

    Returns:
        A :class:`LoadedRun` (``.cfg``, ``.model``, ``.parts``, ``.checkpoint``, ``.state``).

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``config.yaml``.
        ConfigError: the saved config, with ``overrides``, does not validate.
        CheckpointError: no such checkpoint, or one written for another job or model.

    Examples:
        >>> from fastcore.train import load_run  # doctest: +SKIP
        >>> loaded = load_run("runs/example")  # doctest: +SKIP
        >>> x, y = loaded.parts.val_set[0]  # doctest: +SKIP
        >>> loaded.model(x[None])  # next-step flow of every basin  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"run directory {str(run_dir)!r} has no config.yaml: expected the run_dir of a "
            "run of python -m fastcore.train"
        )
    cfg = resolve_config(config, overrides)
    cfg.run_dir = str(run_dir).replace("{", "{{").replace("}", "}}")
    validate(cfg)
    path = checkpoint_path(run_dir, checkpoint)
    state = ckpt_io.load(path)
    dev = torch.device(device) if device is not None else _device(cfg.train.device)
    with run_switches(cfg):
        seed_everything(cfg.train.seed)
        ctx = JobContext(dev, cfg.train.seed, 0, 1, run_dir, cfg.train.precision)
        parts = load_job(cfg.job).build(cfg, ctx)
    ckpt_io.check_frozen(parts.model, parts.frozen)
    ckpt_io.restore_model(state, parts.model, path, cfg.job, parts.frozen)
    parts.model.to(dev).eval()
    return LoadedRun(cfg=cfg, parts=parts, checkpoint=path, state=state, device=dev)


def evaluate_run(
    run_dir: str | Path,
    split: str = "val",
    checkpoint: str = "best",
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on a split; write its metrics and predictions.

    The metrics are those a validation logs, for the split: ``<split>_loss`` and
    ``<split>_<metric>`` (the means of the job's ``loss_fn`` over the split, in batches of
    ``train.batch_size / train.accum_steps``, as a one-process run validates), then the
    job's ``evaluate`` metrics (for ``val``, and for the splits its
    ``JobParts.evaluate_splits`` names). On the validation split of the checkpoint's step
    they are the ``val`` row ``metrics.jsonl`` logged, exactly, for a run trained by one
    process on the same device (to float rounding after torchrun, which shards the batches).

    Files (``out`` replaces the first; the second is always next to it):

    * ``<run_dir>/eval/<split>-<checkpoint>.json``: ``{"job", "run_dir", "split",
      "checkpoint", "step", "epoch", "samples", "batch_size", "metrics", "predictions"}``;
    * ``<run_dir>/eval/<split>-<checkpoint>.pt``: the job's ``predict`` tensors over the
      split, concatenated along dimension 0, and ``index`` (each row's dataset index);
      ``torch.load(path, weights_only=True)`` reads it.

    ``<checkpoint>`` is the checkpoint file's stem: ``best``, ``step-00000420``.

    Args:
        run_dir / checkpoint / overrides: as for :func:`load_run`.
        split: ``val`` (default), ``test`` or ``train``.
        out: the metrics file (must end in ``.json``).

    Returns:
        The metrics file's contents, plus ``"metrics_file"``.

    Raises:
        ValueError: an unknown split, one the job does not have, a job without a
            ``predict`` hook, or an ``out`` not ending in ``.json``.
        FileNotFoundError / ConfigError / CheckpointError: as for :func:`load_run`.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if out is not None and Path(out).suffix != ".json":
        raise ValueError(
            f"--out {str(out)!r}: expected a file ending in .json (the predictions go next to "
            "it, as .pt)"
        )
    loaded = load_run(run_dir, checkpoint, overrides)
    cfg, parts, model = loaded.cfg, loaded.parts, loaded.model
    if parts.predict is None:
        raise ValueError(
            f"job {cfg.job!r} has no predict hook (JobParts.predict), which evaluate needs "
            "to write predictions; give its build one (docs/own-job.md)"
        )
    dataset = {"train": parts.train_set, "val": parts.val_set, "test": parts.test_set}[split]
    if dataset is None:
        have = [s for s in SPLITS if getattr(parts, f"{s}_set") is not None]
        raise ValueError(
            f"--split {split}: job {cfg.job!r} has no {split} split (its JobParts.{split}_set "
            f"is None); it has {', '.join(have)}"
        )
    batch_size = cfg.train.batch_size // cfg.train.accum_steps
    with run_switches(cfg):
        means, predictions = evaluate_dataset(
            model,
            dataset,
            parts.loss_fn,
            batch_size,
            loaded.device,
            collate_fn=parts.collate_fn,
            precision=cfg.train.precision,
            predict=parts.predict,
        )
        metrics = {f"{split}_{k}": v for k, v in means.items()}
        if parts.evaluate is not None and (split == "val" or split in parts.evaluate_splits):
            with torch.no_grad():
                extra = parts.evaluate(model) if split == "val" else parts.evaluate(model, split)
            metrics.update({f"{split}_{k}": float(v) for k, v in extra.items()})
    run_dir = Path(run_dir)
    metrics_file = (
        Path(out)
        if out is not None
        else (run_dir / "eval" / f"{split}-{loaded.checkpoint.stem}.json")
    )
    predictions_file = metrics_file.with_suffix(".pt")
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.atomic_save(predictions, predictions_file)
    report = {
        "job": cfg.job,
        "run_dir": str(run_dir),
        "split": split,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.state["step"],
        "epoch": loaded.state.get("epoch"),
        "samples": len(dataset),
        "batch_size": batch_size,
        "metrics": metrics,
        "predictions": str(predictions_file),
    }
    metrics_file.write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "metrics_file": str(metrics_file)}


# -------------------------------------------------------------------------- command


def _evaluate_command(argv: list[str]) -> int:
    args = parse_evaluate_args(argv)
    configure_logging(None, 0)  # the fallback note on stderr; the run's train.log untouched
    try:
        report = evaluate_run(args.run, args.split, args.checkpoint, args.out, args.overrides)
    finally:
        close_logging()
    values = "  ".join(f"{k} {v:.6g}" for k, v in report["metrics"].items())
    print(
        f"evaluate: {report['checkpoint']} (step {report['step']}) on {report['split']} "
        f"({report['samples']} samples): {values}"
    )
    print(f"wrote {report['metrics_file']} and {report['predictions']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: train (``--config``, ``--resume``), ``--describe``, or ``evaluate``.

    Returns the exit status: 0, or 2 after printing a bad config, checkpoint or value as
    one line (``fastcore.train: error: ConfigError: ...``) on stderr, without a traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["evaluate"]:
            return _evaluate_command(argv[1:])
        args = parse_args(argv)
        if args.describe is not None:
            job, config, overrides = args.describe, args.config, list(args.overrides)
            if "=" in job:  # --config X --describe a.b=c: an override, not a job
                job, overrides = "", [job, *overrides]
            elif job.endswith((".yaml", ".yml")) and config is None and Path(job).is_file():
                job, config = "", job  # --describe configs/X.yaml
            print("\n".join(describe_config(job or None, config, overrides)))
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
