"""The temporal-alignment job: ``python -m fastcore.train --config configs/temporal_align.yaml``.

A :class:`~fastcore.nn.TemporalEncoder` learns to turn resource curves into prefix
embeddings a frozen causal LM reads (:class:`~fastcore.models.TemporalLLMWrapper`), trained
only with the LM loss on the answers of :class:`~fastcore.data.temporal_pretrain.
TemporalPretrainDataset` (curves, prompts and targets generated lazily from a seed, encoded
with the real Qwen tokenizer).

The LM: a local Qwen2/Qwen2.5 checkpoint (``model.llm_dir``, read with its own hidden size
and the Qwen ids), or by default a small ``Qwen2ForCausalLM`` built from a config over the
corpus' compact vocabulary and first warmed up on the descriptions (``model.lm_steps``
steps, prompt -> target) so that it knows the language before it is frozen. A pretrained
LLM can read soft prefixes; a tiny LM trained from scratch on text alone never learns to
(measured: its answers ignored an aligned encoder entirely), so by default
(``model.lm_reader="probe"``) the warm-up puts the prefix of a throwaway
:class:`CurveProbe` (a linear map of resampled curve values, in the encoder's token layout)
before every item and trains it along. The probe is then discarded: the encoder starts from
scratch against the frozen LM, and the shuffled-curve control tells whether it aligned.
The warm-up is saved as ``<run_dir>/lm.pt`` (or ``model.lm_path``, which runs can share)
and reused when its settings match.

Validation reports the teacher-forced answer loss with the true curves and with the curves
permuted across the batch (the shuffled-curve control), on items of their own seed and the
equal task mix whatever ``data.task_mix`` trains on; at the end
:func:`fastcore.train.temporal_report.evaluate_alignment` generates answers for
``data.eval_samples`` held-out items under both and writes ``alignment.json`` and
``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fastcore.data.resources import RESOURCES
from fastcore.data.temporal_pretrain import (
    TemporalBatch,
    TemporalPretrainDataset,
    TokenVocab,
    collate_temporal,
)
from fastcore.train.config import SEED_MAX, Config, formats_with, option
from fastcore.train.jobs import JobContext, JobParts
from fastcore.train.temporal_report import (
    answer_stats,
    evaluate_alignment,
    write_report,
)
from fastcore.train.trainer import cosine_with_warmup

log = logging.getLogger("fastcore.train")

_VAL_OFFSET = 10_000_000  # validation items are drawn from their own seed (seed + this)


@dataclass
class DataConfig:
    """The generated corpus and the evaluation."""

    size: int = option(100_000, "training items, generated lazily from the seed", ge=1)
    val_size: int = option(256, "validation items (teacher-forced loss each validation)", ge=2)
    eval_samples: int = option(
        384, "held-out items the final evaluation generates answers for", ge=2
    )
    seed: int = option(
        0, "seed of the curves, descriptions and task draws", ge=0, le=SEED_MAX - 2 * _VAL_OFFSET
    )
    task_mix: list[float] = option(
        [1.0, 1.0, 1.0],
        "relative weights of trend, bottleneck, feasibility",
        ge=0,
        length=3,
        check=lambda mix: sum(mix) > 0,
        expected="a list of 3 finite floats >= 0, not all 0",
    )
    vocab_samples: int = option(1000, "items per task scanned for the tiny LM's vocabulary", ge=1)
    max_new_tokens: int = option(64, "generation length limit in the final evaluation", ge=1)
    report_examples: int = option(
        12, "examples (curve, prompt, truth, generations) in report.html", ge=0
    )


@dataclass
class ModelConfig:
    """The frozen LM (and its warm-up) and the encoder."""

    llm_dir: str | None = option(None, "a local Qwen2/Qwen2.5 checkpoint used as the frozen LM")
    hidden: int = option(128, "tiny LM: hidden size (a multiple of 2 x heads)", ge=1)
    layers: int = option(4, "tiny LM: decoder layers", ge=1)
    heads: int = option(4, "tiny LM: attention heads (a multiple of kv_heads)", ge=1)
    kv_heads: int = option(2, "tiny LM: key/value heads (GQA)", ge=1)
    intermediate: int = option(384, "tiny LM: MLP width", ge=1)
    lm_steps: int = option(1600, "tiny LM: warm-up steps on the descriptions", ge=0)
    lm_batch_size: int = option(64, "tiny LM: warm-up batch size", ge=1)
    lm_lr: float = option(
        3e-3, "tiny LM: warm-up peak learning rate (cosine, 20 warm-up steps)", gt=0
    )
    lm_reader: Literal["probe", "none"] = option(
        "probe",
        "tiny LM: 'probe' warms it up reading curves through a throwaway linear reader "
        "(discarded; the encoder starts fresh), 'none' on the text alone",
    )
    lm_reader_points: int = option(
        8, "tiny LM: resampled points per prefix token of the probe", ge=1
    )
    lm_path: str | None = option(
        None,
        "where the warm-up is saved/reused (default <run_dir>/lm.pt); '{key}' in it becomes "
        "the key of the warm-up's settings",
        check=lambda path: path is None or formats_with("key")(path),
        expected="null or a path whose only placeholder is {key}",
    )
    width: int = option(32, "encoder: channels per convolution branch", ge=1)
    kernel_sizes: list[int] = option(
        [3, 5, 7],
        "encoder: one branch per (odd) kernel size",
        ge=1,
        check=lambda sizes: len(sizes) > 0 and all(k % 2 == 1 for k in sizes),
        expected="a non-empty list of odd ints >= 1",
    )
    depth: int = option(2, "encoder: convolution layers per branch", ge=1)
    pooling: Literal["meanmax", "mean", "max"] = option(
        "meanmax", "encoder: 'meanmax', 'mean' or 'max' per segment"
    )
    prefix_tokens: int = option(
        2, "encoder: k, time segments per prefix (per variable with tokens=channel)", ge=1
    )
    tokens: Literal["channel", "time"] = option(
        "channel", "encoder: 'channel' (k tokens per resource) or 'time' (k tokens in all)"
    )
    projector_layers: int = option(2, "encoder: Linear layers of the projector", ge=1)


def resource_scale() -> torch.Tensor:
    """Each resource's upper bound, the divisor that puts curves on a 0..1 scale."""
    return torch.tensor([r.hi for r in RESOURCES])


