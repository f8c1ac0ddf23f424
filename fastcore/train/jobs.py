"""Jobs: what a config's ``job:`` names.

A job is a module exposing

* ``DataConfig`` and ``ModelConfig``: dataclasses for the config's ``data`` and ``model``
  sections (validated as strictly as the rest; declare each field with
  :func:`fastcore.train.config.option` so ``--describe`` documents it);
* ``build(cfg: Config, ctx: JobContext) -> JobParts``.

The registry maps a name to its module path, imported only when that job runs, so a job
whose extra dependencies are missing does not break the others. Register your own with
:func:`register_job` (or pass ``job: package.module`` — any importable module with the
three attributes works).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

JOBS: dict[str, str] = {
    "example": "fastcore.train.example",
    "basin": "fastcore.train.basin",
    "kv_distill": "fastcore.train.kv_distill",
    "temporal_align": "fastcore.train.temporal_align",
}


def register_job(name: str, module: str) -> None:
    JOBS[name] = module


@dataclass
class JobContext:
    """What a job's ``build`` may need from the run."""

    device: torch.device
    seed: int
    rank: int
    world_size: int
    run_dir: Path
    precision: str


@dataclass
class JobParts:
    """What the Trainer runs.

    ``loss_fn(model, batch) -> (loss, metrics)``: the mean loss over the batch (a scalar
    tensor) and a dict of per-batch scalar metrics (means over the batch), all on the run's
    device; batches come from ``train_set``/``val_set`` through ``collate_fn`` and are moved
    to the device by the Trainer (tensors, and tensors inside tuples, lists, dicts and
    dataclass instances).
    ``sanity()``: the job's ``[SANITY]`` report (graphs, index bounds), logged before step 1.
    ``evaluate(model)``: extra validation metrics over the whole validation set (e.g. NSE,
    which batch means cannot give), merged into each validation as ``val_<name>``.
    ``finish(trainer)``: called on rank 0 after training (reports, plots).
    """

    model: nn.Module
    train_set: Dataset
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    val_set: Dataset | None = None
    collate_fn: Callable | None = None
    sanity: Callable[[], str] | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    finish: Callable[[Any], None] | None = None


def load_job(name: str) -> ModuleType:
    target = JOBS.get(name, name if "." in name else None)
    if target is None:
        raise ValueError(f"unknown job {name!r}; registered jobs: {', '.join(sorted(JOBS))}")
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise ValueError(f"job {name!r}: cannot import {target!r}: {e}") from e
    missing = [a for a in ("DataConfig", "ModelConfig", "build") if not hasattr(module, a)]
    if missing:
        raise ValueError(f"job module {target!r} lacks {', '.join(missing)}")
    return module
