"""Does KV alignment help a student? ``python -m fastcore.train --config configs/kv_study.yaml``.

A controlled A/B study of KV-cache distillation (:class:`fastcore.models.KVDistiller`'s
loss, ``lm_loss + kv_weight * kv_loss``) on held-out text, at equal steps, over several
seeds:

1. **Data.** The templated corpus of :func:`fastcore.data.text.make_corpus`, split by
   sentence *text* (a seeded hash of each sentence, so a sentence repeated in the corpus
   lands on one side only): the training stream, a held-out stream (the reported
   perplexity) and a dev stream (``data.dev_fraction``: picks the early-stopping steps of
   the second look) share no sentence. The held-out stream is tiled by non-overlapping windows (every held-out token scored
   once); the build checks how many held-out windows (and shorter n-grams) occur in the
   training stream and reports it.
2. **Teacher.** The tiny Qwen2 teacher of :func:`fastcore.models.build_tiny_qwen2_pair`,
   pretrained with the LM loss on the training stream (``model.teacher_*``), evaluated on
   the held-out windows, saved as ``<run_dir>/teacher.pt`` and reused by a later run whose
   settings (and data) match. A random teacher has nothing to give. The students train on
   ``data.student_fraction`` of the training sentences (by text): below 1, the teacher has
   read more than the student.
3. **Arms**, each a student per seed (``model.seeds``): ``lm`` (the LM loss alone, no
   projector), ``kv_mse``, ``kv_cosine`` (LM + KV alignment with a trained
   :class:`fastcore.nn.KVProjector`), ``ctrl_random_proj`` (the KV loss through a projector
   frozen at its random initialisation), ``ctrl_shuffled_map`` (a trained projector whose
   layer map pairs every student layer with another teacher layer than the default map)
   and ``ctrl_random_teacher`` (KV alignment to the same teacher before its pretraining).
   Per seed every arm starts from the same student weights (and every KV arm from the same
   projector weights) and sees the same batches in the same order: the Trainer trains all
   of them as one model, one optimizer step for all, each arm's loss reaching only its own
   parameters (AdamW is elementwise; a global gradient clip would couple the arms, so
   ``train.grad_clip`` must be null). Each teacher's cache is computed once per seed's batch
   and shared by that seed's KV arms.
4. **KV weights** are fixed before training: by default so that ``kv_weight * kv_loss``
   equals ``model.kv_balance`` times the LM loss at initialisation (measured on training
   windows, never on held-out text); ``model.kv_weight_mse`` / ``kv_weight_cosine`` set
   them instead.
5. **Report.** Validations along the way (``train.eval_every_steps``) give each run's
   held-out and dev NLL; at the end every student is scored window by window and
   :mod:`fastcore.train.kv_study_report` writes ``report.md`` (held-out perplexity with
   t-intervals over seeds, the paired log-perplexity difference to ``lm`` with its interval
   and a bootstrap, the verdict in words; the KV arm against its controls; the same with
   every run stopped at its lowest dev NLL; a bottom line), ``results.json`` (every number
   of every run) and ``val_ppl.png``, and prints the table to the log. docs/kv-study.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fastcore.data.text import TokenWindows, batches, build_remap, encode_corpus, make_corpus
from fastcore.train.config import SEED_MAX, Config, option
from fastcore.train.jobs import JobContext, JobParts
from fastcore.train.kv_study_report import (
    control_lines,
    plot_curves,
    render_markdown,
    study_conclusion,
    summarize,
    table_lines,
)
from fastcore.train.trainer import cosine_with_warmup

log = logging.getLogger("fastcore.train")

#: Arm name -> (KV loss or None, projector trained, layer map, teacher); "control" is
#: ``model.control_loss``.
ARMS: dict[str, tuple[str | None, bool, str, str]] = {
    "lm": (None, False, "none", "none"),
    "kv_mse": ("mse", True, "default", "pretrained"),
    "kv_cosine": ("cosine", True, "default", "pretrained"),
    "ctrl_random_proj": ("control", False, "default", "pretrained"),
    "ctrl_shuffled_map": ("control", True, "shuffled", "pretrained"),
    "ctrl_random_teacher": ("control", True, "default", "random"),
}

ARM_DOCS = {
    "lm": "the LM loss alone (no projector)",
    "kv_mse": "LM + kv_weight x MSE between the projected teacher KV and the student's",
    "kv_cosine": "LM + kv_weight x (1 - cosine) between them",
    "ctrl_random_proj": "LM + the KV loss through a projector frozen at its random init",
    "ctrl_shuffled_map": "LM + the KV loss with a trained projector and a wrong layer map",
    "ctrl_random_teacher": "LM + the KV loss towards the same teacher before its pretraining "
    "(random weights)",
}

_WINDOW_SEED = 100_003  # window seed of study seed s: data.seed * this + s (+ 1 for the teacher)


def _check_arms(arms: list[str]) -> bool:
    return "lm" in arms and len(set(arms)) == len(arms) and all(a in ARMS for a in arms)


def _check_seeds(seeds: list[int]) -> bool:
    return len(seeds) >= 2 and len(set(seeds)) == len(seeds)


@dataclass
class DataConfig:
    """The corpus, its split and the windows."""

    docs: int = option(2000, "sentences generated by fastcore.data.text.make_corpus", ge=10)
    seed: int = option(0, "seed of the corpus and its split", ge=0, le=SEED_MAX // _WINDOW_SEED)
    val_fraction: float = option(
        0.2,
        "fraction of the distinct sentences held out for the reported perplexity (by text)",
        gt=0,
        lt=1,
    )
    dev_fraction: float = option(
        0.1,
        "fraction of the distinct sentences held out as a dev split (by text; no model "
        "trains on it) that picks each run's early-stopping step for the second look "
        "(0: none)",
        ge=0,
        lt=1,
    )
    student_fraction: float = option(
        0.1,
        "fraction of the training sentences the students train on (by text; the teacher "
        "trains on all of them): below 1, a teacher that has read more than the student",
        gt=0,
        le=1,
    )
    seq_len: int = option(
        64, "tokens per window (the tiny models hold 512 positions)", ge=2, le=512
    )
    train_windows: int = option(
        4800,
        "training windows per epoch (drawn from the students' text, per seed; steps per "
        "epoch = this / train.batch_size)",
        ge=1,
    )


@dataclass
class ModelConfig:
    """The arms, the seeds, the teacher's pretraining and the KV weights."""

    arms: list[str] = option(
        list(ARMS),
        "arms to train: lm (required, the reference), kv_mse, kv_cosine, ctrl_random_proj, "
        "ctrl_shuffled_map, ctrl_random_teacher",
        check=_check_arms,
        expected=f"a list of distinct arms among {', '.join(ARMS)} that includes lm",
    )
    seeds: list[int] = option(
        [0, 1, 2, 3, 4],
        "study seeds: each gives the student init, the projector init and the training "
        "windows shared by all arms",
        ge=0,
        le=2**31 - 1,
        check=_check_seeds,
        expected="a list of at least 2 distinct ints in [0, 2147483647]",
    )
    control_loss: Literal["mse", "cosine"] = option(
        "mse", "loss of the controls (and its weight): mse or cosine"
    )
    kv_balance: float = option(
        1.0, "default KV weights: kv_weight x kv_loss = this x lm_loss at init", gt=0
    )
    kv_weight_mse: float | None = option(
        None, "the MSE arms' kv_weight (null: from kv_balance)", ge=0
    )
    kv_weight_cosine: float | None = option(
        None, "the cosine arms' kv_weight (null: from kv_balance)", ge=0
    )
    calib_windows: int = option(64, "training windows that measure the losses at init", ge=1)
    teacher_steps: int = option(200, "teacher pretraining: optimizer steps (LM loss)", ge=1)
    teacher_batch_size: int = option(16, "teacher pretraining: windows per step", ge=1)
    teacher_lr: float = option(
        3e-3, "teacher pretraining: AdamW peak lr (warm-up, cosine, clip 1)", gt=0
    )
    teacher_seed: int = option(10_000, "seed of the teacher's initialisation", ge=0, le=2**31 - 1)
    alpha: float = option(0.05, "two-sided level of every interval", gt=0, lt=1)
    bootstrap: int = option(2000, "paired bootstrap resamples (0: none)", ge=0)
    plot: bool = option(True, "write val_ppl.png (when matplotlib is installed)")


