"""fastcore's thin training layer: one loop for ``python -m fastcore.train`` and ``torchrun``.

* :mod:`~fastcore.train.cli`: the command (train, ``--describe``, ``evaluate``) and its
  pieces for scripts: :func:`resolve_config`, :func:`run`, :func:`load_run`,
  :func:`evaluate_run`;
* :mod:`~fastcore.train.config`: the YAML config, validated strictly, with overrides;
* :mod:`~fastcore.train.trainer`: :class:`Trainer` (AMP, accumulation, clipping, the NaN/Inf
  scan, [SANITY]/[TIMING]/[MEM] logging, TensorBoard, checkpoints and exact resume, early
  stopping);
* :mod:`~fastcore.train.distributed`: torchrun set-up and the samplers;
* :mod:`~fastcore.train.diagnostics`: :func:`check_gradients` and memory reports;
* :mod:`~fastcore.train.checkpoint`: atomic checkpoints;
* :mod:`~fastcore.train.jobs`: the job registry (``configs/*.yaml`` name a job) and the job
  interface (:class:`JobParts`); docs/own-job.md writes a job of your own.

Everything here is optional: fastcore's layers work in any training loop.
"""

from fastcore.train.checkpoint import CheckpointError
from fastcore.train.cli import LoadedRun, evaluate_run, load_run, resolve_config, run
from fastcore.train.config import Config, ConfigError, option
from fastcore.train.diagnostics import GradientReport, check_gradients
from fastcore.train.distributed import RandomSubsetDistributedSampler
from fastcore.train.jobs import JobContext, JobParts, load_job, register_job
from fastcore.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "GradientReport",
    "JobContext",
    "JobParts",
    "LoadedRun",
    "RandomSubsetDistributedSampler",
    "Trainer",
    "TrainingDiverged",
    "check_gradients",
    "evaluate_run",
    "load_job",
    "load_run",
    "option",
    "register_job",
    "resolve_config",
    "run",
]