def _lm_config(mcfg: ModelConfig, vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=mcfg.hidden,
        intermediate_size=mcfg.intermediate,
        num_hidden_layers=mcfg.layers,
        num_attention_heads=mcfg.heads,
        num_key_value_heads=mcfg.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def _warmup_key(data: DataConfig, mcfg: ModelConfig, vocab: TokenVocab, seed: int) -> str:
    fields = {
        k: getattr(mcfg, k)
        for k in (
            "hidden",
            "layers",
            "heads",
            "kv_heads",
            "intermediate",
            "lm_steps",
            "lm_batch_size",
            "lm_lr",
            "lm_reader",
        )
    }
    if mcfg.lm_reader == "probe":  # the probe's layout is the encoder's
        fields.update(points=mcfg.lm_reader_points, segments=mcfg.prefix_tokens, tokens=mcfg.tokens)
    blob = json.dumps([fields, data.seed, data.task_mix, vocab.ids.tolist(), seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _keyed(path: Path, key: str) -> Path:
    """``lm.pt`` -> ``lm-<key>.pt``: where a replaced warm-up is kept."""
    return path.with_name(f"{path.stem}-{key}{path.suffix}")


class CurveProbe(nn.Module):
    """The throwaway reader of the LM warm-up: prefix tokens in the layout of a
    :class:`~fastcore.nn.TemporalEncoder` with the same ``channels``, ``segments`` and
    ``tokens``, each a linear map (then LayerNorm) of the curve's values over its span.

    The valid steps of every curve are split into ``segments x points`` equal spans and
    averaged (scaled by ``scale``); a token gets its segment's ``points`` values (of its
    variable with ``tokens="channel"``, plus a one-hot of the variable; of every variable
    with ``"time"``) and the curve's length over ``length_scale``. A tiny LM trained from
    scratch has never read an embedding that is not a token's; warmed up with this reader it
    learns to, and the encoder aligned afterwards starts from scratch against the frozen LM.
    """

    def __init__(
        self,
        channels: int,
        d_model: int,
        segments: int,
        tokens: str = "channel",
        points: int = 8,
        scale: torch.Tensor | None = None,
        length_scale: float = 100.0,
    ) -> None:
        super().__init__()
        from fastcore.nn.temporal import TOKEN_LAYOUTS

        if tokens not in TOKEN_LAYOUTS:
            raise ValueError(f"tokens must be one of {TOKEN_LAYOUTS}, got {tokens!r}")
        if min(channels, d_model, segments, points) < 1 or length_scale <= 0:
            raise ValueError(
                "channels, d_model, segments, points must be >= 1 and length_scale > 0, got "
                f"{channels}, {d_model}, {segments}, {points}, {length_scale}"
            )
        self.channels, self.segments, self.tokens, self.points = channels, segments, tokens, points
        self.length_scale = float(length_scale)
        per_token = points + 1 + channels if tokens == "channel" else points * channels + 1
        self.linear = nn.Linear(per_token, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer(
            "scale",
            torch.ones(channels) if scale is None else torch.as_tensor(scale, dtype=torch.float32),
        )

    def forward(self, curves: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        from fastcore.nn.temporal import masked_segment_pool, variable_onehot

        batch, steps, channels = curves.shape
        if mask is None:
            mask = torch.ones(batch, steps, dtype=torch.bool, device=curves.device)
        x = masked_segment_pool(
            curves / self.scale.to(curves.dtype), mask.bool(), self.segments * self.points, "mean"
        ).view(batch, self.segments, self.points, channels)
        if self.tokens == "channel":  # (B, C S, P + C), variable-major
            x = x.permute(0, 3, 1, 2).reshape(batch, channels * self.segments, self.points)
            onehot = variable_onehot(batch, channels, self.segments, x.dtype, curves.device)
            x = torch.cat([x, onehot], -1)
        else:  # (B, S, P C)
            x = x.reshape(batch, self.segments, self.points * channels)
        length = mask.sum(1).to(x.dtype) / self.length_scale
        x = torch.cat([x, length[:, None, None].expand(-1, x.shape[1], 1)], -1)
        return self.norm(self.linear(x))


def warm_up_lm(
    lm: nn.Module,
    dataset: TemporalPretrainDataset,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    reader: nn.Module | None = None,
) -> list[float]:
    """Train ``lm`` on ``dataset`` (prompt -> target): on the text alone, or with the
    prefix of ``reader`` (a :class:`CurveProbe`, trained along) before it. AdamW, 20
    warm-up steps then cosine decay, gradient clipping at 1. Returns the loss per step."""
    from fastcore.models.temporal_llm import prefixed_inputs

    lm.to(device).train()
    params = [p for p in lm.parameters() if p.requires_grad]
    if reader is not None:
        reader.to(device).train()
        params += list(reader.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = min(20, max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(warm, steps, 0.0))
    g = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
        b = collate_temporal([dataset[i] for i in idx], pad_id=dataset.eos_id_model).to(device)
        if reader is None:
            out = lm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        else:
            prefix = reader(b.curves, b.curve_mask)
            out = lm(**prefixed_inputs(lm, prefix, b.input_ids, b.attention_mask, b.labels))
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"LM warm-up step {step}: loss {out.loss.item()}")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(out.loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "[LM warm-up] step %d/%d: loss %.4f (%.0f s)",
                step + 1,
                steps,
                losses[-1],
                time.perf_counter() - start,
            )
    lm.eval()
    return losses


def build_lm(
    data: DataConfig,
    mcfg: ModelConfig,
    dataset: TemporalPretrainDataset,
    ctx: JobContext,
) -> tuple[nn.Module, dict]:
    """The frozen LM for the run and a description of where it came from."""
    if mcfg.llm_dir:
        from fastcore.data.text import load_local

        lm = load_local(mcfg.llm_dir)
        origin = f"local checkpoint {Path(mcfg.llm_dir).resolve()} (model.llm_dir)"
        return lm, {"source": mcfg.llm_dir, "vocab": "qwen", "origin": origin}
    from transformers import Qwen2ForCausalLM

    vocab = dataset.vocab
    key = _warmup_key(data, mcfg, vocab, ctx.seed)
    path = Path(mcfg.lm_path.format(key=key)) if mcfg.lm_path else ctx.run_dir / "lm.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        lm = Qwen2ForCausalLM(_lm_config(mcfg, len(vocab)))
    saved = None
    # the warm-up of other settings, moved aside when a run with these replaced it
    for candidate in dict.fromkeys([path, _keyed(path, key)]):
        if candidate.is_file():
            found = torch.load(candidate, weights_only=True)
            if found.get("key") == key:
                saved, path = found, candidate
                break
    if saved is not None:
        lm.load_state_dict(saved["state"])
        losses = saved["losses"].tolist()
        log.info("[LM warm-up] reusing %s (key %s)", path, key)
    else:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if ctx.rank == 0:
            reader = None
            if mcfg.lm_reader == "probe":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(ctx.seed + 1)
                    reader = CurveProbe(
                        len(RESOURCES),
                        mcfg.hidden,
                        mcfg.prefix_tokens,
                        mcfg.tokens,
                        mcfg.lm_reader_points,
                        scale=resource_scale(),
                    )
            losses = warm_up_lm(
                lm,
                dataset,
                mcfg.lm_steps,
                mcfg.lm_batch_size,
                mcfg.lm_lr,
                ctx.seed,
                ctx.device,
                reader,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                # Checkpoints identify the frozen LM instead of storing it, so the warm-up
                # of other settings (an earlier run's, needed to resume or evaluate it) is
                # kept as lm-<key>.pt, where a run with its settings finds it again.
                other = torch.load(path, weights_only=True).get("key")
                aside = _keyed(path, other) if other else None
                if aside is not None and aside != path and not aside.exists():
                    path.replace(aside)
                    log.info("[LM warm-up] kept the warm-up of other settings as %s", aside)
            tmp = path.with_suffix(".tmp")
            state = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
            torch.save({"key": key, "state": state, "losses": torch.tensor(losses)}, tmp)
            tmp.replace(path)
        if distributed:
            torch.distributed.barrier()
        if ctx.rank != 0:
            saved = torch.load(path, weights_only=True)
            lm.load_state_dict(saved["state"])
            losses = saved["losses"].tolist()
    how = "reading curves through the probe" if mcfg.lm_reader == "probe" else "on text alone"
    origin = (
        f"tiny Qwen2 built from model.hidden/layers/heads/kv_heads/intermediate with seed "
        f"{ctx.seed} over a {len(vocab)}-token vocabulary, warmed up {mcfg.lm_steps} steps "
        f"{how} (warm-up key {key}, saved as {path})"
    )
    return lm, {
        "source": "tiny Qwen2 from config",
        "origin": origin,
        "reader": mcfg.lm_reader,
        "config": {
            k: getattr(mcfg, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")
        },
        "vocab": len(vocab),
        "warmup_steps": len(losses),
        "warmup_loss_first": losses[0] if losses else None,
        "warmup_loss_last": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
        "path": str(path),
    }


def build(cfg: Config, ctx: JobContext) -> JobParts:
    from fastcore.models.temporal_llm import TemporalLLMWrapper, llm_hidden_size
    from fastcore.nn.temporal import TemporalEncoder

    data, mcfg = cfg.data, cfg.model
    if not mcfg.llm_dir and (
        mcfg.hidden % (2 * mcfg.heads) or mcfg.heads % mcfg.kv_heads
    ):  # rotary embeddings need an even head size
        raise ValueError(
            f"model.hidden ({mcfg.hidden}) must be a multiple of 2 x model.heads ({mcfg.heads}) "
            f"and model.heads a multiple of model.kv_heads ({mcfg.kv_heads})"
        )
    train_set = TemporalPretrainDataset(data.size, data.seed, data.task_mix)
    if not mcfg.llm_dir:
        train_set.vocab = TokenVocab.from_dataset(train_set, data.vocab_samples)
    val_seed = data.seed + _VAL_OFFSET
    # validation and evaluation always ask the three tasks equally often, so runs with
    # different training mixes are compared on the same items
    val_set = TemporalPretrainDataset(
        data.val_size, val_seed, None, train_set.vocab, train_set.tokenizer
    )
    lm, lm_info = build_lm(data, mcfg, train_set, ctx)
    encoder = TemporalEncoder(
        len(RESOURCES),
        llm_hidden_size(lm),
        width=mcfg.width,
        kernel_sizes=tuple(mcfg.kernel_sizes),
        depth=mcfg.depth,
        prefix_tokens=mcfg.prefix_tokens,
        scale=resource_scale(),
        pooling=mcfg.pooling,
        projector_layers=mcfg.projector_layers,
        tokens=mcfg.tokens,
    )
    model = TemporalLLMWrapper(lm, encoder)
    pad_id = train_set.eos_id_model

    def collate(items):
        return collate_temporal(items, pad_id=pad_id)

    def loss_fn(model: nn.Module, batch: TemporalBatch):
        out = model(
            batch.curves,
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            curve_mask=batch.curve_mask,
        )
        return out.loss, {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        core = getattr(model, "module", model)
        sums = {True: None, False: None}
        with torch.no_grad():
            for start in range(0, len(val_set), cfg.train.batch_size):
                items = [
                    val_set[i]
                    for i in range(start, min(start + cfg.train.batch_size, len(val_set)))
                ]
                if len(items) < 2:
                    continue
                batch = collate(items).to(ctx.device)
                for shuffle in (False, True):
                    s = answer_stats(core, batch, shuffle)
                    sums[shuffle] = (
                        s if sums[shuffle] is None else {k: sums[shuffle][k] + s[k] for k in s}
                    )
        out = {}
        for shuffle, tag in ((False, ""), (True, "shuffled_")):
            s = sums[shuffle]
            out[f"{tag}answer_nll"] = float(s["nll"].sum() / s["count"].sum())
            out[f"{tag}token_acc"] = float(s["correct"].sum() / s["count"].sum())
        return out

    def sanity() -> str:
        lines = [
            f"LM: {lm_info['source']}, hidden {llm_hidden_size(lm)}, vocabulary "
            f"{lm_info['vocab']}, frozen ({sum(p.numel() for p in lm.parameters())} params)",
            f"encoder: {sum(p.numel() for p in encoder.parameters())} params, "
            f"{encoder.prefix_tokens} prefix tokens ({mcfg.prefix_tokens} segments, tokens "
            f"per {mcfg.tokens}), kernels {mcfg.kernel_sizes}, depth "
            f"{mcfg.depth}, pooling {mcfg.pooling}, projector {mcfg.projector_layers} layers",
            f"data: {data.size} training items (seed {data.seed}), {data.val_size} validation "
            f"items (seed {val_seed}, equal task mix), training task mix {data.task_mix}",
        ]
        if lm_info.get("warmup_steps"):
            how = "with the throwaway curve probe" if mcfg.lm_reader == "probe" else "text only"
            lines.append(
                f"LM warm-up ({how}): "
                f"{lm_info['warmup_steps']} steps, loss "
                f"{lm_info['warmup_loss_first']:.3f} -> {lm_info['warmup_loss_last']:.3f}"
            )
        return "\n".join(lines)

    def finish(trainer) -> None:
        core = getattr(trainer.model, "module", trainer.model)
        eval_set = TemporalPretrainDataset(
            data.eval_samples,
            data.seed + 2 * _VAL_OFFSET,
            None,
            train_set.vocab,
            train_set.tokenizer,
        )
        result = evaluate_alignment(
            core,
            eval_set,
            batch_size=cfg.train.batch_size,
            device=ctx.device,
            max_new_tokens=data.max_new_tokens,
            seed=data.seed,
        )
        result["lm"] = lm_info
        result["config"] = {"data": asdict(data), "model": asdict(mcfg)}
        run_dir = trainer.run_dir
        (run_dir / "alignment.json").write_text(
            json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2)
        )
        write_report(
            result,
            eval_set,
            run_dir / "report.html",
            data.report_examples,
            run_dir / "metrics.jsonl",
        )
        log.info("[EVAL] %s", result["summary_line"])
        log.info("wrote %s and %s", run_dir / "alignment.json", run_dir / "report.html")

    return JobParts(
        model=model,
        train_set=train_set,
        val_set=val_set,
        loss_fn=loss_fn,
        collate_fn=collate,
        evaluate=evaluate,
        evaluate_metrics=("answer_nll", "token_acc", "shuffled_answer_nll", "shuffled_token_acc"),
        sanity=sanity,
        finish=finish,
        # the frozen LM is rebuilt (or its warm-up reused) from the config: checkpoints
        # hold the encoder and identify the LM instead of storing it
        frozen={"llm": lm_info["origin"]},
    )
