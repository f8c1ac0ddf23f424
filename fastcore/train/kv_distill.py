"""The KV-distillation job: ``python -m fastcore.train --config configs/kv_distill.yaml``.

A teacher causal LM (tiny Qwen2 with 12 KV heads built from a config, or a local
checkpoint with ``data.model_dir``) distilled into a GQA student (2 KV heads, or
``data.student_dir``) through :class:`~fastcore.models.KVDistiller`: loss = the student's LM
loss + ``kv_weight`` x the fused KV distillation loss over every layer. The text is the
seeded corpus of :mod:`fastcore.data.text` encoded with the real Qwen tokenizer. The same
run as ``scripts/distill_kv.py``, on the training layer (AMP, clipping, NaN scan,
checkpoints, torchrun).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fastcore.data.text import (
    TokenWindows,
    build_remap,
    check_vocab,
    encode_corpus,
    load_local,
    make_corpus,
)
from fastcore.train.config import SEED_MAX, Config, option
from fastcore.train.jobs import JobContext, JobParts


@dataclass
class DataConfig:
    """The corpus and its windows."""

    docs: int = option(2000, "sentences in the generated corpus", ge=1)
    seq_len: int = option(64, "tokens per window", ge=2)
    train_windows: int = option(800, "training windows per epoch", ge=1)
    val_windows: int = option(64, "validation windows", ge=1)
    seed: int = option(0, "seed of the corpus, the windows and the tiny models", ge=0, le=SEED_MAX)
    model_dir: str | None = option(None, "a local HF checkpoint used as the teacher")
    student_dir: str | None = option(None, "a local HF checkpoint used as the student")


@dataclass
class ModelConfig:
    """The distillation."""

    kv_weight: float = option(1.0, "weight of the KV loss next to the LM loss", ge=0)
    loss: Literal["mse", "cosine"] = option(
        "mse", "'mse' or 'cosine' between projected teacher KV and student KV"
    )


def build(cfg: Config, ctx: JobContext) -> JobParts:
    from fastcore.models import KVDistiller, build_tiny_qwen2_pair

    data, mcfg = cfg.data, cfg.model
    raw = encode_corpus(make_corpus(data.docs, data.seed))
    vocab, small = build_remap(raw)
    tiny_teacher, tiny_student = build_tiny_qwen2_pair(vocab.numel(), seed=data.seed)
    teacher = load_local(data.model_dir) if data.model_dir else tiny_teacher
    student = load_local(data.student_dir) if data.student_dir else tiny_student
    if data.model_dir:
        check_vocab(teacher, raw, "data.model_dir")
    if data.student_dir:
        check_vocab(student, raw, "data.student_dir")
    model = KVDistiller(teacher, student, kv_weight=mcfg.kv_weight, loss=mcfg.loss)
    teacher_raw, student_raw = bool(data.model_dir), bool(data.student_dir)

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw_ids, small_ids = batch
        out = model(
            raw_ids if student_raw else small_ids,
            teacher_input_ids=raw_ids if teacher_raw else small_ids,
        )
        return out.loss, {"lm_loss": out.lm_loss.detach(), "kv_loss": out.kv_loss.detach()}

    def sanity() -> str:
        return (
            f"corpus: {data.docs} sentences, {raw.numel()} Qwen tokens, {vocab.numel()} "
            f"distinct; projector: {model.projector.extra_repr()}"
        )

    return JobParts(
        model=model,
        train_set=TokenWindows(raw, small, data.seq_len, data.train_windows, data.seed),
        val_set=TokenWindows(raw, small, data.seq_len, data.val_windows, data.seed + 1),
        loss_fn=loss_fn,
        sanity=sanity,
    )
