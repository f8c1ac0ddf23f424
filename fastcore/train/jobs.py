"""Jobs: what a config's ``job:`` names.

A job is a module exposing

* ``DataConfig`` and ``ModelConfig``: dataclasses for the config's ``data`` and ``model``
  sections (validated as strictly as the rest; declare each field with
  :func:`fastcore.train.config.option` so ``--describe`` documents it);
* ``build(cfg: Config, ctx: JobContext) -> JobParts``.

``job: NAME`` is looked up by :func:`load_job`: a name registered in :data:`JOBS` (the
built-in jobs, and those added with :func:`register_job`) first, else NAME as a module
path, dotted or not (``job: my_job`` imports ``my_job.py`` from the directory the command
runs in, which ``python -m`` puts on ``sys.path``, or from ``PYTHONPATH``;
``job: mypackage.my_job`` imports ``mypackage/my_job.py``). Registered modules are
imported only when their job runs, so a job whose extra dependencies are missing does not
break the others. docs/own-job.md walks through a whole job of your own.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fastcore.train.config import ConfigError

#: Job name -> module path: the built-in jobs, and those :func:`register_job` adds.
JOBS: dict[str, str] = {
    "example": "fastcore.train.example",
    "basin": "fastcore.train.basin",
    "kv_distill": "fastcore.train.kv_distill",
    "kv_study": "fastcore.train.kv_study",
    "temporal_align": "fastcore.train.temporal_align",
    "panel": "fastcore.train.panel",
}

#: What a job module must define.
JOB_ATTRIBUTES = ("DataConfig", "ModelConfig", "build")

_HOW = (
    "or a module path: 'job: my_job' imports my_job.py from the current directory or "
    "PYTHONPATH, 'job: mypackage.my_job' imports mypackage/my_job.py; the module must "
    "define DataConfig, ModelConfig and build(cfg, ctx) -> JobParts (docs/own-job.md)"
)


def register_job(name: str, module: str) -> None:
    """Make ``job: name`` run the job module at the import path ``module``.

    The module is imported only when a config names the job (by :func:`load_job`), so
    registering costs nothing. A registered name is looked up before any module of the same
    name, and registering an existing name replaces it. The registry lives in this process:
    register before :func:`~fastcore.train.cli.resolve_config` (a script's, or your
    package's ``__init__``); the command line reaches an unregistered job by its module path
    (``job: mypackage.my_job``) instead.

    Args:
        name: the job's name in configs; non-empty, without whitespace.
        module: the import path of a module defining ``DataConfig``, ``ModelConfig`` and
            ``build`` (checked when it is loaded, not here).

    Raises:
        TypeError: ``name`` or ``module`` is not a string.
        ValueError: ``name`` is empty or holds whitespace, or ``module`` is not a dotted
            Python identifier path.

    Examples:
        >>> from fastcore.train.jobs import JOBS, register_job
        >>> register_job("forecast", "mypackage.forecast")
        >>> JOBS["forecast"]
        'mypackage.forecast'
        >>> del JOBS["forecast"]
    """
    if not isinstance(name, str) or not isinstance(module, str):
        raise TypeError(
            f"register_job(name, module) takes two strings, got {name!r} and {module!r}"
        )
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"job name {name!r}: expected a non-empty name without whitespace")
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(
            f"job module {module!r}: expected an import path such as 'mypackage.my_job'"
        )
    JOBS[name] = module


@dataclass
class JobContext:
    """What a job's ``build`` may need from the run.

    Attributes:
        device: where the model and its batches run (``cuda:LOCAL_RANK`` or ``cpu``).
        seed: ``train.seed``.
        rank / world_size: this process and the number of processes (1 without torchrun).
        run_dir: the run's directory (for files a job writes or reuses).
        precision: ``train.precision`` (``fp32``, ``bf16`` or ``fp16``).
    """

    device: torch.device
    seed: int
    rank: int
    world_size: int
    run_dir: Path
    precision: str


@dataclass
class JobParts:
    """What the Trainer runs, and what ``python -m fastcore.train evaluate`` evaluates.

    ``loss_fn(model, batch) -> (loss, metrics)``: the mean loss over the batch (a scalar
    tensor) and a dict of per-batch scalar metrics (means over the batch), all on the run's
    device; batches come from ``train_set``/``val_set``/``test_set`` through ``collate_fn``
    and are moved to the device by the Trainer (tensors, and tensors inside tuples, lists,
    dicts and dataclass instances). A validation reports ``val_loss`` and ``val_<metric>``:
    their means over the whole validation set (batch means weighted by batch size).
    ``test_set``: an optional held-out split, used only by ``evaluate --split test``.
    ``sanity()``: the job's ``[SANITY]`` report (graphs, index bounds), logged before step 1.
    ``evaluate(model)``: extra validation metrics over the whole validation set (e.g. NSE,
    which batch means cannot give), merged into each validation as ``val_<name>``;
    ``evaluate_metrics`` names them, so that ``checkpoint.best_metric`` can be checked
    before step 1 (the Trainer checks each validation returns them). The ``evaluate``
    command calls ``evaluate(model)`` for the validation split and ``evaluate(model,
    split)`` for each other split named in ``evaluate_splits``.
    ``predict(model, batch) -> {name: tensor}``: the model's outputs for a batch (and
    whatever else belongs in a predictions file: targets, ids), each tensor with the batch
    as dimension 0 and the same trailing shape in every batch; the ``evaluate`` command
    concatenates them over a split and saves them. A job without it cannot be evaluated
    by the command.
    ``finish(trainer)``: called on rank 0 after training (reports, plots).
    ``frozen``: ``{submodule name in model: where it comes from}`` for frozen submodules
    the job rebuilds from its config every time (a pretrained or warmed-up LM, a
    distillation teacher; every parameter ``requires_grad=False``). Checkpoints leave
    their weights out and store an identity instead (class, config, parameter count,
    tensor dtypes and shapes, a content hash, and this description); resuming or
    evaluating with a rebuilt module that differs is an error naming the difference
    (docs/training.md, "Frozen submodules").
    """

    model: nn.Module
    train_set: Dataset
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    val_set: Dataset | None = None
    collate_fn: Callable | None = None
    sanity: Callable[[], str] | None = None
    evaluate: Callable[..., dict[str, float]] | None = None
    evaluate_metrics: tuple[str, ...] = ()
    finish: Callable[[Any], None] | None = None
    test_set: Dataset | None = None
    predict: Callable[[nn.Module, Any], dict[str, torch.Tensor]] | None = None
    evaluate_splits: tuple[str, ...] = ("val",)
    frozen: dict[str, str] = field(default_factory=dict)


def _importable(target: str) -> bool:
    """Whether ``target`` names a module that can be imported (its parents are imported
    on the way, as ``import`` would)."""
    try:
        return importlib.util.find_spec(target) is not None
    except (ImportError, ValueError):
        return False


def load_job(name: str) -> ModuleType:
    """The job module ``job: name`` selects, imported and checked.

    Lookup: ``name`` in :data:`JOBS` (the built-in jobs and :func:`register_job`'s), else
    ``name`` as an import path, dotted or not, on ``sys.path`` (which holds the current
    directory under ``python -m fastcore.train``, and ``PYTHONPATH``). The module must
    define ``DataConfig``, ``ModelConfig`` and ``build``.

    Args:
        name: the config's ``job:`` value.

    Returns:
        The imported module.

    Raises:
        ConfigError: ``name`` is neither registered nor importable (the message lists the
            registered jobs, the closest one, and how a module path is written), importing
            the module failed on an import of its own (a missing dependency, named), or
            the module lacks one of the three attributes.

    Examples:
        >>> from fastcore.train.jobs import load_job
        >>> load_job("example").__name__
        'fastcore.train.example'
        >>> load_job("exmaple")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fastcore.train.config.ConfigError: unknown job 'exmaple'; ... (did you mean 'example'?); ...
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"job: expected a job name or module path, got {name!r}")
    if name in JOBS:
        target = JOBS[name]
    elif _importable(name):
        target = name
    else:
        close = difflib.get_close_matches(name, JOBS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown job {name!r}; registered jobs: {', '.join(sorted(JOBS))}{hint}; {_HOW}"
        )
    try:
        module = importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(
            f"job {name!r}: importing module {target!r} failed: {type(e).__name__}: {e}"
        ) from e
    missing = [a for a in JOB_ATTRIBUTES if not hasattr(module, a)]
    if missing:
        raise ConfigError(
            f"job {name!r}: module {target!r} is not a job module: it lacks "
            f"{', '.join(missing)} (expected DataConfig, ModelConfig and "
            "build(cfg, ctx) -> JobParts)"
        )
    return module
