"""Evaluation and report of temporal-encoder alignment.

:func:`evaluate_alignment` scores a :class:`~fastcore.models.TemporalLLMWrapper` on held-out
items twice: with each item's own curve (``aligned``) and with the curves permuted across
the items by a fixed derangement (``shuffled``, the control: same model, same prompts, the
wrong curves). Per condition and task:

* ``perplexity``: ``exp`` of the mean teacher-forced NLL of the answer tokens;
* ``token_accuracy``: greedy next-token accuracy on the answer tokens (teacher-forced);
* ``numeric_accuracy``: greedy generations (up to ``max_new_tokens``), every fact of the
  target (start, end, rate; minimum, time, duration; free amount, start time) read back
  with :func:`fastcore.data.text_facts.score_numbers`: right within 5% of the truth, and
  a fact the generation does not state counts as wrong;
* ``classification_accuracy``: the trend direction / feasibility outcome of the generation
  (:func:`~fastcore.data.text_facts.classify`) against the truth.

``comparison`` holds aligned minus shuffled numeric and classification accuracy with a
paired bootstrap interval (:func:`paired_comparison`). ``reference`` scores the true
targets the same way (the ceiling the number formats allow:
``"about 6 cores"`` for 6.4 is outside 5%). :func:`write_report` writes the HTML report:
the tables, the loss curves and examples with their curve plots side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastcore.data.descriptions import TASKS
from fastcore.data.resources import RESOURCES
from fastcore.data.temporal_pretrain import (
    IGNORE_INDEX,
    TemporalBatch,
    TemporalPretrainDataset,
    collate_temporal,
)
from fastcore.data.text_facts import classify, score_numbers

__all__ = ["answer_stats", "derangement", "evaluate_alignment", "paired_comparison", "write_report"]

CONDITIONS = ("aligned", "shuffled")
_LABELLED = ("trend", "feasibility")


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` without fixed points (n >= 2): the shuffled-curve
    control gives every sample another sample's curve."""
    if n < 2:
        raise ValueError(f"a shuffled-curve control needs at least 2 samples, got {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # rotate the cycle of a random order by one: i-th of `perm` gets the (i+1)-th's curve
    out = torch.empty(n, dtype=torch.long)
    out[perm] = perm.roll(-1)
    return out


def answer_stats(model: nn.Module, batch: TemporalBatch, shuffle: bool) -> dict[str, torch.Tensor]:
    """Teacher-forced sums over answer tokens per task: ``nll [3]``, ``correct [3]``,
    ``count [3]`` (with the batch's curves permuted when ``shuffle``)."""
    curves, cmask = batch.curves, batch.curve_mask
    if shuffle:
        perm = derangement(len(batch), 0).to(curves.device)
        curves, cmask = curves[perm], cmask[perm]
    out = model(curves, batch.input_ids, batch.attention_mask, None, curve_mask=cmask)
    k = out.logits.shape[1] - batch.input_ids.shape[1]
    logits = out.logits[:, k - 1 : -1].float()  # position k-1+j predicts token j
    labels = batch.labels
    valid = labels != IGNORE_INDEX
    nll = (
        torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels.clamp_min(0), reduction="none"
        )
        * valid
    )
    correct = (logits.argmax(-1) == labels) & valid
    onehot = torch.nn.functional.one_hot(batch.task, len(TASKS)).to(nll.dtype)  # (B, 3)
    return {
        "nll": onehot.T @ nll.sum(1),
        "correct": onehot.T @ correct.sum(1).to(nll.dtype),
        "count": onehot.T @ valid.sum(1).to(nll.dtype),
    }


