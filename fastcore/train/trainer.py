"""The training loop: one readable class for ``python -m`` and ``torchrun``.

Per optimizer step: ``accum_steps`` micro-batches (forward under autocast, backward, DDP
gradient sync on the last one only) -> unscale (fp16) -> NaN/Inf scan of the loss and the
gradients (a bad step is skipped, its parameters logged; ``nan_patience`` bad steps in a
row stop the run) -> gradient clipping -> AdamW -> cosine schedule with warm-up ->
logging, validation and checkpoints on their schedules.

Early stopping (``train.patience``): every validation either improves
``checkpoint.best_metric`` (in ``checkpoint.best_mode``; best.pt is written) or counts one
more validation without improvement; ``patience`` of those in a row stop the run, with a
``[STOP]`` line in the log and a ``stop`` row in ``metrics.jsonl``. Rank 0 decides and
tells the others, so every rank stops at the same step. The count is part of every
checkpoint: a resumed run that had stopped early trains on only when ``train.patience`` is
raised or unset.

Data order is a pure function of (seed, epoch): every rank's sampler draws the same
permutation and takes its stride of it, so W processes with per-rank batch B/W see the
same global batches as one process with batch B, and a run resumed from a checkpoint
(which records the epoch and the batch within it) continues with exactly the batches the
uninterrupted run would have seen. Randomness inside the model (dropout, sampling) is
keyed per sample: each forward pass runs inside :func:`fastcore.nn.sample_randomness` with
the run seed, the optimizer step and the batch's dataset indices, so a
:class:`~fastcore.nn.SampleDropout` draws the same mask for a sample whatever rank or
micro-batch it is in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

from fastcore.nn.sample_random import sample_randomness
from fastcore.train import checkpoint as ckpt_io
from fastcore.train.config import Config, ConfigError, save_config
from fastcore.train.diagnostics import (
    check_gradients,
    memory_stats,
    nonfinite_grad_names,
    parameter_summary,
)
from fastcore.train.distributed import (
    CollateWithIndex,
    DistInfo,
    RandomSubsetDistributedSampler,
    SkipFirst,
    WithIndex,
    all_reduce_,
)
from fastcore.train.jobs import JobParts

log = logging.getLogger("fastcore.train")


class TrainingDiverged(RuntimeError):
    """``nan_patience`` optimizer steps in a row had a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_with_warmup(warmup: int, total: int, min_ratio: float):
    """The LR multiplier at optimizer step ``s``: linear 0 -> 1 over ``warmup`` steps, then
    a cosine from 1 down to ``min_ratio`` at step ``total``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device``: tensors, and tensors nested in
    tuples, lists, dicts and dataclass instances; anything else is returned as it is.

    Examples:
        >>> out = to_device({"x": torch.zeros(2), "ids": [torch.ones(1), "a"]}, torch.device("cpu"))
        >>> out["x"].device, out["ids"][1]
        (device(type='cpu'), 'a')
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(
            batch,
            **{
                f.name: to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)
            },
        )
    return batch


def adamw(params, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused (one kernel per parameter instead of a
    dozen elementwise ops) where every parameter is a floating tensor on the CPU or a CUDA
    GPU: ~0.5 vs ~2.5 ms a step for the basin model's 105 parameters on a 2-core CPU (the
    unfused default there is the per-tensor loop). The trainer's optimizer and the
    benchmarks' steps both come from here."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if tensors and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors):
        kwargs.setdefault("fused", True)
    return torch.optim.AdamW(groups, **kwargs)


def batch_len(batch: Any) -> int:
    """The leading size of the first tensor in ``batch`` (tensors nested in containers)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple, type({}.values()))):
        for item in items:
            n = batch_len(item)
            if n >= 0:
                return n
    return -1


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on ``device`` (none for ``fp32``)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Any,
    batch_size: int,
    device: torch.device,
    *,
    collate_fn: Any = None,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    predict: Any = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The mean loss and metrics of ``loss_fn`` over ``dataset``, in eval mode.

    Rank ``r`` of ``world_size`` takes samples ``r, r + W, ...`` (every sample exactly once
    over the ranks) in batches of ``batch_size``; each batch's values count with its size,
    and the sums are all-reduced, so every rank returns the same means. This is the
    Trainer's validation, and what the ``evaluate`` command computes.

    Args:
        model: the model (put back into its train/eval mode afterwards).
        dataset: the split; ``collate_fn`` batches its items (``default_collate``: None).
        loss_fn / predict: the job's :class:`~fastcore.train.jobs.JobParts` hooks.
        precision: ``fp32``, ``bf16`` or ``fp16`` (the forward runs under its autocast).

    Returns:
        ``({"loss": mean, "<metric>": mean, ...}, predictions)``: ``predictions`` holds
        ``predict``'s tensors concatenated over this rank's batches (on the CPU) and
        ``"index"``, the dataset index of each row; empty without ``predict``.
    """
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    outputs: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in loader:
            batch = to_device(batch, device)
            n = batch_len(batch)
            with autocast(device, precision):
                loss, metrics = loss_fn(model, batch)
                predicted = predict(model, batch) if predict is not None else {}
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).double().cpu() * n
            count += n
            for k, v in predicted.items():
                outputs.setdefault(k, []).append(torch.as_tensor(v).detach().cpu())
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError(f"nothing to evaluate: the split holds {len(dataset)} samples")
    keys = sorted(sums)
    packed = torch.stack([*(sums[k] for k in keys), count]).to(device)
    packed = all_reduce_(packed, "sum").cpu()
    means = {k: float(packed[i] / packed[-1]) for i, k in enumerate(keys)}
    predictions = {}
    for k, parts in outputs.items():
        try:
            predictions[k] = torch.cat(parts)
        except RuntimeError as e:
            raise ValueError(
                f"predict() returned {k!r} with shapes {[tuple(p.shape) for p in parts[:3]]}: "
                "expected the batch as dimension 0 and the same trailing shape in every batch"
            ) from e
    if predictions:
        predictions["index"] = torch.arange(rank, len(dataset), world_size, dtype=torch.int64)
    return means, predictions


class Trainer:
    """Runs a job (:class:`~fastcore.train.jobs.JobParts`) under a :class:`Config`.

    Args:
        cfg: the validated config.
        parts: the job's model, datasets and loss.
        dist_info: rank, world size and device (:func:`fastcore.train.distributed.setup`).
    """

    def __init__(self, cfg: Config, parts: JobParts, dist_info: DistInfo) -> None:
        self.cfg, self.parts, self.dist = cfg, parts, dist_info
        # What the run did with the CPU allocator (cli.run_switches), logged with [SANITY].
        self.allocator_note: str | None = None
        tc = cfg.train
        per_step = dist_info.world_size * tc.accum_steps
        if tc.batch_size % per_step:
            raise ValueError(
                f"train.batch_size {tc.batch_size} must divide by world_size "
                f"{dist_info.world_size} x train.accum_steps {tc.accum_steps}"
            )
        self.micro_batch = tc.batch_size // per_step
        self.device = dist_info.device
        self.run_dir = cfg.run_path
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model = parts.model.to(self.device)
        # Frozen submodules the job rebuilds from its config: left out of checkpoints,
        # identified instead (their identity taken now, compared again at every save).
        ckpt_io.check_frozen(self.model, parts.frozen)
        self.frozen_identity = ckpt_io.frozen_identity(self.model, parts.frozen)
        self.ddp: nn.Module = self.model
        if dist_info.distributed:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=tc.find_unused_parameters,
            )
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.optimizer = adamw(
            [
                {"params": decay, "weight_decay": tc.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=tc.lr,
            betas=tuple(tc.betas),
            eps=tc.eps,
        )
        self.sampler = self._sampler(parts.train_set, shuffle=True)
        self.steps_per_epoch = len(self.sampler) // (self.micro_batch * tc.accum_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(parts.train_set)} samples) holds no full global batch "
                f"of {tc.batch_size}"
            )
        self.total_steps = self.steps_per_epoch * tc.epochs
        if tc.max_steps is not None:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(tc.warmup_steps, self.total_steps, tc.min_lr_ratio)
        )
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.step = 0  # optimizer steps taken (skipped ones included)
        self.epoch = 0
        self.batch_in_epoch = 0  # optimizer steps of the current epoch already done
        self.bad_streak = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0  # validations in a row without improvement (patience)
        self.last_val: dict[str, float] = {}  # the latest validation's metrics
        self.last_val_step: int | None = None
        self.writer = None
        self.metrics_file = None

    # ------------------------------------------------------------------ data

    def _sampler(self, dataset, shuffle: bool) -> DistributedSampler:
        tc, d = self.cfg.train, self.dist
        if shuffle and tc.subset is not None:
            return RandomSubsetDistributedSampler(
                dataset, tc.subset, d.world_size, d.rank, seed=tc.seed, drop_last=True
            )
        return DistributedSampler(
            dataset, d.world_size, d.rank, shuffle=shuffle, seed=tc.seed, drop_last=shuffle
        )

    def _loader(self, dataset, sampler, epoch: int) -> DataLoader:
        """Micro-batches ``(dataset indices [B], batch)`` in ``sampler``'s order."""
        # The loader's own generator (re-seeded per epoch) feeds worker seeds, so creating
        # an iterator never draws from the global RNG a resumed run must replay.
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return DataLoader(
            WithIndex(dataset),
            batch_size=self.micro_batch,
            sampler=sampler,
            collate_fn=CollateWithIndex(self.parts.collate_fn),
            num_workers=self.cfg.train.num_workers,
            drop_last=True,
            generator=g,
            pin_memory=self.device.type == "cuda",
        )

    # --------------------------------------------------------------- logging

    def _setup_logging(self) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_io.remove_temporaries(self.ckpt_dir):
            log.warning("removed %s, left by a checkpoint save that was interrupted", stale)
        save_config(self.cfg, self.run_dir / "config.yaml")
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        if self.cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "log.tensorboard is true but the tensorboard package is missing: install "
                    "fastcore[train] or set log.tensorboard=false"
                ) from e
            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def _record(self, kind: str, values: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        row = {"kind": kind, "step": self.step, "epoch": self.epoch, **values}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, self.step)

    # ------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds (docs/training.md, "Checkpoints", lists the keys):
        tensors and plain containers only, so it loads with ``weights_only=True``."""
        frozen = self.parts.frozen
        if frozen:
            now = ckpt_io.frozen_identity(self.model, frozen)
            for name, identity in now.items():
                diffs = ckpt_io.identity_differences(self.frozen_identity[name], identity)
                if diffs:
                    raise ckpt_io.CheckpointError(
                        f"frozen {name!r} (JobParts.frozen) changed during training: "
                        f"{'; '.join(diffs)}. Its weights are left out of checkpoints, so "
                        "it must not change (no optimizer, no running statistics: keep it "
                        "in eval mode), or the job must not declare it frozen"
                    )
        return {
            "job": self.cfg.job,
            "model": ckpt_io.model_state(self.model, frozen),
            "fingerprint": ckpt_io.fingerprint(self.model, frozen),
            "frozen": self.frozen_identity,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "bad_streak": self.bad_streak,
            "best": self.best,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "metrics": dict(self.last_val),
            "metrics_step": self.last_val_step,
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str | None = None) -> Path | None:
        """Write ``step-<step>.pt`` (or ``name``) on rank 0, prune old ones; all ranks wait."""
        path = None
        if self.dist.is_main:
            path = self.ckpt_dir / (name or f"step-{self.step:08d}.pt")
            ckpt_io.atomic_save(self.state(), path)
            if name is None:
                ckpt_io.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
            log.info("checkpoint %s", path)
        if self.dist.distributed:
            torch.distributed.barrier()
        return path

    def resume(self, resume: str) -> None:
        """Restore the state of the checkpoint ``resume`` (a path, or ``latest``: the newest
        ``step-*.pt`` of this run): weights, optimizer, scheduler, scaler, RNG states, the
        data position and the validation bookkeeping (best value, patience count).

        Raises:
            CheckpointError: no such checkpoint, an unreadable one, or one written for
                another job or model (the mismatching parameters named).
        """
        path = ckpt_io.resolve(resume, self.ckpt_dir)
        state = ckpt_io.load(path)
        ckpt_io.restore_model(
            state, self.model, path, self.cfg.job, self.parts.frozen, self.frozen_identity
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.bad_streak = state["batch_in_epoch"], state["bad_streak"]
        self.best = state["best"]
        # absent from checkpoints written before early stopping existed
        self.best_step = state.get("best_step")
        self.evals_since_best = state.get("evals_since_best", 0)
        self.last_val = dict(state.get("metrics", {}))
        self.last_val_step = state.get("metrics_step")
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )

    # ------------------------------------------------------------------ loop

    def _autocast(self):
        return autocast(self.device, self.cfg.train.precision)

    def _sync(self) -> None:
        if self.device.type == "cuda" and self.cfg.log.sync_timing:
            torch.cuda.synchronize(self.device)

    def _batches(self) -> Iterator[Any]:
        """This epoch's micro-batches, from where a resumed run left off."""
        skip = self.batch_in_epoch * self.cfg.train.accum_steps * self.micro_batch
        sampler = SkipFirst(self.sampler, skip)
        sampler.set_epoch(self.epoch)
        return iter(self._loader(self.parts.train_set, sampler, self.epoch))

    def train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches."""
        tc = self.cfg.train
        timing = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro in range(tc.accum_steps):
            t0 = time.perf_counter()
            index, batch = next(batches)
            batch = to_device(batch, self.device)
            self._sync()
            t1 = time.perf_counter()
            last = micro == tc.accum_steps - 1
            no_sync = (
                self.ddp.no_sync()
                if self.dist.distributed and not last
                else contextlib.nullcontext()
            )
            # Dropout masks and other draws keyed by (seed, step, sample index): the same
            # for a sample on any rank and in any micro-batch.
            keys = sample_randomness(self.model, tc.seed, self.step, index)
            with no_sync:
                with self._autocast(), keys:
                    loss, metrics = self.parts.loss_fn(self.ddp, batch)
                self._sync()
                t2 = time.perf_counter()
                self.scaler.scale(loss.float() / tc.accum_steps).backward()
                self._sync()
            t3 = time.perf_counter()
            timing["data"] += t1 - t0
            timing["forward"] += t2 - t1
            timing["backward"] += t3 - t2
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + torch.as_tensor(v).detach().float()
        t4 = time.perf_counter()
        self.step += 1
        self.batch_in_epoch += 1
        if self.step in self.cfg.debug.nan_grad_steps:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if trainable[0].grad is not None:
                trainable[0].grad.view(-1)[0] = float("nan")
        self.scaler.unscale_(self.optimizer)
        every = self.cfg.log.grad_report_every
        if self.dist.is_main and (self.step == 1 or (every and self.step % every == 0)):
            report = check_gradients(self.model)
            log.info("[GRAD] step %d: %s", self.step, report.summary())
            if not report.ok:
                for line in report.table().splitlines():
                    log.info("[GRAD] %s", line)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, tc.grad_clip if tc.grad_clip is not None else float("inf")
        )
        # One flag for the whole world: a rank whose local loss went non-finite must not
        # step while the others skip.
        flags = torch.stack(
            [(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float()]
        )
        bad_loss, bad_grad = (all_reduce_(flags, "max") > 0).tolist()
        lr = self.scheduler.get_last_lr()[0]
        if bad_loss or bad_grad:
            overflow_only = (
                self.scaler.is_enabled() and not bad_loss and self.scaler.get_scale() > 1.0
            )
            names = nonfinite_grad_names(self.model) if bad_grad else []
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            if overflow_only:
                log.info(
                    "[AMP] step %d: fp16 gradient overflow, step skipped, loss scale -> %g",
                    self.step,
                    self.scaler.get_scale(),
                )
            else:
                self.bad_streak += 1
                what = "loss" if bad_loss else "gradient"
                log.warning(
                    "[NAN] step %d: non-finite %s, step skipped (%d in a row); "
                    "non-finite gradients in: %s",
                    self.step,
                    what,
                    self.bad_streak,
                    ", ".join(names[:10]) or "-",
                )
                self._record("skip", {"bad_streak": self.bad_streak, "params": len(names)})
                if self.bad_streak >= tc.nan_patience:
                    raise TrainingDiverged(
                        f"{self.bad_streak} optimizer steps in a row (up to step {self.step}) had "
                        f"a non-finite {what} (train.nan_patience = {tc.nan_patience}); last "
                        f"non-finite gradients: {', '.join(names[:10]) or '-'}. Lower train.lr, "
                        "check the inputs for NaN, or set train.anomaly=true to find the op"
                    )
        else:
            self.bad_streak = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule follows the data position: a skipped step advances it too, which
            # is what torch's "scheduler.step() before optimizer.step()" warning is about.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self._sync()
        timing["optimizer"] = time.perf_counter() - t4
        scale = 1.0 / tc.accum_steps
        values = {
            "loss": loss_sum.item() * scale,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "skipped": float(bool(bad_loss or bad_grad)),
            **{k: float(v) * scale for k, v in metric_sums.items()},
        }
        if self.dist.distributed:
            # float64 on the run's device: nccl reduces device tensors only.
            synced = torch.tensor([values["loss"]], dtype=torch.float64, device=self.device)
            values["loss"] = float(all_reduce_(synced, "sum")) / self.dist.world_size
        values.update({f"time_{k}": v for k, v in timing.items()})
        return values

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the validation set (all ranks together, see
        :func:`evaluate_dataset`), then the job's ``evaluate`` metrics, as ``val_<name>``."""
        if self.parts.val_set is None:
            return {}
        means, _ = evaluate_dataset(
            self.model,
            self.parts.val_set,
            self.parts.loss_fn,
            self.micro_batch,
            self.device,
            collate_fn=self.parts.collate_fn,
            precision=self.cfg.train.precision,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        out = {f"val_{k}": v for k, v in means.items()}
        if self.parts.evaluate is not None:
            self.model.eval()
            extra = self.parts.evaluate(self.model)
            self.model.train()
            missing = sorted(set(self.parts.evaluate_metrics) - set(extra))
            if missing:
                raise RuntimeError(
                    f"job {self.cfg.job!r}: evaluate() returned no {', '.join(missing)}, which "
                    "its JobParts.evaluate_metrics declares"
                )
            out.update({f"val_{k}": float(v) for k, v in extra.items()})
        return out

    def validation_metrics(self) -> list[str]:
        """The names a validation reports (``val_loss``, ``val_<metric>`` of the loss
        function and of ``evaluate``): the loss function's from one validation batch,
        under no_grad in eval mode, ``evaluate``'s as the job declares them."""
        if self.parts.val_set is None:
            return []
        val_set = self.parts.val_set
        items = [val_set[i] for i in range(min(len(val_set), self.micro_batch))]
        batch = to_device((self.parts.collate_fn or default_collate)(items), self.device)
        self.model.eval()
        with torch.no_grad(), self._autocast():
            _, metrics = self.parts.loss_fn(self.model, batch)
        self.model.train()
        names = ["loss", *metrics, *self.parts.evaluate_metrics]
        return sorted({f"val_{k}" for k in names})

    def _check_best_metric(self) -> None:
        """``checkpoint.best_metric`` names a metric the validation reports (before step 1:
        a typo must not cost a run that never writes best.pt), and ``train.patience`` has
        validations to count."""
        key = self.cfg.checkpoint.best_metric
        names = self.validation_metrics()
        if not names:
            if self.cfg.train.patience is not None:
                raise ConfigError(
                    f"train.patience = {self.cfg.train.patience}: expected null: job "
                    f"{self.cfg.job!r} has no validation set, so nothing can stop it early"
                )
            if self.dist.is_main:
                log.info("no validation set: best.pt (checkpoint.best_metric) is not written")
            return
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"checkpoint.best_metric = {key!r}: expected a metric job {self.cfg.job!r} "
                f"reports: {', '.join(names)}{hint}"
            )

    def _after_eval(self, values: dict[str, float]) -> None:
        if not values:  # no validation set
            return
        self._record("val", values)
        if self.dist.is_main:
            log.info(
                "[VAL] step %d epoch %d: %s",
                self.step,
                self.epoch,
                "  ".join(f"{k} {v:.5g}" for k, v in values.items()),
            )
        key = self.cfg.checkpoint.best_metric
        if key not in values:
            raise RuntimeError(
                f"validation at step {self.step} reported no {key!r} (checkpoint.best_metric); "
                f"it reported {', '.join(sorted(values))}"
            )
        value = values[key]
        better = math.isfinite(value) and (
            self.best is None
            or (value < self.best if self.cfg.checkpoint.best_mode == "min" else value > self.best)
        )
        if self.dist.distributed:
            # Rank 0 decides and the others follow: a job's evaluate() may differ across
            # ranks in the last bits, and best.pt and the stop need every rank at once.
            decision = torch.tensor(
                [float(better), value if better else 0.0], dtype=torch.float64, device=self.device
            )
            if not self.dist.is_main:
                decision.zero_()
            decision = all_reduce_(decision, "sum").cpu()
            better, value = bool(decision[0] > 0), float(decision[1])
        self.last_val, self.last_val_step = dict(values), self.step
        if better:
            self.best, self.best_step, self.evals_since_best = value, self.step, 0
            self.save("best.pt")
        else:
            self.evals_since_best += 1
            if self.patience_spent():
                self._record(
                    "stop",
                    {
                        "best": self.best,
                        "best_step": self.best_step,
                        "evals_since_best": self.evals_since_best,
                        "patience": self.cfg.train.patience,
                    },
                )
                if self.dist.is_main:
                    log.info("[STOP] step %d: %s; stopping early", self.step, self._stop_reason())

    def patience_spent(self) -> bool:
        """Whether ``train.patience`` validations in a row have not improved
        ``checkpoint.best_metric`` (always False with ``patience`` null)."""
        patience = self.cfg.train.patience
        return patience is not None and self.evals_since_best >= patience

    def _stop_reason(self) -> str:
        cc = self.cfg.checkpoint
        best = "none finite" if self.best is None else f"{self.best:.6g} at step {self.best_step}"
        return (
            f"{cc.best_metric} has not improved ({cc.best_mode}; best {best}) for "
            f"{self.evals_since_best} validations in a row (train.patience = "
            f"{self.cfg.train.patience})"
        )

    def _validate(self) -> dict[str, float]:
        values = self.evaluate()
        self._after_eval(values)
        return values

    def fit(self, resume: str | None = None) -> dict[str, float]:
        """Train to ``train.epochs`` / ``train.max_steps``, or until ``train.patience``
        validations in a row have not improved ``checkpoint.best_metric``; validate at the
        end (unless the last step did) and save its checkpoint.

        Args:
            resume: a checkpoint to continue from (see :meth:`resume`), or None.

        Returns:
            The last validation's metrics (``{}`` without a validation set); for a resumed
            run that had stopped early, those stored in its checkpoint.
        """
        tc, lc = self.cfg.train, self.cfg.log
        self._check_best_metric()
        if resume:  # before the run's files are touched: a checkpoint that fails its checks
            self.resume(resume)  # leaves config.yaml and metrics.jsonl as they were
        self._setup_logging()
        if self.dist.is_main:
            log.info(
                "run %s: job %s, world %d, device %s, precision %s, global batch %d "
                "(%d per rank x %d accumulation), %d steps (%d per epoch)",
                self.run_dir,
                self.cfg.job,
                self.dist.world_size,
                self.device,
                tc.precision,
                tc.batch_size,
                self.micro_batch,
                tc.accum_steps,
                self.total_steps,
                self.steps_per_epoch,
            )
            log.info("[SANITY] %s", parameter_summary(self.model))
            if self.allocator_note:
                log.info("[ALLOC] %s", self.allocator_note)
            for name, ident in self.frozen_identity.items():
                log.info(
                    "[SANITY] frozen %s (left out of checkpoints): %s, %s parameters, "
                    "%.2f MiB, digest %s (%s), from: %s",
                    name,
                    ident["class"].rsplit(".", 1)[-1],
                    f"{ident['parameters']:,}",
                    ident["bytes"] / 2**20,
                    ident["digest"][:16],
                    ident["hashed"],
                    ident["source"],
                )
            if self.parts.sanity is not None:
                for line in self.parts.sanity().splitlines():
                    log.info("[SANITY] %s", line)
        progress = None
        if self.dist.is_main and lc.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True)
        last_val = dict(self.last_val)
        evaluated_at = -1
        start_step = self.step
        saved_at = self.step if resume else -1  # the checkpoint resumed from is this step's
        if self.patience_spent() and self.dist.is_main:
            log.info(
                "[STOP] resumed a run that stopped early at step %d: %s; nothing to train "
                "(raise train.patience or set it to null to train on)",
                self.step,
                self._stop_reason(),
            )
        anomaly = torch.autograd.set_detect_anomaly(True) if tc.anomaly else None
        try:
            if tc.eval_at_start and self.step == 0 and self.parts.val_set is not None:
                last_val, evaluated_at = self._validate(), self.step
            self.model.train()
            while (
                not self.patience_spent()
                and self.step < self.total_steps
                and self.epoch < tc.epochs
            ):
                batches = self._batches()
                while self.batch_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                    values = self.train_step(batches)
                    self._record("train", values)
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{values['loss']:.4g}")
                    if self.dist.is_main and (self.step % lc.every_steps == 0 or self.step == 1):
                        self._log_step(values)
                    if tc.eval_every_steps and self.step % tc.eval_every_steps == 0:
                        last_val, evaluated_at = self._validate(), self.step
                    every = self.cfg.checkpoint.every_steps
                    if every and self.step % every == 0:
                        self.save()
                        saved_at = self.step
                    if self.cfg.debug.kill_at_step == self.step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if self.patience_spent():
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if evaluated_at != self.step:  # not twice at one step (patience counts)
                        last_val, evaluated_at = self._validate(), self.step
                    self.save()
                    saved_at = self.step
            if self.step != start_step:
                # ended mid-epoch (train.max_steps, or stopped early): validate and save
                # this step, so the newest step checkpoint is where the run ended
                if evaluated_at != self.step and self.parts.val_set is not None:
                    last_val, evaluated_at = self._validate(), self.step
                if saved_at != self.step:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            if anomaly is not None:
                torch.autograd.set_detect_anomaly(False)
            if self.writer is not None:
                self.writer.flush()
            if self.metrics_file is not None:
                self.metrics_file.flush()
        if self.parts.finish is not None and self.dist.is_main:
            self.parts.finish(self)
        return last_val

    def _log_step(self, values: dict[str, float]) -> None:
        mem = memory_stats(self.device)
        self._record("mem", mem)
        log.info(
            "step %d/%d epoch %d: loss %.5g  lr %.3g  grad norm %.4g%s",
            self.step,
            self.total_steps,
            self.epoch,
            values["loss"],
            values["lr"],
            values["grad_norm"],
            "  (skipped)" if values["skipped"] else "",
        )
        log.info(
            "[TIMING] step %d: data %.1f ms  forward %.1f ms  backward %.1f ms  optimizer %.1f ms",
            self.step,
            *(1e3 * values[f"time_{k}"] for k in ("data", "forward", "backward", "optimizer")),
        )
        log.info("[MEM] step %d: %s", self.step, "  ".join(f"{k} {v:.1f}" for k, v in mem.items()))


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at emit time."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """StreamHandler.__init__ assigns a stream; the property always answers sys.stderr."""


def configure_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr and to ``<run_dir>/train.log`` (stderr only when
    ``run_dir`` is None); other ranks warnings only."""
    close_logging()
    logger = logging.getLogger("fastcore")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = _CurrentStderr()
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False


def log_to_files(message: str) -> None:
    """``message`` as an ERROR line in the run's log file only (stderr gets it elsewhere)."""
    logger = logging.getLogger("fastcore")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def close_logging() -> None:
    """Detach and close the handlers :func:`configure_logging` added."""
    logger = logging.getLogger("fastcore")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
