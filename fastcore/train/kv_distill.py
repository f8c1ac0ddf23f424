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
    model_dir: str | None = option(None, "a local HF checkpoint used as the (first) teacher")
    student_dir: str | None = option(None, "a local HF checkpoint used as the student")


@dataclass
class ModelConfig:
    """The distillation."""

    kv_weight: float = option(1.0, "weight of the KV loss next to the LM loss", ge=0)
    loss: Literal["mse", "cosine"] = option(
        "mse", "'mse' or 'cosine' between projected teacher KV and student KV"
    )
    teachers: int = option(
        1,
        "number of teachers; above 1 a MultiTeacherKVProjector fuses them with learned "
        "weights per layer and K/V (logged as fusion_w<n>); teacher n > 0 is a tiny Qwen2 of "
        "another shape (3 layers, 4 KV heads of head_dim 24) seeded with data.seed + n",
        ge=1,
        le=8,
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
    teachers = [teacher]
    for n in range(1, mcfg.teachers):
        other, _ = build_tiny_qwen2_pair(
            vocab.numel(),
            teacher_layers=3,
            teacher_heads=8,
            teacher_kv_heads=4,
            teacher_head_dim=24,
            teacher_hidden=192,
            seed=data.seed + n,
        )
        teachers.append(other)
    model = KVDistiller(
        teachers if mcfg.teachers > 1 else teacher,
        student,
        kv_weight=mcfg.kv_weight,
        loss=mcfg.loss,
    )
    teacher_raw, student_raw = bool(data.model_dir), bool(data.student_dir)

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw_ids, small_ids = batch
        first = raw_ids if teacher_raw else small_ids
        out = model(
            raw_ids if student_raw else small_ids,
            teacher_input_ids=[first] + [small_ids] * (mcfg.teachers - 1)
            if mcfg.teachers > 1
            else first,
        )
        metrics = {"lm_loss": out.lm_loss.detach(), "kv_loss": out.kv_loss.detach()}
        if out.fusion_weights is not None:  # [N, 2*Ls]: each teacher's mean weight
            for n, w in enumerate(out.fusion_weights.mean(-1)):
                metrics[f"fusion_w{n}"] = w
        return out.loss, metrics

    def sanity() -> str:
        corpus = (
            f"corpus: {data.docs} sentences, {raw.numel()} Qwen tokens, {vocab.numel()} distinct"
        )
        if mcfg.teachers == 1:
            return f"{corpus}; projector: {model.projector.extra_repr()}"
        projectors = "; ".join(p.extra_repr() for p in model.projector.projectors)
        return (
            f"{corpus}; {mcfg.teachers} teachers fused by learned weights; projectors: {projectors}"
        )

    origin = (
        f"local checkpoint {data.model_dir} (data.model_dir)"
        if data.model_dir
        else f"tiny Qwen2 built from its config, seed {data.seed}"
    )
    if mcfg.teachers > 1:
        origin += f"; teachers 1..{mcfg.teachers - 1}: tiny Qwen2s, seeds data.seed + n"
    return JobParts(
        model=model,
        train_set=TokenWindows(raw, small, data.seq_len, data.train_windows, data.seed),
        val_set=TokenWindows(raw, small, data.seq_len, data.val_windows, data.seed + 1),
        loss_fn=loss_fn,
        sanity=sanity,
        # The frozen teacher(s) are rebuilt from the config: checkpoints hold their identity.
        frozen={"teacher": origin},
    )