def _left_padded_prompts(ids: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(int(t.numel()) for t in ids)
    out = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for b, t in enumerate(ids):
        out[b, length - t.numel() :] = t
        mask[b, length - t.numel() :] = 1
    return out, mask


@torch.no_grad()
def evaluate_alignment(
    model: nn.Module,
    dataset: TemporalPretrainDataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict:
    """Metrics of ``model`` on every item of ``dataset`` under both conditions (see the
    module docstring); ``examples`` holds each item's prompt, truth and generations."""

    device = torch.device(device)
    n = len(dataset)
    perm = derangement(n, seed)
    was_training = model.training
    model.eval()
    pad = dataset.eos_id_model
    samples = [dataset.sample(i) for i in range(n)]
    items = [dataset[i] for i in range(n)]
    stats = {
        c: {"nll": np.zeros(3), "correct": np.zeros(3), "count": np.zeros(3)} for c in CONDITIONS
    }
    texts: dict[str, list[str]] = {c: [] for c in CONDITIONS}
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        batch = collate_temporal([items[i] for i in idx], pad_id=pad)
        prompts, pmask = _left_padded_prompts(
            [dataset.encode_prompt(samples[i][1]) for i in idx], pad
        )
        for cond in CONDITIONS:
            if cond == "shuffled":
                curves = collate_temporal([items[int(perm[i])] for i in idx], pad_id=pad)
                batch.curves, batch.curve_mask = curves.curves, curves.curve_mask
            s = answer_stats(model, batch.to(device), shuffle=False)
            for k in s:
                stats[cond][k] += s[k].double().cpu().numpy()
            new = model.generate(
                batch.curves.to(device),
                prompts.to(device),
                attention_mask=pmask.to(device),
                curve_mask=batch.curve_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=pad,
                pad_token_id=pad,
            )
            texts[cond].extend(dataset.decode(row) for row in new.cpu())
    if was_training:
        model.train()
    result: dict = {"samples": n, "conditions": {}}
    truths = [s[1] for s in samples]
    result["reference"] = _scores(truths, _per_item(truths, [d.target for d in truths]))
    items_of = {cond: _per_item(truths, texts[cond]) for cond in CONDITIONS}  # scored once
    for cond in CONDITIONS:
        scores = _scores(truths, items_of[cond])
        st = stats[cond]
        for t, task in enumerate(TASKS):
            if st["count"][t]:
                scores["tasks"][task]["perplexity"] = math.exp(st["nll"][t] / st["count"][t])
                scores["tasks"][task]["token_accuracy"] = st["correct"][t] / st["count"][t]
        total = st["count"].sum()
        scores["perplexity"] = math.exp(st["nll"].sum() / total)
        scores["token_accuracy"] = st["correct"].sum() / total
        result["conditions"][cond] = scores
    result["examples"] = [
        {
            "index": i,
            "task": truths[i].task,
            "resource": truths[i].resource,
            "prompt": truths[i].prompt,
            "truth": truths[i].target,
            "aligned": texts["aligned"][i],
            "shuffled": texts["shuffled"][i],
            "shuffled_from": int(perm[i]),
        }
        for i in range(n)
    ]
    result["comparison"] = _paired(items_of["aligned"], items_of["shuffled"], 2000, seed)
    a, s = result["conditions"]["aligned"], result["conditions"]["shuffled"]
    cmp = result["comparison"]

    def delta(name: str) -> str:
        if name not in cmp:
            return ""
        lo, hi = cmp[name]["ci95"]
        return f" (difference 95% CI [{lo:+.3f}, {hi:+.3f}])"

    result["summary_line"] = (
        f"aligned vs shuffled-curve control on {n} held-out items: numeric accuracy "
        f"{a['numeric_accuracy']:.3f} vs {s['numeric_accuracy']:.3f}"
        f"{delta('numeric_accuracy')}, classification accuracy "
        f"{a['classification_accuracy']:.3f} vs {s['classification_accuracy']:.3f}"
        f"{delta('classification_accuracy')}, answer perplexity {a['perplexity']:.3f} vs "
        f"{s['perplexity']:.3f}"
    )
    return result


def _per_item(truths, texts: list[str]) -> dict[str, np.ndarray]:
    """Per item: ``facts`` stated in its truth, ``facts_right`` of them in ``text``,
    ``labelled`` (1 for trend/feasibility) and ``labels_right``."""
    out = {k: np.zeros(len(truths)) for k in ("facts", "facts_right", "labelled", "labels_right")}
    for i, (desc, text) in enumerate(zip(truths, texts, strict=True)):
        right = score_numbers(desc, text)
        out["facts"][i] = len(right)
        out["facts_right"][i] = sum(right.values())
        if desc.task in _LABELLED:
            out["labelled"][i] = 1
            out["labels_right"][i] = classify(desc.task, text) == desc.label
    return out


def _scores(truths, item: dict[str, np.ndarray]) -> dict:
    """Numeric and classification accuracy from the per-item scores of :func:`_per_item`."""
    task_of = np.array([d.task for d in truths])

    def ratio(num, den, sel):
        d = den[sel].sum()
        return float(num[sel].sum() / d) if d else None

    tasks = {}
    for t in TASKS:
        sel = task_of == t
        tasks[t] = {
            "samples": int(sel.sum()),
            "numeric_accuracy": ratio(item["facts_right"], item["facts"], sel),
        }
        if t in _LABELLED:
            tasks[t]["classification_accuracy"] = ratio(item["labels_right"], item["labelled"], sel)
    every = np.ones(len(truths), dtype=bool)
    return {
        "numeric_accuracy": ratio(item["facts_right"], item["facts"], every) or 0.0,
        "classification_accuracy": ratio(item["labels_right"], item["labelled"], every) or 0.0,
        "facts": int(item["facts"].sum()),
        "labelled": int(item["labelled"].sum()),
        "tasks": tasks,
    }


def paired_comparison(
    truths, aligned: list[str], shuffled: list[str], resamples: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Aligned minus shuffled numeric and classification accuracy with a paired bootstrap
    over items (both conditions scored on the same resampled items): ``difference``,
    ``ci95`` (2.5th and 97.5th percentiles) and ``p_not_better`` (the share of resamples
    whose difference is <= 0, a one-sided bootstrap p-value)."""
    return _paired(_per_item(truths, aligned), _per_item(truths, shuffled), resamples, seed)


def _paired(
    a: dict[str, np.ndarray], s: dict[str, np.ndarray], resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """:func:`paired_comparison` on per-item scores."""
    n = len(a["facts"])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    out = {}
    for name, num, den in (
        ("numeric_accuracy", "facts_right", "facts"),
        ("classification_accuracy", "labels_right", "labelled"),
    ):
        if not a[den].sum():
            continue
        diff = (a[num] - s[num])[draws].sum(1) / np.maximum(a[den][draws].sum(1), 1)
        out[name] = {
            "difference": float((a[num].sum() - s[num].sum()) / a[den].sum()),
            "ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
            "p_not_better": float((diff <= 0).mean()),
        }
    return out


# ----------------------------------------------------------------------------- report


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _curve_plot(curve, resource: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RESOURCES), figsize=(9, 1.8))
    t = curve.times
    for r, (ax, res) in enumerate(zip(axes, RESOURCES, strict=True)):
        ax.plot(t, curve.values[:, r], lw=1.2, color="C3" if res.name == resource else "C0")
        ax.set_title(
            f"{res.label} ({res.unit})",
            fontsize=8,
            fontweight="bold" if res.name == resource else "normal",
        )
        ax.set_ylim(res.lo, res.hi)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("s", fontsize=6)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _loss_plot(metrics_jsonl: Path) -> str | None:
    if not metrics_jsonl.is_file():
        return None
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and "loss" in row:
            train.append((row["step"], row["loss"]))
        elif row.get("kind") == "val" and "val_loss" in row:
            val.append((row["step"], row["val_loss"], row.get("val_shuffled_answer_nll")))
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(
        [t[0] for t in train],
        [t[1] for t in train],
        lw=0.8,
        alpha=0.6,
        label="train loss (answer tokens)",
    )
    if val:
        steps = [v[0] for v in val]
        ax.plot(steps, [v[1] for v in val], "o-", label="validation, true curves")
        if all(v[2] is not None for v in val):
            ax.plot(steps, [v[2] for v in val], "s--", label="validation, shuffled curves")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per answer token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_report(
    result: dict,
    dataset: TemporalPretrainDataset,
    path: Path,
    examples: int = 12,
    metrics_jsonl: Path | None = None,
) -> None:
    """The HTML report of :func:`evaluate_alignment`'s ``result`` (self-contained)."""
    import matplotlib

    matplotlib.use("Agg")
    a, s, ref = (
        result["conditions"]["aligned"],
        result["conditions"]["shuffled"],
        result["reference"],
    )
    rows = [
        (
            "numeric accuracy (±5%)",
            a["numeric_accuracy"],
            s["numeric_accuracy"],
            ref["numeric_accuracy"],
        ),
        (
            "classification accuracy",
            a["classification_accuracy"],
            s["classification_accuracy"],
            ref["classification_accuracy"],
        ),
        ("answer perplexity", a["perplexity"], s["perplexity"], None),
        ("answer token accuracy", a["token_accuracy"], s["token_accuracy"], None),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Temporal alignment</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".ex td{vertical-align:top;font-size:13px}</style></head><body>",
        "<h1>Temporal-encoder alignment</h1>",
        f"<p>{html.escape(result['summary_line'])}.</p>",
        "<p><b>Control</b>: the same trained model and prompts, each item given another "
        "item's curve (a fixed derangement). An encoder the LM reads must beat it.</p>",
        "<h2>Summary</h2><table><tr><th>metric</th><th>aligned</th><th>shuffled control</th>"
        "<th>true targets</th></tr>",
        *(
            f"<tr><td>{m}</td><td>{_fmt(x)}</td><td>{_fmt(y)}</td><td>{_fmt(z)}</td></tr>"
            for m, x, y, z in rows
        ),
        "</table><h2>Per task</h2><table><tr><th>task</th><th>items</th>"
        "<th>perplexity</th><th>token acc.</th><th>numeric acc.</th><th>class. acc.</th></tr>",
    ]
    for task in TASKS:
        ta, ts = a["tasks"][task], s["tasks"][task]
        parts.append(
            f"<tr><td>{task}</td><td>{ta['samples']}</td>"
            + "".join(
                f"<td>{_fmt(ta.get(k))} / {_fmt(ts.get(k))}</td>"
                for k in (
                    "perplexity",
                    "token_accuracy",
                    "numeric_accuracy",
                    "classification_accuracy",
                )
            )
            + "</tr>"
        )
    parts.append("</table><p>Each cell: aligned / shuffled control.</p>")
    if result.get("comparison"):
        parts.append(
            "<h2>Aligned minus control</h2><p>Paired bootstrap over the items (2000 "
            "resamples): the difference, its 95% interval and the share of resamples where "
            "the aligned encoder is not better.</p><table><tr><th>metric</th>"
            "<th>difference</th><th>95% CI</th><th>p (not better)</th></tr>"
        )
        for name, c in result["comparison"].items():
            lo, hi = c["ci95"]
            parts.append(
                f"<tr><td>{name.replace('_', ' ')}</td><td>{c['difference']:+.3f}</td>"
                f"<td>[{lo:+.3f}, {hi:+.3f}]</td><td>{c['p_not_better']:.4f}</td></tr>"
            )
        parts.append("</table>")
    if "lm" in result:
        parts.append(f"<h2>LM</h2><pre>{html.escape(json.dumps(result['lm'], indent=1))}</pre>")
    loss = _loss_plot(metrics_jsonl) if metrics_jsonl is not None else None
    if loss:
        parts.append(f"<h2>Loss</h2><img src='data:image/png;base64,{loss}'>")
    parts.append("<h2>Examples</h2><table class='ex'>")
    for ex in result["examples"][:examples]:
        curve, _ = dataset.sample(ex["index"])
        parts.append(
            f"<tr><td colspan='2'><b>#{ex['index']}</b> {ex['task']}, {ex['resource']}<br>"
            f"<img src='data:image/png;base64,{_curve_plot(curve, ex['resource'])}'></td></tr>"
            f"<tr><td>prompt</td><td>{html.escape(ex['prompt'])}</td></tr>"
            f"<tr><td>truth</td><td>{html.escape(ex['truth'])}</td></tr>"
            f"<tr><td>aligned</td><td>{html.escape(ex['aligned'])}</td></tr>"
            f"<tr><td>shuffled (curve of #{ex['shuffled_from']})</td>"
            f"<td>{html.escape(ex['shuffled'])}</td></tr>"
        )
    parts.append("</table></body></html>")
    path.write_text("\n".join(parts))
