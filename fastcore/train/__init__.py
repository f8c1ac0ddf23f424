"""fastcore's thin training layer: one loop for ``python -m fastcore.train`` and ``torchrun``.

* :mod:`~fastcore.train.config`: the YAML config, validated strictly, with overrides;
* :mod:`~fastcore.train.trainer`: :class:`Trainer` (AMP, accumulation, clipping, the NaN/Inf
  scan, [SANITY]/[TIMING]/[MEM] logging, TensorBoard, checkpoints and exact resume);
* :mod:`~fastcore.train.distributed`: torchrun set-up and the samplers;
* :mod:`~fastcore.train.diagnostics`: :func:`check_gradients` and memory reports;
* :mod:`~fastcore.train.checkpoint`: atomic checkpoints;
* :mod:`~fastcore.train.jobs`: the job registry (``configs/*.yaml`` name a job).

Everything here is optional: fastcore's layers work in any training loop.
"""

from fastcore.train.checkpoint import CheckpointError
from fastcore.train.config import Config, ConfigError
from fastcore.train.diagnostics import GradientReport, check_gradients
from fastcore.train.distributed import RandomSubsetDistributedSampler
from fastcore.train.jobs import JobContext, JobParts, register_job
from fastcore.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "GradientReport",
    "JobContext",
    "JobParts",
    "RandomSubsetDistributedSampler",
    "Trainer",
    "TrainingDiverged",
    "check_gradients",
    "register_job",
]