# ----------------------------------------------------------------------------- data


def _unit(text: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_sentences(
    docs: list[str], val_fraction: float, seed: int, dev_fraction: float = 0.0
) -> tuple[list, ...]:
    """Split by sentence text: a seeded hash ``u`` in [0, 1) of each sentence's text sends
    it to the held-out side when ``u < val_fraction``, to the dev side when
    ``val_fraction <= u < val_fraction + dev_fraction``, else to training; so equal
    sentences always land together and the sides share no sentence (and the held-out side
    does not depend on ``dev_fraction``). Corpus order is kept on every side. Returns
    ``(train, held_out)``, and ``dev`` third when ``dev_fraction > 0``."""
    train, held, dev = [], [], []
    for doc in docs:
        u = _unit(doc, seed)
        if u < val_fraction:
            held.append(doc)
        elif u < val_fraction + dev_fraction:
            dev.append(doc)
        else:
            train.append(doc)
    return (train, held, dev) if dev_fraction > 0 else (train, held)


def _rows(stream: np.ndarray, n: int) -> set[bytes]:
    if stream.size < n:
        return set()
    view = np.lib.stride_tricks.sliding_window_view(stream, n)
    return {row.tobytes() for row in view}


def overlap_stats(train: torch.Tensor, held: torch.Tensor, seq_len: int) -> dict[str, Any]:
    """How much of the held-out stream occurs verbatim in the training stream: the held-out
    windows (``seq_len`` tokens, tiled) found there, and the share of held-out n-grams
    (every position) found there for shorter n (the templated text shares many)."""
    tr = train.numpy().astype(np.int32)
    he = held.numpy().astype(np.int32)
    n_win = he.size // seq_len
    train_rows = _rows(tr, seq_len)
    tiles = he[: n_win * seq_len].reshape(n_win, seq_len)
    windows_in_train = sum(row.tobytes() in train_rows for row in tiles)
    ngrams = {}
    for n in (4, 8, 16, 32):
        if n >= seq_len or he.size < n:
            continue
        rows = _rows(tr, n)
        view = np.lib.stride_tricks.sliding_window_view(he, n)
        ngrams[n] = float(np.mean([row.tobytes() in rows for row in view]))
    return {"windows": n_win, "windows_in_train": windows_in_train, "ngram_share": ngrams}


class SeedWindows(Dataset):
    """Item ``i`` -> ``[S, T]`` token windows, row ``s`` drawn for study seed ``seeds[s]``
    (:class:`fastcore.data.text.TokenWindows` of window seed ``data.seed * 100003 +
    seeds[s]``): every arm of a seed trains on row ``s``; seeds differ in their windows."""

    def __init__(
        self, raw: torch.Tensor, small: torch.Tensor, seq_len: int, count: int, seeds, base: int
    ) -> None:
        self.windows = [
            TokenWindows(raw, small, seq_len, count, base * _WINDOW_SEED + s) for s in seeds
        ]

    def __len__(self) -> int:
        return len(self.windows[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([w[i][1] for w in self.windows])


class TiledWindows(Dataset):
    """The held-out stream cut into consecutive windows of ``seq_len`` (the tail shorter
    than a window dropped): item ``i`` -> ``[1, T]``, the same for every seed and arm."""

    def __init__(self, small: torch.Tensor, seq_len: int) -> None:
        n = small.numel() // seq_len
        if n < 2:
            raise ValueError(
                f"the held-out stream has {small.numel()} tokens: fewer than 2 windows of "
                f"{seq_len}; raise data.docs or data.val_fraction"
            )
        self.tiles = small[: n * seq_len].view(n, 1, seq_len).clone()

    def __len__(self) -> int:
        return self.tiles.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tiles[i]


# --------------------------------------------------------------------------- models


def shuffled_layer_map(default: list[int], teacher_layers: int) -> list[int]:
    """A layer map pairing every student layer with another teacher layer than ``default``
    does: ``default`` rotated by one (reversed for two layers); where that leaves a layer
    on its own teacher layer (repeated entries, or a single student layer), the teacher
    layer half the depth away.

    Examples:
        >>> shuffled_layer_map([0, 3], 4), shuffled_layer_map([0, 2, 3], 4), shuffled_layer_map([3], 4)
        ([3, 0], [2, 3, 0], [1])
    """
    out = default[1:] + default[:1]
    for i, (d, s) in enumerate(zip(default, out, strict=True)):
        if s == d:
            out[i] = (d + max(teacher_layers // 2, 1)) % teacher_layers
    if teacher_layers > 1 and any(a == b for a, b in zip(default, out, strict=True)):
        raise ValueError(f"no shuffled layer map for {default} over {teacher_layers} layers")
    return out


class StudyArm(nn.Module):
    """One student and (for a KV arm) its projector: ``loss = lm_loss + kv_weight *
    projector.distill_loss(teacher_cache, student_cache, loss)``, as
    :meth:`fastcore.models.KVDistiller.forward` computes it for one teacher reading the
    student's tokens, but with the teacher's cache given (shared by a seed's KV arms)."""

    def __init__(
        self,
        student: nn.Module,
        projector: nn.Module | None = None,
        kv_weight: float = 0.0,
        loss: str | None = None,
        teacher: str = "pretrained",
    ) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.kv_weight = float(kv_weight)
        self.loss = loss
        self.teacher = teacher  # which of the study's teachers the KV loss reads

    def forward(
        self, ids: torch.Tensor, teacher_cache: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        from fastcore.models.kv_distill import output_cache

        kv = self.projector is not None and teacher_cache is not None
        out = self.student(input_ids=ids, labels=ids, use_cache=kv)
        if not kv:
            return out.loss, out.loss, None
        kv_loss = self.projector.distill_loss(
            teacher_cache, output_cache(out, "student"), loss=self.loss
        ).to(out.loss.dtype)
        return out.loss + self.kv_weight * kv_loss, out.loss, kv_loss


class KVStudyModel(nn.Module):
    """Every arm of every seed, trained as one model (``runs.s<seed>.<arm>``).

    The frozen teachers (``{"pretrained": ..., "random": ...}``) are held outside the module
    tree (not in ``state_dict``, not moved by ``.to``: the job places them; checkpoints hold
    the arms only, the pretrained teacher lives in ``teacher.pt``, the random one is its
    seeded initialisation). ``forward(ids [B, S, T])`` (row ``s`` for seed ``seeds[s]``; one
    row serves all seeds) returns ``(total, {(seed, arm): (loss, lm, kv)})``: in training
    the sum of every arm's loss (each arm's gradient is then exactly its own loss's), each
    teacher's cache computed once per seed's batch; in eval mode the LM losses only (no
    teacher, no KV term)."""

    def __init__(
        self, teachers: dict[str, nn.Module], runs: dict[int, dict[str, StudyArm]]
    ) -> None:
        super().__init__()
        self._teachers = dict(teachers)
        self.seeds = list(runs)
        self.arms = list(next(iter(runs.values())))
        self.runs = nn.ModuleDict({f"s{seed}": nn.ModuleDict(arms) for seed, arms in runs.items()})

    @property
    def teacher(self) -> nn.Module:
        """The pretrained teacher."""
        return self._teachers["pretrained"]

    @property
    def teachers(self) -> dict[str, nn.Module]:
        return dict(self._teachers)

    def arm(self, seed: int, arm: str) -> StudyArm:
        return self.runs[f"s{seed}"][arm]

    @torch.no_grad()
    def teacher_cache(self, ids: torch.Tensor, which: str = "pretrained") -> Any:
        """Teacher ``which``'s KV cache for ``ids [B, T]`` (decoder body only, as
        :meth:`fastcore.models.KVDistiller.teacher_cache`)."""
        from fastcore.models.kv_distill import output_cache

        teacher = self._teachers[which]
        body = getattr(teacher, "base_model", None)
        body = teacher if body is None else body
        return output_cache(body(input_ids=ids, use_cache=True), "teacher")

    def forward(self, ids: torch.Tensor):
        if ids.dim() == 2:
            ids = ids[:, None]
        results: dict[tuple[int, str], tuple] = {}
        total = None
        for j, seed in enumerate(self.seeds):
            x = ids[:, j if ids.shape[1] > 1 else 0]
            arms = self.runs[f"s{seed}"]
            caches = {}
            if self.training:
                for arm in arms.values():
                    if arm.projector is not None and arm.teacher not in caches:
                        caches[arm.teacher] = self.teacher_cache(x, arm.teacher)
            for name, arm in arms.items():
                res = arm(x, caches.get(arm.teacher))
                results[(seed, name)] = res
                total = res[0] if total is None else total + res[0]
        return total, results


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _stream_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


def window_nll(model: nn.Module, tiles: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Per-window token-mean NLL (nats) of causal LM ``model`` on ``tiles [N, T]``: the
    mean over the T - 1 predicted tokens of each window (equal counts, so the mean over
    windows is the token mean of the whole set)."""
    was = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, tiles.shape[0], batch):
            ids = tiles[start : start + batch].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            out.append(nll.view(ids.shape[0], -1).mean(1).cpu())
    model.train(was)
    return torch.cat(out).double().numpy()


def pretrain_teacher(
    teacher: nn.Module,
    raw: torch.Tensor,
    small: torch.Tensor,
    seq_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> list[float]:
    """Train ``teacher`` with the LM loss on random windows of the training stream
    (:func:`fastcore.data.text.batches`): AdamW (no weight decay), linear warm-up over a
    tenth of the steps (at most 20) then cosine decay, gradient clipping at 1. Returns the
    loss per step."""
    teacher.to(device).train()
    params = [p for p in teacher.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = min(20, max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(warm, steps, 0.0))
    stream = batches(raw, small, seq_len, batch_size, seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        _, ids = next(stream)
        ids = ids.to(device)
        loss = teacher(input_ids=ids, labels=ids).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher pretraining step {step + 1}: loss {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "[TEACHER] step %d/%d: loss %.4f (%.0f s)",
                step + 1,
                steps,
                losses[-1],
                time.perf_counter() - start,
            )
    teacher.eval()
    return losses


# ----------------------------------------------------------------------------- build


def build(cfg: Config, ctx: JobContext) -> JobParts:
    from fastcore.models import build_tiny_qwen2_pair
    from fastcore.nn import KVProjector

    started = time.perf_counter()
    data, mcfg, tc = cfg.data, cfg.model, cfg.train
    if tc.grad_clip is not None and math.isfinite(tc.grad_clip):
        raise ValueError(
            f"train.grad_clip = {tc.grad_clip}: expected null or inf for kv_study: every arm "
            "trains in one optimizer step, and a global gradient clip would couple the arms"
        )

    if data.val_fraction + data.dev_fraction >= 1:
        raise ValueError(
            f"data.val_fraction + data.dev_fraction = {data.val_fraction + data.dev_fraction}: "
            "expected < 1 (the rest is the training text)"
        )

    # --- data: split by sentence text, one vocabulary over every side
    docs = make_corpus(data.docs, data.seed)
    train_docs, held_docs, *dev = split_sentences(
        docs, data.val_fraction, data.seed, data.dev_fraction
    )
    dev_docs = dev[0] if dev else []
    if not train_docs or not held_docs or (data.dev_fraction > 0 and not dev_docs):
        side = "training" if not train_docs else "held-out" if not held_docs else "dev"
        raise ValueError(
            f"data.val_fraction = {data.val_fraction}, data.dev_fraction = "
            f"{data.dev_fraction} leave no {side} sentence of {data.docs}"
        )
    student_docs = [d for d in train_docs if _unit(d, data.seed + 1) < data.student_fraction]
    if not student_docs:
        raise ValueError(
            f"data.student_fraction = {data.student_fraction} leaves the students no sentence "
            f"of the {len(train_docs)} training sentences"
        )
    train_raw, held_raw = encode_corpus(train_docs), encode_corpus(held_docs)
    student_raw = encode_corpus(student_docs)
    dev_raw = encode_corpus(dev_docs) if dev_docs else torch.zeros(0, dtype=torch.long)
    vocab, small = build_remap(torch.cat([train_raw, held_raw, student_raw, dev_raw]))
    train_small, held_small, student_small, dev_small = small.split(
        [train_raw.numel(), held_raw.numel(), student_raw.numel(), dev_raw.numel()]
    )
    unseen = int((~torch.isin(held_small.unique(), train_small.unique())).sum())
    unseen_student = int((~torch.isin(held_small.unique(), student_small.unique())).sum())
    overlap = overlap_stats(train_small, held_small, data.seq_len)
    shared = len(set(train_docs) & set(held_docs)) + len(
        set(dev_docs) & (set(train_docs) | set(held_docs))
    )
    if shared:  # cannot happen: the split hashes the text
        raise RuntimeError(f"{shared} sentences on two sides of the split")
    val_set = TiledWindows(held_small, data.seq_len)
    dev_set = TiledWindows(dev_small, data.seq_len) if dev_docs else None
    train_set = SeedWindows(
        student_raw, student_small, data.seq_len, data.train_windows, mcfg.seeds, data.seed
    )
    vocab_size = vocab.numel()

    # --- the teacher: pretrained once, reused when everything it depends on matches
    teacher, _ = build_tiny_qwen2_pair(vocab_size, seed=mcfg.teacher_seed)
    tkey = _key(
        {
            "config": {
                k: getattr(teacher.config, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "max_position_embeddings",
                )
            },
            "steps": mcfg.teacher_steps,
            "batch": mcfg.teacher_batch_size,
            "lr": mcfg.teacher_lr,
            "seed": mcfg.teacher_seed,
            "seq_len": data.seq_len,
            "vocab": vocab.tolist(),
            "train": _stream_digest(train_small),
            "data_seed": data.seed,
        }
    )
    tpath = ctx.run_dir / "teacher.pt"
    saved = torch.load(tpath, weights_only=True) if tpath.is_file() else None
    t0 = time.perf_counter()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if saved is not None and saved.get("key") == tkey:
        teacher.load_state_dict(saved["state"])
        losses, reused = saved["losses"].tolist(), True
        log.info("[TEACHER] reusing %s (key %s)", tpath, tkey)
    else:
        reused = False
        if ctx.rank == 0:
            losses = pretrain_teacher(
                teacher,
                train_raw,
                train_small,
                data.seq_len,
                mcfg.teacher_steps,
                mcfg.teacher_batch_size,
                mcfg.teacher_lr,
                data.seed * _WINDOW_SEED + mcfg.teacher_seed + 1,
                ctx.device,
            )
            tpath.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
            tmp = tpath.with_suffix(".tmp")
            torch.save({"key": tkey, "state": state, "losses": torch.tensor(losses)}, tmp)
            tmp.replace(tpath)
        if distributed:
            torch.distributed.barrier()
        if ctx.rank != 0:
            saved = torch.load(tpath, weights_only=True)
            teacher.load_state_dict(saved["state"])
            losses = saved["losses"].tolist()
    teacher.to(ctx.device).eval().requires_grad_(False)
    teacher_windows = window_nll(teacher, val_set.tiles[:, 0])
    teacher_s = time.perf_counter() - t0
    tcfg = teacher.config
    teacher_info = {
        "params": sum(p.numel() for p in teacher.parameters()),
        "layers": tcfg.num_hidden_layers,
        "kv_heads": tcfg.num_key_value_heads,
        "head_dim": tcfg.head_dim,
        "steps": mcfg.teacher_steps,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),
        "nll": float(teacher_windows.mean()),
        "ppl": math.exp(float(teacher_windows.mean())),
        "path": str(tpath),
        "key": tkey,
        "reused": reused,
    }

    # --- the arms: per seed one student init and one projector init shared by all arms
    default_map = None
    runs: dict[int, dict[str, StudyArm]] = {}
    projector_init: dict[int, dict[str, torch.Tensor]] = {}
    for seed in mcfg.seeds:
        _, student0 = build_tiny_qwen2_pair(vocab_size, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            base = KVProjector.from_configs(teacher.config, student0.config)
        default_map = list(base.layer_map)
        projector_init[seed] = {k: v.detach().clone() for k, v in base.state_dict().items()}
        arms = {}
        for name in mcfg.arms:
            loss, trained, layer_map, which = ARMS[name]
            student = copy.deepcopy(student0)
            if loss is None:
                arms[name] = StudyArm(student)
                continue
            lmap = (
                shuffled_layer_map(default_map, tcfg.num_hidden_layers)
                if layer_map == "shuffled"
                else default_map
            )
            proj = KVProjector.from_configs(teacher.config, student.config, layer_map=lmap)
            proj.load_state_dict(projector_init[seed])
            proj.requires_grad_(trained)
            arms[name] = StudyArm(
                student, proj, 0.0, mcfg.control_loss if loss == "control" else loss, which
            )
        runs[seed] = arms
    teachers = {"pretrained": teacher}
    if any(ARMS[a][3] == "random" for a in mcfg.arms):
        # the same teacher before its pretraining: the same seeded initialisation
        random_teacher, _ = build_tiny_qwen2_pair(vocab_size, seed=mcfg.teacher_seed)
        teachers["random"] = random_teacher.to(ctx.device).eval().requires_grad_(False)
        teacher_info["random_ppl"] = math.exp(
            float(window_nll(teachers["random"], val_set.tiles[:, 0]).mean())
        )
    model = KVStudyModel(teachers, runs).to(ctx.device)
    shuffled = shuffled_layer_map(default_map, tcfg.num_hidden_layers)

    # --- the KV weights, fixed before training (training windows at init)
    weights = calibrate(model, train_set, mcfg, ctx.device)
    for seed in mcfg.seeds:
        for name in mcfg.arms:
            arm = model.arm(seed, name)
            if arm.loss is not None:
                arm.kv_weight = weights[arm.loss if arm.teacher == "pretrained" else "random"]
    build_s = time.perf_counter() - started
    data_info = {
        "docs": data.docs,
        "seed": data.seed,
        "seq_len": data.seq_len,
        "vocab": vocab_size,
        "unseen_held_out_tokens": unseen,
        "train_sentences": len(set(train_docs)),
        "student_fraction": data.student_fraction,
        "student_sentences": len(set(student_docs)),
        "student_tokens": student_raw.numel(),
        "unseen_by_students": unseen_student,
        "val_sentences": len(set(held_docs)),
        "shared_sentences": shared,
        "train_tokens": train_raw.numel(),
        "val_tokens": held_raw.numel(),
        "val_windows": len(val_set),
        "dev_fraction": data.dev_fraction,
        "dev_sentences": len(set(dev_docs)),
        "dev_tokens": dev_raw.numel(),
        "dev_windows": len(dev_set) if dev_set is not None else 0,
        "overlap": overlap,
    }
    ngram = ", ".join(f"{n}-grams {100 * v:.0f}%" for n, v in overlap["ngram_share"].items())
    data_info["overlap_text"] = (
        f"{overlap['windows_in_train']} of the {overlap['windows']} held-out windows "
        f"({data.seq_len} tokens) occur anywhere in the training stream; the templated text "
        f"shares shorter pieces (held-out n-grams found in training: {ngram}); "
        f"{unseen} held-out token ids never occur in training."
    )
    data_info["student_text"] = (
        "the students train on all of it"
        if data.student_fraction >= 1
        else f"the students train on {data_info['student_sentences']} of those sentences "
        f"({student_raw.numel():,} tokens; data.student_fraction {data.student_fraction:g}, "
        f"by text), the teacher on all of them; {unseen_student} held-out token ids never "
        "occur in the students' text"
    )

    def loss_fn(model: nn.Module, batch: torch.Tensor):
        total, results = model(batch)
        core = getattr(model, "module", model)
        if core.training:
            metrics = {}
            for name in core.arms:
                rows = [results[(s, name)] for s in core.seeds]
                metrics[f"{name}_lm"] = torch.stack([r[1] for r in rows]).mean().detach()
                if rows[0][2] is not None:
                    metrics[f"{name}_kv"] = torch.stack([r[2] for r in rows]).mean().detach()
            return total, metrics
        metrics = {f"{name}_s{s}": r[1].detach() for (s, name), r in results.items()}
        return total / len(results), metrics

    def evaluate(model: nn.Module) -> dict[str, float]:
        """Every run's token-mean NLL on the dev split (``val_dev_<arm>_s<seed>``)."""
        core = getattr(model, "module", model)
        tiles = dev_set.tiles[:, 0]
        return {
            f"dev_{name}_s{seed}": float(window_nll(core.arm(seed, name).student, tiles).mean())
            for seed in core.seeds
            for name in core.arms
        }

    def sanity() -> str:
        return "\n".join(
            [
                f"data: {data.docs} sentences split by text: {data_info['train_sentences']} "
                f"training ({data_info['train_tokens']} tokens), {data_info['val_sentences']} "
                f"held out ({data_info['val_tokens']} tokens, {len(val_set)} windows of "
                f"{data.seq_len}), {data_info['dev_sentences']} dev ({dev_raw.numel()} "
                f"tokens), 0 shared; vocabulary {vocab_size}; {data_info['student_text']}",
                f"overlap: {data_info['overlap_text']}",
                f"teacher: {teacher_info['params']} params, {mcfg.teacher_steps} steps "
                f"({'reused' if reused else 'trained'}), loss {teacher_info['loss_first']:.3f}"
                f" -> {teacher_info['loss_last']:.3f}, held-out perplexity "
                f"{teacher_info['ppl']:.3f}",
                f"arms: {', '.join(mcfg.arms)} x seeds {mcfg.seeds}; layer map {default_map}, "
                f"shuffled {shuffled}; kv weights mse {weights['mse']:.4g}, cosine "
                f"{weights['cosine']:.4g}"
                + (f", random teacher {weights['random']:.4g}" if "random" in weights else "")
                + f" ({weights['how']})",
            ]
        )

    def finish(trainer) -> None:
        report(trainer, cfg, model, val_set, teacher_info, teacher_windows, data_info,
               weights, default_map, shuffled, {"build_s": build_s, "teacher_s": teacher_s,
                                                 "started": started})  # fmt: skip

    return JobParts(
        model=model,
        train_set=train_set,
        val_set=val_set,
        loss_fn=loss_fn,
        sanity=sanity,
        finish=finish,
        evaluate=evaluate if dev_set is not None else None,
        evaluate_metrics=tuple(f"dev_{a}_s{s}" for s in mcfg.seeds for a in mcfg.arms)
        if dev_set is not None
        else (),
    )


@torch.no_grad()
def calibrate(
    model: KVStudyModel, train_set: SeedWindows, mcfg: ModelConfig, device: torch.device
) -> dict[str, Any]:
    """The KV weights: given in the config, or ``kv_balance * lm_init / kv_init`` per loss,
    with the losses at initialisation measured on the first ``calib_windows`` training
    windows of the first seed (its student and projector as they start). ``random``: the
    weight of the random-teacher control (``control_loss``), by the same rule against the
    random teacher's KV (the given weight of that loss when one is given)."""
    from fastcore.models.kv_distill import output_cache
    from fastcore.nn import KVProjector

    seed = model.seeds[0]
    student = model.arm(seed, "lm").student
    n = min(mcfg.calib_windows, len(train_set))
    ids = torch.stack([train_set[i][0] for i in range(n)]).to(device)
    init = next(
        (
            model.arm(seed, a).projector
            for a in model.arms
            if model.arm(seed, a).projector is not None
        ),
        None,
    )
    proj = KVProjector.from_configs(model.teacher.config, student.config).to(device)
    if init is not None:
        proj.load_state_dict(init.state_dict())
    was = student.training
    student.eval()
    out = student(input_ids=ids, labels=ids, use_cache=True)
    student.train(was)
    cache = output_cache(out, "student")
    kv_init = {
        loss: float(proj.distill_loss(model.teacher_cache(ids), cache, loss=loss))
        for loss in ("mse", "cosine")
    }
    if "random" in model.teachers:
        kv_init["random"] = float(
            proj.distill_loss(model.teacher_cache(ids, "random"), cache, loss=mcfg.control_loss)
        )
    lm_init = float(out.loss)
    given = {"mse": mcfg.kv_weight_mse, "cosine": mcfg.kv_weight_cosine}
    given["random"] = given[mcfg.control_loss]
    weights, how = {}, []
    for key in kv_init:
        if given[key] is not None:
            weights[key] = given[key]
        else:
            weights[key] = mcfg.kv_balance * lm_init / kv_init[key]
    for loss in ("mse", "cosine"):
        how.append(
            f"{loss} from model.kv_weight_{loss}"
            if given[loss] is not None
            else f"{loss}: kv_weight x kv_loss = {mcfg.kv_balance:g} x lm_loss at init"
        )
    if "random" in kv_init:
        how.append(
            "the random-teacher control: "
            + ("the same given weight" if given["random"] is not None else "the same rule")
        )
    return {**weights, "lm_init": lm_init, "kv_init": kv_init, "how": "; ".join(how)}


# ---------------------------------------------------------------------------- report


def read_curves(metrics_file: Path, arms: list[str], seeds: list[int], prefix: str = "val_"):
    """``{arm: {step: {seed: NLL}}}`` from the run's ``val`` rows (``prefix`` ``val_``: the
    held-out split, ``val_dev_``: the dev split), those since its last fresh start (the
    last step-0 validation) when there is one; the last row of a step wins (a resumed run
    validates some steps again)."""
    if not metrics_file.is_file():
        return {}
    rows = []
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") != "val":
            continue
        if row["step"] == 0:
            rows = []
        rows.append(row)
    curves: dict[str, dict[int, dict[int, float]]] = {a: {} for a in arms}
    for row in rows:
        if not all(f"{prefix}{a}_s{s}" in row for a in arms for s in seeds):
            continue
        for a in arms:
            curves[a][row["step"]] = {s: row[f"{prefix}{a}_s{s}"] for s in seeds}
    return {a: c for a, c in curves.items() if c}


def early_stopped(
    curves: dict[str, dict[int, dict[int, float]]], dev: dict[str, dict[int, dict[int, float]]]
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, int]]]:
    """Each run stopped at the validation (after step 0) with its lowest dev NLL (the
    earliest on a tie): ``({arm: {seed: held-out NLL there}}, {arm: {seed: that step}})``.
    The held-out split plays no part in the choice."""
    nll: dict[str, dict[int, float]] = {}
    steps: dict[str, dict[int, int]] = {}
    for arm, by_step in dev.items():
        candidates = [s for s in sorted(by_step) if s > 0 and s in curves.get(arm, {})]
        if not candidates:
            return {}, {}
        nll[arm], steps[arm] = {}, {}
        for seed in by_step[candidates[0]]:
            best = min(candidates, key=lambda s: (by_step[s][seed], s))
            steps[arm][seed] = best
            nll[arm][seed] = curves[arm][best][seed]
    return nll, steps


def report(
    trainer,
    cfg: Config,
    model: KVStudyModel,
    val_set: TiledWindows,
    teacher_info: dict,
    teacher_windows: np.ndarray,
    data_info: dict,
    weights: dict,
    default_map: list[int],
    shuffled: list[int],
    timing: dict,
) -> dict[str, Any]:
    """Score every student window by window, compute the tables and write report.md,
    results.json and val_ppl.png into the run directory; log the table."""
    mcfg, tc = cfg.model, cfg.train
    run_dir = trainer.run_dir
    core = getattr(trainer.model, "module", trainer.model)
    t0 = time.perf_counter()
    tiles = val_set.tiles[:, 0]
    windows = {a: {} for a in mcfg.arms}
    nll = {a: {} for a in mcfg.arms}
    for seed in mcfg.seeds:
        for name in mcfg.arms:
            w = window_nll(core.arm(seed, name).student, tiles)
            windows[name][seed] = w
            nll[name][seed] = float(w.mean())
    curves = read_curves(run_dir / "metrics.jsonl", mcfg.arms, mcfg.seeds)
    dev_curves = read_curves(run_dir / "metrics.jsonl", mcfg.arms, mcfg.seeds, "val_dev_")
    es_nll, es_steps = early_stopped(curves, dev_curves) if dev_curves else ({}, {})
    es_table = (
        summarize(es_nll, None, mcfg.alpha, control_of=f"kv_{mcfg.control_loss}")
        if es_nll
        else None
    )
    table = summarize(
        nll,
        windows if mcfg.bootstrap else None,
        mcfg.alpha,
        control_of=f"kv_{mcfg.control_loss}",
        resamples=mcfg.bootstrap,
        seed=cfg.data.seed,
    )
    early = None if es_table is None else {"table": es_table, "nll": es_nll, "steps": es_steps}
    words = study_conclusion(table, trainer.step, early)
    spread = 0.0
    if 0 in next(iter(curves.values()), {}):
        for seed in mcfg.seeds:
            vals = [curves[a][0][seed] for a in mcfg.arms]
            spread = max(spread, max(vals) - min(vals))
        init_ppl = float(np.mean([math.exp(curves["lm"][0][s]) for s in mcfg.seeds]))
    else:
        spread, init_ppl = float("nan"), float("nan")
    plot = None
    png = run_dir / "val_ppl.png"
    if mcfg.plot and curves and plot_curves(curves, png, teacher_info["ppl"], "lm", mcfg.alpha):
        plot = png.name
    student = core.arm(mcfg.seeds[0], "lm").student
    scfg = student.config
    total_s = time.perf_counter() - timing["started"]
    result = {
        "conclusion": words,
        "table": table,
        "nll": nll,
        "curves": curves,
        "dev_curves": dev_curves,
        "early_stopping": early,
        "plot": plot,
        "teacher": teacher_info,
        "data": data_info,
        "setup": {
            "steps": trainer.step,
            "arms": mcfg.arms,
            "arm_docs": {a: ARM_DOCS[a] for a in mcfg.arms},
            "seeds": mcfg.seeds,
            "batch_size": tc.batch_size,
            "lr": tc.lr,
            "warmup": tc.warmup_steps,
            "weight_decay": tc.weight_decay,
            "grad_clip": None if tc.grad_clip is None or math.isinf(tc.grad_clip) else tc.grad_clip,
            "optimizer_note": (
                "one AdamW over every arm (the Trainer's: parameters of 2+ dimensions in the "
                "weight-decay group, the rest without; the projectors' parameters in those "
                "same groups, with the students' lr and betas; the training layer has no "
                "per-module groups). AdamW is elementwise and nothing is clipped, so an arm's "
                "update depends on its own loss only, and the lm arm trains exactly as it "
                "would alone (a step skipped for a non-finite gradient is skipped for every "
                "arm: the run's log says [NAN] if that happened); the frozen random projector "
                "is in no group."
            ),
            "kv_weights": weights,
            "control_loss": mcfg.control_loss,
            "layer_map": default_map,
            "shuffled_map": shuffled,
            "bootstrap": mcfg.bootstrap,
            "eval_every": tc.eval_every_steps,
            "step0_spread": spread,
            "init_ppl": init_ppl,
            "student_params": sum(p.numel() for p in student.parameters()),
            "student_layers": scfg.num_hidden_layers,
            "student_kv_heads": scfg.num_key_value_heads,
            "student_head_dim": scfg.head_dim,
        },
        "runs": {
            f"{name}/s{seed}": {
                "arm": name,
                "seed": seed,
                "nll": nll[name][seed],
                "ppl": math.exp(nll[name][seed]),
                "window_nll": windows[name][seed].tolist(),
                "curve": {str(st): v[seed] for st, v in curves.get(name, {}).items()},
                "dev_curve": {str(st): v[seed] for st, v in dev_curves.get(name, {}).items()},
                "early_stop_step": es_steps.get(name, {}).get(seed),
            }
            for name in mcfg.arms
            for seed in mcfg.seeds
        },
        "teacher_window_nll": teacher_windows.tolist(),
        "runtime": {
            "total_s": total_s,
            "teacher_s": timing["teacher_s"],
            "build_s": timing["build_s"],
            "study_s": total_s - timing["build_s"],
            "report_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f} at the end"
            if hasattr(os, "getloadavg")
            else platform.machine(),
        },
        "config": cfg.to_dict(),
    }
    (run_dir / "results.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    (run_dir / "report.md").write_text(render_markdown(result))
    log.info("[STUDY] held-out perplexity after %d steps, %d seeds:", trainer.step,
             len(mcfg.seeds))  # fmt: skip
    for line in [*table_lines(table), "", *control_lines(table)]:
        if line:
            log.info("[STUDY] %s", line)
    for line in words:
        log.info("[STUDY] %s", line)
    log.info("[STUDY] wrote %s, %s%s", run_dir / "report.md", run_dir / "results.json",
             f" and {run_dir / plot}" if plot else "")  # fmt: skip
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
