"""fastcore.train end to end: the example job in-process, under a real SIGKILL and resume,
under torchrun with two processes, with injected NaN gradients, and every bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastcore
from fastcore.train import (
    CheckpointError,
    ConfigError,
    RandomSubsetDistributedSampler,
    TrainingDiverged,
    check_gradients,
)
from fastcore.train import checkpoint as ckpt_io
from fastcore.train.cli import evaluate_run, main, resolve_config, run
from fastcore.train.trainer import cosine_with_warmup

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the fastcore this process imported (the checkout, or an install).
IMPORTED_FROM = str(Path(fastcore.__file__).resolve().parents[1])
CONFIG = ROOT / "configs" / "example.yaml"
# Small and fast: 300 days -> 228 training windows -> 7 steps of 32 per epoch.
SMALL = [
    "log.progress=false",
    "log.tensorboard=false",
    "log.every_steps=5",
    "train.epochs=2",
    "train.warmup_steps=3",
    "train.threads=1",
    "data.steps=300",
    "model.hidden=8",
    "checkpoint.every_steps=5",
]


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", *SMALL, *extra]


def config(run_dir: Path, *extra: str):
    return resolve_config(str(CONFIG), overrides(run_dir, *extra))


def cli(run_dir: Path, *extra: str, launcher: list[str] | None = None, resume: str | None = None):
    cmd = [*(launcher or [sys.executable]), "-m", "fastcore.train", "--config", str(CONFIG)]
    if resume:
        cmd += ["--resume", resume]
    env = {**os.environ, "PYTHONPATH": IMPORTED_FROM, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, *overrides(run_dir, *extra)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss (the last record of a step: a resumed run repeats steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = ckpt_io.step_checkpoints(run_dir / "checkpoints")[-1]
    return ckpt_io.load(last)["model"]


def assert_weights_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- end to end


def test_example_job_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, "log.tensorboard=true", "checkpoint.keep_last=2")
    val = run(cfg)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 15))
    assert sum(list(curve.values())[-3:]) / 3 < 0.7 * curve[1], curve
    assert val["val_loss"] < curve[1] and "val_mae" in val
    text = (run_dir / "train.log").read_text()
    for tag in (
        "[SANITY] river graph: 24 nodes, 23 edges, max index 23 < 24",
        "[SANITY] parameters:",
    ):
        assert tag in text
    for tag in ("[TIMING] step 5: data", "[MEM] step 5: cpu_rss_mib", "[GRAD] step 1: "):
        assert tag in text
    assert "[VAL] step 7 epoch 1" in text
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    saved = resolve_config(str(run_dir / "config.yaml"), [])
    assert saved.to_dict() == cfg.to_dict()
    ckpts = ckpt_io.step_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000010.pt", "step-00000014.pt"]
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    assert best["best"] == pytest.approx(min(r for r in [val["val_loss"], best["best"]]))
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    # The model has dropout (keyed by seed, step and sample) and the data order is seeded:
    # the checkpoint's step and data position are what the resumed run must restore.
    whole = tmp_path / "whole"
    run(config(whole))
    broken = tmp_path / "broken"
    killed = cli(broken, "debug.kill_at_step=6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert ckpt_io.step_checkpoints(broken / "checkpoints")[-1].name == "step-00000005.pt"
    assert max(losses(broken)) == 6  # it ran past the checkpoint before it died
    resumed = cli(broken, resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "at step 5 (epoch 0, batch 5)" in resumed.stderr
    assert losses(broken) == losses(whole)  # exact: same seed, same data order, same RNG
    assert_weights_close(final_weights(broken), final_weights(whole), rtol=0, atol=0)


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    stale = ckpt / ".step-00000005.pt.k3j2h1.tmp"  # what atomic_save's mkstemp names
    stale.write_bytes(b"half a checkpoint")
    mine = ckpt / "notes.tmp"
    mine.write_text("not ours")
    run(config(tmp_path / "run", "train.max_steps=2"))
    assert not stale.exists() and mine.exists()
    assert f"WARNING removed {stale}" in (tmp_path / "run" / "train.log").read_text()
    assert not list(ckpt.glob(".*.tmp"))


def test_torchrun_two_processes_match_one_process(tmp_path):
    # With the example's dropout as shipped (0.1): masks are keyed by (seed, step, sample
    # index), so each rank draws for its half of the batch what the single process draws.
    cfg = config(tmp_path / "single")
    assert cfg.model.dropout == 0.1
    run(cfg)
    ddp = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = cli(ddp, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2" in out.stderr and "(16 per rank x 1 accumulation)" in out.stderr
    single = final_weights(tmp_path / "single")
    assert_weights_close(final_weights(ddp), single)
    a, b = losses(ddp), losses(tmp_path / "single")
    assert a.keys() == b.keys() == set(range(1, 15))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    # evaluate, in one process, reproduces the validation rank 0 logged with best.pt, to
    # float rounding: the two ranks validated 16-sample shards of the batches of 32
    report = evaluate_run(ddp)
    best = ckpt_io.load(ddp / "checkpoints" / "best.pt")
    logged = next(r for r in rows(ddp, "val") if r["step"] == best["step"])
    assert report["step"] == best["step"] and report["metrics"].keys() == best["metrics"].keys()
    for key, value in report["metrics"].items():
        assert value == pytest.approx(logged[key], rel=1e-5)
    # the masks matter: without dropout the same run ends elsewhere
    run(config(tmp_path / "nodrop", "model.dropout=0"))
    nodrop = final_weights(tmp_path / "nodrop")
    assert max((single[k] - nodrop[k]).abs().max() for k in single) > 1e-3


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # dropout on: a sample's mask does not depend on the micro-batch it falls in
    run(config(tmp_path / "one", "train.max_steps=6"))
    run(config(tmp_path / "accum", "train.max_steps=6", "train.accum_steps=4"))
    assert_weights_close(final_weights(tmp_path / "accum"), final_weights(tmp_path / "one"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    run_dir = tmp_path / precision
    run(config(run_dir, f"train.precision={precision}", "train.max_steps=8"))
    curve = losses(run_dir)
    assert len(curve) == 8 and all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    assert curve[8] < curve[1]
    state = ckpt_io.load(ckpt_io.step_checkpoints(run_dir / "checkpoints")[-1])
    # the weights stay float32 (integer buffers, such as a graph's edges, stay integers)
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert state["scaler"] if precision == "fp16" else True


# ------------------------------------------------------------------------------ safety


def test_injected_nan_gradient_is_skipped_and_logged(tmp_path):
    run_dir = tmp_path / "nan"
    run(config(run_dir, "debug.nan_grad_steps=[3]", "train.max_steps=6"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert train[3]["skipped"] == 1.0 and train[2]["skipped"] == 0.0 and train[4]["skipped"] == 0.0
    assert [r["step"] for r in rows if r["kind"] == "skip"] == [3]
    text = (run_dir / "train.log").read_text()
    assert "[NAN] step 3: non-finite gradient, step skipped (1 in a row)" in text
    assert "non-finite gradients in: embed_weight" in text
    assert all(torch.isfinite(v).all() for v in final_weights(run_dir).values())


def test_nan_gradients_in_a_row_stop_the_run(tmp_path, capsys):
    run_dir = tmp_path / "stop"
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row \(up to step 5\)"):
        run(config(run_dir, "debug.nan_grad_steps=[3,4,5,6]", "train.nan_patience=3"))
    # the error also ends the run's log file
    assert (
        "ERROR fastcore.train: error: TrainingDiverged: 3 optimizer steps in a row"
        in (run_dir / "train.log").read_text()
    )
    code = main(
        [
            "--config",
            str(CONFIG),
            *overrides(tmp_path / "cli", "debug.nan_grad_steps=[2,3]", "train.nan_patience=2"),
        ]
    )
    assert code == 2
    assert "TrainingDiverged: 2 optimizer steps in a row" in capsys.readouterr().err


def test_check_gradients_reports_broken_flow():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)  # never called: no gradient
            self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
            self.gated = nn.Parameter(torch.randn(2))  # multiplied by 0: a zero gradient
            self.bad = nn.Parameter(torch.randn(2))

        def forward(self, x):
            return (self.used(x) + self.frozen + 0 * self.gated + self.bad * x[:, :2]).sum()

    net = Net()
    net(torch.randn(4, 3)).backward()
    net.bad.grad[1] = float("inf")
    report = check_gradients(net)
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.zero == ["gated"]
    assert report.nonfinite == ["bad"]
    assert report.frozen == ["frozen"]
    assert not report.ok
    expected = torch.cat([net.used.weight.grad.flatten(), net.used.bias.grad]).norm()
    assert report.total_norm == pytest.approx(float(expected), rel=1e-6)
    summary = report.summary()
    assert "MISSING grad (no path from the loss): unused.weight, unused.bias" in summary
    assert "NON-FINITE" in report.table() and "frozen" in report.table()


# --------------------------------------------------------------------------- bad input


def test_config_errors_name_the_key(tmp_path, capsys):
    base = [f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean 'lr'"):
        resolve_config(str(CONFIG), [*base, "train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        resolve_config(str(CONFIG), [*base, "trian.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hiden'"):
        resolve_config(str(CONFIG), [*base, "model.hiden=3"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'two'"):
        resolve_config(str(CONFIG), [*base, "train.epochs=two"])
    with pytest.raises(ConfigError, match=r"train\.precision: expected 'fp32' \| 'bf16' \| 'fp16'"):
        resolve_config(str(CONFIG), [*base, "train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"train\.batch_size = 0: expected an int >= 1"):
        resolve_config(str(CONFIG), [*base, "train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        resolve_config(str(CONFIG), [*base, "train.lr"])
    with pytest.raises(FileNotFoundError, match=r"config file 'nope\.yaml' does not exist"):
        resolve_config("nope.yaml", [])
    with pytest.raises(
        ValueError, match="unknown job 'basinz'; registered jobs: basin, example, kv_distill"
    ):
        resolve_config(str(CONFIG), [*base, "job=basinz"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve_config(str(bad), [])
    assert main(["--config", str(CONFIG), "train.warmup=3"]) == 2
    assert (
        "unknown config key 'train.warmup'; did you mean 'warmup_steps'" in capsys.readouterr().err
    )


BAD_VALUES = [
    # (override, the one-line message)
    ("model.hidden=0", "model.hidden = 0: expected an int >= 1"),
    ("model.hidden=-4", "model.hidden = -4: expected an int >= 1"),
    ("data.steps=-1", "data.steps = -1: expected an int >= 1"),
    ("model.blocks=0", "model.blocks = 0: expected an int >= 1"),
    ("train.eps=inf", "train.eps = inf: expected a finite float > 0"),
    ("train.lr=nan", "train.lr: expected float, got 'nan'"),
    ("train.lr=.nan", "train.lr: expected float, got nan"),
    ("train.lr=-.inf", "train.lr = -inf: expected a finite float > 0"),
    ("model.hidden=abc", "model.hidden: expected int, got 'abc'"),
    ("model.hidden=16.5", "model.hidden: expected int, got 16.5"),
    ("model.dropout=1", "model.dropout = 1.0: expected a float in [0, 1)"),
    ("data.val_fraction=0", "data.val_fraction = 0.0: expected a float in (0, 1)"),
    ("data.nodes=1", "data.nodes = 1: expected an int >= 2"),
    ("train.betas=[0.9]", "train.betas = [0.9]: expected a list of 2 floats in [0, 1)"),
    ("train.betas=[0.9,1]", "train.betas = [0.9, 1.0]: expected a list of 2 floats in [0, 1)"),
    ("train.grad_clip=0", "train.grad_clip = 0.0: expected null or a float > 0"),
    ("train.grad_clip=.nan", "train.grad_clip: expected float | null, got nan"),
    ("train.seed=-1", "train.seed = -1: expected an int in [0, 4294967295]"),
    ("train.subset=1.5", "train.subset = 1.5: expected null or a float in (0, 1]"),
    ("train.max_steps=0", "train.max_steps = 0: expected null or an int >= 1"),
    ("train.patience=0", "train.patience = 0: expected null or an int >= 1"),
    ("debug.nan_grad_steps=[0,2]", "debug.nan_grad_steps = [0, 2]: expected a list of ints >= 1"),
    (
        "run_dir=runs/{jbo}",
        "run_dir = 'runs/{jbo}': expected a path whose only placeholder is {job}",
    ),
    ("job=7", "job: expected str, got 7"),
    (
        "checkpoint.best_metric=val_nse",
        "checkpoint.best_metric = 'val_nse': expected a metric job 'example' reports: val_loss, "
        "val_mae, val_mse; did you mean 'val_mse'?",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_a_one_line_error(tmp_path, capsys, override, message):
    # the CLI: one line on stderr, exit status 2, no traceback, nothing trained
    code = main(["--config", str(CONFIG), *overrides(tmp_path / "run", override)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"fastcore.train: error: ConfigError: {message}\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # scripts: the same message from resolve_config, or (best_metric) from run before step 1
    with pytest.raises(ConfigError) as caught:
        run(config(tmp_path / "script", override))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("job", "override", "message"),
    [
        (
            "basin",
            "data.network=rhin",
            "data.network: expected 'rhine' | 'synthetic' | 'wind', got",
        ),
        ("basin", "data.splits=[0.7,0.3]", "data.splits = [0.7, 0.3]: expected a list of 3 finite"),
        (
            "wind",
            "model.teacher_forcing=2",
            "model.teacher_forcing = 2.0: expected a float in [0, 1]",
        ),
        ("kv_distill", "model.loss=l1", "model.loss: expected 'mse' | 'cosine', got 'l1'"),
        ("kv_distill", "data.seq_len=1", "data.seq_len = 1: expected an int >= 2"),
        ("temporal_align", "model.kernel_sizes=[3,4]", "expected a non-empty list of odd ints"),
        ("temporal_align", "data.task_mix=[0,0,0]", "expected a list of 3 finite floats >= 0, not"),
        ("temporal_align", "model.lm_lr=inf", "model.lm_lr = inf: expected a finite float > 0"),
    ],
)
def test_every_job_checks_its_values(job, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(str(ROOT / "configs" / f"{job}.yaml"), [override])


def test_inf_where_a_field_allows_it_and_best_metric_of_the_job(tmp_path):
    # grad_clip=inf: no clipping; best.pt follows a metric the job reports (val_mae)
    assert config(tmp_path, "train.grad_clip=inf").train.grad_clip == math.inf
    run_dir = tmp_path / "run"
    val = run(
        config(
            run_dir, "train.grad_clip=inf", "checkpoint.best_metric=val_mae", "train.max_steps=3"
        )
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in train)
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    assert best["best"] == pytest.approx(val["val_mae"])


def test_a_config_changed_in_code_is_checked_too(tmp_path):
    cfg = config(tmp_path)
    cfg.model = dataclasses.replace(cfg.model, blocks=0)
    with pytest.raises(ConfigError, match=r"^model\.blocks = 0: expected an int >= 1$"):
        run(cfg)
    cfg.model = dataclasses.replace(cfg.model, blocks=2, hidden="8")
    with pytest.raises(ConfigError, match=r"^model\.hidden: expected int, got '8'$"):
        run(cfg)


def test_config_floats_as_users_write_them(tmp_path):
    base = [f"run_dir={tmp_path}"]
    cfg = resolve_config(str(CONFIG), [*base, "train.lr=3e-4", "train.eps=1E-5"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.eps == 1e-5
    cfg = resolve_config(str(CONFIG), [*base, "train.weight_decay=2", "train.grad_clip=.5"])
    assert cfg.train.weight_decay == 2.0 and cfg.train.grad_clip == 0.5
    text = CONFIG.read_text()
    assert "  lr: 3.0e-3\n" in text
    written = tmp_path / "lr.yaml"
    written.write_text(text.replace("  lr: 3.0e-3\n", "  lr: 3e-3\n"))  # a string to PyYAML
    assert resolve_config(str(written), base).train.lr == 3e-3
    for text in ("nan", "3e", "1e-3x", "1,5"):
        with pytest.raises(ConfigError, match=rf"train\.lr: expected float, got '{text}'"):
            resolve_config(str(CONFIG), [*base, f"train.lr={text}"])
    with pytest.raises(ConfigError, match=r"train\.lr = inf: expected a finite float > 0"):
        resolve_config(str(CONFIG), [*base, "train.lr=inf"])


def test_batch_that_does_not_split_is_an_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"batch_size 30 must divide by world_size 1 x train\.accum_steps 4"
    ):
        run(config(tmp_path, "train.batch_size=30", "train.accum_steps=4"))


def test_missing_data_path_is_an_error(tmp_path):
    missing = tmp_path / "series.pt"
    with pytest.raises(FileNotFoundError, match=f"data.path '{missing}' does not exist"):
        run(config(tmp_path / "run", f"data.path={missing}"))


def test_resume_from_another_model_or_a_truncated_file(tmp_path):
    run_dir = tmp_path / "run"
    run(config(run_dir, "train.max_steps=5"))
    latest = ckpt_io.step_checkpoints(run_dir / "checkpoints")[-1]
    with pytest.raises(
        CheckpointError, match=r"written for another model: shape mismatch .*8\] vs model \[2, 12\]"
    ):
        run(config(run_dir, "model.hidden=12"), resume="latest")
    with pytest.raises(
        CheckpointError, match=r"written for another model: unexpected \['blocks\.1\."
    ):
        run(config(run_dir, "model.blocks=1"), resume=str(latest))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"truncated\.pt' \(\d+ bytes\) cannot be read — truncated"
    ):
        run(config(run_dir), resume=str(truncated))
    with pytest.raises(CheckpointError, match=r"no step-\*\.pt checkpoint in"):
        run(config(tmp_path / "empty"), resume="latest")
    with pytest.raises(CheckpointError, match="does not exist"):
        run(config(run_dir), resume=str(tmp_path / "gone.pt"))


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "step-00000001.pt"
    ckpt_io.atomic_save({"model": {"w": torch.arange(4.0)}}, path)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_save({"model": {"w": torch.zeros(4)}}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


# --------------------------------------------------------------------- small pieces


def test_random_subset_sampler_is_shared_fresh_and_sharded():
    data = list(range(50))
    shards = [
        RandomSubsetDistributedSampler(data, 0.4, num_replicas=2, rank=r, seed=7) for r in (0, 1)
    ]
    seen = []
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        a, b = (list(s) for s in shards)
        assert len(a) == len(b) == 10 == len(shards[0])
        assert not set(a) & set(b)
        seen.append(sorted(a + b))
    assert seen[0] != seen[1]  # a fresh subset each epoch
    again = RandomSubsetDistributedSampler(data, 20, num_replicas=2, rank=0, seed=7)
    again.set_epoch(1)
    shards[0].set_epoch(1)
    assert list(again) == list(shards[0])  # a function of (seed, epoch) only
    with pytest.raises(ValueError, match=r"subset fraction must be in \(0, 1\], got 1.5"):
        RandomSubsetDistributedSampler(data, 1.5, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match=r"subset count must be in \[1, 50\]"):
        RandomSubsetDistributedSampler(data, 51, num_replicas=1, rank=0)


def test_subset_option_trains_on_a_fraction(tmp_path):
    run_dir = tmp_path / "subset"
    run(config(run_dir, "train.subset=0.5"))
    assert sorted(losses(run_dir)) == list(range(1, 7))  # 114 of 228 windows -> 3 steps/epoch


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)


# ----------------------------------------------------------------------- early stopping

# A job whose validation metric follows a script, so a test knows when it must stop. On
# ranks > 0 (skew_other_ranks) it improves at every validation: only rank 0's decision,
# shared with the others, keeps every rank stopping together (a rank that decided alone
# would wait forever at best.pt's barrier, or train on alone).
SCRIPTED_JOB = '''
"""A job whose val_score follows data.scores (the early-stopping tests)."""
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastcore.train import JobParts, option


@dataclass
class DataConfig:
    scores: list[float] = option([1.0], "val_score of the k-th validation (the last repeats)")
    skew_other_ranks: bool = option(False, "ranks > 0 report a score improving every time")
    validate: bool = option(True, "whether the job has a validation set")


@dataclass
class ModelConfig:
    width: int = option(4, "inputs of the linear model", ge=1)


def build(cfg, ctx):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, cfg.model.width, generator=g)
    y = x.sum(1, keepdim=True)
    model = nn.Linear(cfg.model.width, 1)
    calls = [0]

    def loss_fn(model, batch):
        xb, yb = batch
        return (model(xb) - yb).pow(2).mean(), {}

    def evaluate(model):
        k = calls[0]
        calls[0] += 1
        if ctx.rank > 0 and cfg.data.skew_other_ranks:
            return {"score": -float(k)}
        return {"score": cfg.data.scores[min(k, len(cfg.data.scores) - 1)]}

    return JobParts(
        model=model,
        train_set=TensorDataset(x, y),
        val_set=TensorDataset(x[:16], y[:16]) if cfg.data.validate else None,
        loss_fn=loss_fn,
        evaluate=evaluate,
        evaluate_metrics=("score",),
    )
'''

# 64 samples, batch 16: 4 steps per epoch, 12 in all; a validation after every step.
SCRIPTED = [
    "job=scripted_job",
    "log.progress=false",
    "log.tensorboard=false",
    "train.threads=1",
    "train.epochs=3",
    "train.batch_size=16",
    "train.eval_every_steps=1",
    "checkpoint.best_metric=val_score",
    # best at step 2 (0.5), then three validations without improvement: the one at step 4
    # ends epoch 1 and must count once, so the third is step 5's, mid-epoch 2
    "data.scores=[1.0,0.5,0.6,0.55,0.58]",
]


@pytest.fixture
def scripted_job(tmp_path, monkeypatch):
    """``job: scripted_job`` importable from ``tmp_path`` (as a module next to the command)."""
    (tmp_path / "scripted_job.py").write_text(SCRIPTED_JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("scripted_job", None)


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_patience_stops_the_run_and_leaves_it_consistent(scripted_job):
    run_dir = scripted_job / "run"
    val = run(resolve_config(None, [f"run_dir={run_dir}", *SCRIPTED, "train.patience=3"]))
    assert [r["step"] for r in rows(run_dir, "train")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows(run_dir, "val")] == [1, 2, 3, 4, 5]  # none twice
    (stop,) = rows(run_dir, "stop")
    assert stop == {
        "kind": "stop",
        "step": 5,
        "epoch": 1,
        "best": 0.5,
        "best_step": 2,
        "evals_since_best": 3,
        "patience": 3,
    }
    text = (run_dir / "train.log").read_text()
    assert (
        "[STOP] step 5: val_score has not improved (min; best 0.5 at step 2) for 3 "
        "validations in a row (train.patience = 3); stopping early" in text
    )
    assert val["val_score"] == 0.58
    # best.pt is step 2's; the newest step checkpoint is where the run stopped
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    assert (best["step"], best["best"], best["metrics"]["val_score"]) == (2, 0.5, 0.5)
    last = ckpt_io.load(ckpt_io.step_checkpoints(run_dir / "checkpoints")[-1])
    assert (last["step"], last["evals_since_best"], last["best_step"]) == (5, 3, 2)
    assert last["metrics"] == val and last["metrics_step"] == 5

    # resumed as it was, it trains no further and says why
    again = run(
        resolve_config(None, [f"run_dir={run_dir}", *SCRIPTED, "train.patience=3"]), "latest"
    )
    assert again == val
    assert [r["step"] for r in rows(run_dir, "train")] == [1, 2, 3, 4, 5]
    assert (
        "[STOP] resumed a run that stopped early at step 5" in (run_dir / "train.log").read_text()
    )
    # more patience trains on (the resumed job's scores start again at 1.0, then 0.5:
    # neither beats 0.5, so two more validations use up a patience of 5)
    run(resolve_config(None, [f"run_dir={run_dir}", *SCRIPTED, "train.patience=5"]), "latest")
    assert [r["step"] for r in rows(run_dir, "train")] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["step"] for r in rows(run_dir, "stop")] == [5, 7]
    # and none trains to the end
    run(resolve_config(None, [f"run_dir={run_dir}", *SCRIPTED, "train.patience=null"]), "latest")
    assert [r["step"] for r in rows(run_dir, "train")] == list(range(1, 13))
    assert ckpt_io.step_checkpoints(run_dir / "checkpoints")[-1].name == "step-00000012.pt"


def test_patience_needs_a_validation_set(scripted_job):
    cfg = resolve_config(
        None, [f"run_dir={scripted_job / 'run'}", *SCRIPTED, "data.validate=false"]
    )
    run(cfg)  # without patience: trains, writes no best.pt
    assert not (scripted_job / "run" / "checkpoints" / "best.pt").exists()
    cfg.train.patience = 2
    with pytest.raises(
        ConfigError,
        match=r"^train\.patience = 2: expected null: job 'scripted_job' has no validation set",
    ):
        run(cfg)


def test_patience_under_torchrun_stops_every_rank_together(scripted_job):
    # rank 1's own score improves at every validation; rank 0's decision rules
    single = scripted_job / "single"
    run(resolve_config(None, [f"run_dir={single}", *SCRIPTED, "train.patience=3"]))
    ddp = scripted_job / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [f"run_dir={ddp}", *SCRIPTED, "train.patience=3", "data.skew_other_ranks=true"]
    out = subprocess.run(
        [*launcher, "-m", "fastcore.train", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=scripted_job,  # scripted_job.py is found in the directory the command runs in
        env={**os.environ, "PYTHONPATH": IMPORTED_FROM, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2" in out.stderr and "[STOP] step 5:" in out.stderr
    assert rows(ddp, "stop") == rows(single, "stop")
    a, b = losses(ddp), losses(single)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    best = ckpt_io.load(ddp / "checkpoints" / "best.pt")
    assert (best["step"], best["best"]) == (2, 0.5)


def test_unknown_job_says_how_to_name_a_module(tmp_path, scripted_job, capsys):
    with pytest.raises(ConfigError) as caught:
        resolve_config(None, ["job=exmaple"])
    message = str(caught.value)
    assert message.startswith(
        "unknown job 'exmaple'; registered jobs: basin, example, kv_distill, kv_study, panel, "
        "temporal_align "
        "(did you mean 'example'?); or a module path: 'job: my_job' imports my_job.py"
    )
    assert "'job: mypackage.my_job' imports mypackage/my_job.py" in message
    assert "\n" not in message
    # a module on sys.path (the command's directory) is a job by its name, dotted or not
    assert resolve_config(None, ["job=scripted_job"]).data.scores == [1.0]
    with pytest.raises(ConfigError, match=r"^unknown job 'nopackage\.my_job'; registered"):
        resolve_config(None, ["job=nopackage.my_job"])
    # an importable module that is not a job
    with pytest.raises(
        ConfigError,
        match=r"^job 'json': module 'json' is not a job module: it lacks DataConfig, "
        r"ModelConfig, build \(expected",
    ):
        resolve_config(None, ["job=json"])
    # a job module whose own import fails names what is missing
    (tmp_path / "broken_job.py").write_text("import not_installed_dependency\n")
    with pytest.raises(
        ConfigError,
        match=r"^job 'broken_job': importing module 'broken_job' failed: ModuleNotFoundError: "
        r"No module named 'not_installed_dependency'$",
    ):
        resolve_config(None, ["job=broken_job"])
    assert main(["--describe", "exmaple"]) == 2
    assert capsys.readouterr().err.startswith(
        "fastcore.train: error: ConfigError: unknown job 'exmaple'"
    )


def test_register_job(scripted_job):
    from fastcore.train.jobs import JOBS, register_job

    register_job("scripted", "scripted_job")
    try:
        assert resolve_config(None, ["job=scripted"]).job == "scripted"
    finally:
        del JOBS["scripted"]
    with pytest.raises(ValueError, match=r"job name 'my job': expected a non-empty name"):
        register_job("my job", "scripted_job")
    with pytest.raises(ValueError, match=r"job module 'my-job': expected an import path"):
        register_job("mine", "my-job")
    with pytest.raises(TypeError, match="takes two strings"):
        register_job("mine", scripted_job)


# ------------------------------------------------------------------- --describe and [MEM]


def test_describe_the_config_given_or_the_job_named(tmp_path, capsys, scripted_job):
    mine = tmp_path / "mine.yaml"
    mine.write_text("job: scripted_job\ntrain:\n  lr: 0.01\nmodel:\n  width: 7\n")
    assert main(["--config", str(mine), "--describe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# job scripted_job from {mine}: each field's value")
    assert "\n  width: 7  # default 4; an int >= 1; inputs of the linear model\n" in out
    assert "\n  lr: 0.01  # default 0.001; a finite float > 0; AdamW peak" in out
    assert "\n  epochs: 1  # an int >= 1;" in out  # not in the file: the default
    assert (
        "\n  scores: [1.0]  # a list of finite floats; val_score of the k-th" in out
    )  # the default
    # overrides count, after the file; --describe FILE.yaml reads it as the config
    assert main(["--config", str(mine), "--describe", "model.width=9"]) == 0
    assert "\n  width: 9  # default 4;" in capsys.readouterr().out
    assert main(["--describe", str(mine), "train.lr=0.5"]) == 0
    assert "\n  lr: 0.5  # default 0.001;" in capsys.readouterr().out
    # --describe JOB: the defaults, as before (and JOB's own sections)
    assert main(["--describe", "example"]) == 0
    out = capsys.readouterr().out
    assert "\n  hidden: 16  # an int >= 1; latent width" in out and not out.startswith("#")
    assert main(["--describe", "example", f"--config={CONFIG}"]) == 0
    assert capsys.readouterr().out.startswith(f"# job example from {CONFIG}")
    # a config of another job than the one named, and a bad value in the file
    assert main(["--config", str(mine), "--describe", "example"]) == 2
    assert "ConfigError: --describe example: the config" in capsys.readouterr().err
    mine.write_text("job: scripted_job\nmodel:\n  width: 0\n")
    assert main(["--config", str(mine), "--describe"]) == 2
    assert "ConfigError: model.width = 0: expected an int >= 1" in capsys.readouterr().err


def test_memory_stats_report_the_peak():
    from fastcore.train.diagnostics import memory_stats

    before = memory_stats(torch.device("cpu"))
    assert list(before) == ["cpu_rss_mib", "cpu_peak_rss_mib"]
    big = torch.ones(384 * 2**20 // 4)  # 384 MiB, touched
    big.add_(1)
    during = memory_stats(torch.device("cpu"))
    del big
    after = memory_stats(torch.device("cpu"))
    assert during["cpu_peak_rss_mib"] >= during["cpu_rss_mib"] - 1
    assert after["cpu_peak_rss_mib"] >= before["cpu_rss_mib"] + 300  # the peak stays
    assert after["cpu_peak_rss_mib"] >= after["cpu_rss_mib"] + 300  # while RSS fell back


# --------------------------------------------------------------- frozen submodules

# A model whose frozen backbone the job builds from data.backbone_seed every time:
# checkpoints leave it out and identify it (JobParts.frozen).
FROZEN_JOB = '''
"""A job with a frozen backbone built from data.backbone_seed (the frozen-module tests)."""
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastcore.train import JobParts, option


@dataclass
class DataConfig:
    backbone_seed: int = option(0, "seed of the frozen backbone's weights", ge=0)
    running_stats: bool = option(False, "a BatchNorm in the backbone (it changes in train mode)")
    declare: bool = option(True, "declare the backbone frozen (JobParts.frozen)")


@dataclass
class ModelConfig:
    width: int = option(32, "the backbone's width", ge=1)


class Net(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))


def build(cfg, ctx):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = torch.sin(3 * x).sum(1, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data.backbone_seed)
        layers = [nn.Linear(4, cfg.model.width), nn.Tanh(), nn.Linear(cfg.model.width, 64)]
        if cfg.data.running_stats:
            layers.append(nn.BatchNorm1d(64))
        backbone = nn.Sequential(*layers).requires_grad_(False)
    model = Net(backbone, nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 1)))

    def loss_fn(model, batch):
        xb, yb = batch
        return (model(xb) - yb).pow(2).mean(), {}

    source = f"an MLP of width {cfg.model.width} from seed {cfg.data.backbone_seed}"
    return JobParts(
        model=model,
        train_set=TensorDataset(x, y),
        val_set=TensorDataset(x[:32], y[:32]),
        loss_fn=loss_fn,
        frozen={"backbone": source} if cfg.data.declare else {},
    )
'''

# 96 samples, batch 16: 6 steps per epoch, 12 in all; a checkpoint every 4 steps.
FROZEN = [
    "job=frozen_job",
    "log.progress=false",
    "log.tensorboard=false",
    "train.threads=1",
    "train.epochs=2",
    "train.batch_size=16",
    "train.lr=0.01",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=5",
]


@pytest.fixture
def frozen_job(tmp_path, monkeypatch):
    """``job: frozen_job`` importable from ``tmp_path``."""
    (tmp_path / "frozen_job.py").write_text(FROZEN_JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("frozen_job", None)


def frozen_config(run_dir: Path, *extra: str):
    return resolve_config(None, [f"run_dir={run_dir}", *FROZEN, *extra])


def test_frozen_submodules_are_identified_not_saved_and_resume_exactly(frozen_job):
    import shutil

    from fastcore.train import load_run

    whole = frozen_job / "whole"
    run(frozen_config(whole))
    step4 = whole / "checkpoints" / "step-00000004.pt"
    state = ckpt_io.load(step4)
    assert sorted(state["model"]) == [
        "head.0.bias",
        "head.0.weight",
        "head.2.bias",
        "head.2.weight",
    ]
    assert sorted(state["fingerprint"]) == sorted(state["model"])
    ident = state["frozen"]["backbone"]
    assert ident["source"] == "an MLP of width 32 from seed 0"
    assert ident["class"] == "torch.nn.modules.container.Sequential"
    assert ident["parameters"] == 4 * 32 + 32 + 32 * 64 + 64 == 2272 and ident["config"] is None
    assert sorted(ident["tensors"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert ident["tensors"]["0.weight"].startswith("float32[32, 4] ")
    text = (whole / "train.log").read_text()
    assert (
        "[SANITY] frozen backbone (left out of checkpoints): Sequential, 2,272 parameters" in text
    )
    # the same job with nothing declared frozen stores the backbone: a bigger file
    full = frozen_job / "full"
    run(frozen_config(full, "data.declare=false", "train.epochs=1"))
    full4 = ckpt_io.load(full / "checkpoints" / "step-00000004.pt")
    assert "backbone.2.weight" in full4["model"] and full4["frozen"] == {}
    assert (full / "checkpoints" / "step-00000004.pt").stat().st_size > step4.stat().st_size

    # resumed elsewhere from step 4 (the backbone built again): the same steps, bit for bit
    resumed = frozen_job / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(step4, resumed / "checkpoints")
    run(frozen_config(resumed), resume="latest")
    assert losses(resumed) == {s: v for s, v in losses(whole).items() if s > 4}
    assert_weights_close(final_weights(resumed), final_weights(whole), rtol=0, atol=0)

    # another backbone: refused before anything is written, naming what differs
    config_before = (resumed / "config.yaml").read_text()
    with pytest.raises(CheckpointError) as caught:
        run(frozen_config(resumed, "data.backbone_seed=1"), resume=str(step4))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"checkpoint {str(step4)!r} was written with another frozen 'backbone' (its weights "
        "are not in checkpoints; the job rebuilds it from the config): values differ in 4 of "
        "4 tensors (0.bias, 0.weight, 2.bias, 2.weight). The checkpoint's came from: an MLP "
        "of width 32 from seed 0; this run's from: an MLP of width 32 from seed 1."
    )
    assert (resumed / "config.yaml").read_text() == config_before
    with pytest.raises(CheckpointError, match=r"2,272 vs 1,168 parameters; dtype/shape 0\.bias"):
        run(frozen_config(resumed, "model.width=16"), resume=str(step4))
    with pytest.raises(CheckpointError, match=r"holds no weights for backbone \(frozen when"):
        run(frozen_config(resumed, "data.declare=false"), resume=str(step4))

    # load_run (and evaluate) check it the same way
    loaded = load_run(whole, "last")
    assert torch.equal(loaded.model.head[0].weight, final_weights(whole)["head.0.weight"])
    with pytest.raises(CheckpointError, match="another frozen 'backbone'"):
        load_run(whole, "last", ["data.backbone_seed=2"])
    # a checkpoint that stores the backbone (nothing declared frozen, or older than the
    # declaration) still loads into a model that declares it frozen: its copy is used
    loaded = load_run(full, "last", ["data.declare=true"])
    assert torch.equal(loaded.model.backbone[2].weight, full4["model"]["backbone.2.weight"])
    older = {k: v for k, v in full4.items() if k != "frozen"}
    torch.save(older, frozen_job / "older.pt")
    loaded = load_run(full, str(frozen_job / "older.pt"), ["data.declare=true"])
    assert torch.equal(loaded.model.head[0].weight, full4["model"]["head.0.weight"])


def test_a_frozen_submodule_that_changes_or_trains_is_refused(frozen_job):
    # a BatchNorm in train mode updates its running statistics: not rebuildable
    with pytest.raises(
        CheckpointError,
        match=r"frozen 'backbone' \(JobParts\.frozen\) changed "
        r"during training: values differ in 3 of 9 tensors \(3\.num_batches_tracked, "
        r"3\.running_mean",
    ):
        run(frozen_config(frozen_job / "bn", "data.running_stats=true"))
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    net[0].requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"names 'body', which is not a submodule .* children: 0, 1"
    ):
        ckpt_io.check_frozen(net, {"body": "x"})
    with pytest.raises(ValueError, match=r"names '1', but 2 of its parameters require grad"):
        ckpt_io.check_frozen(net, {"1": "x"})
    with pytest.raises(ValueError, match=r"expected a non-empty description"):
        ckpt_io.check_frozen(net, {"0": " "})
    ckpt_io.check_frozen(net, {"0": "seed 0"})


def test_module_identity_counts_tied_tensors_once_and_samples_big_ones(monkeypatch):
    torch.manual_seed(0)
    emb = nn.Embedding(100, 8)
    tied = nn.ModuleDict({"inp": emb, "out": nn.Linear(8, 100, bias=False)})
    tied["out"].weight = emb.weight
    ident = ckpt_io.module_identity(tied, "tied")
    assert ident["bytes"] == 100 * 8 * 4 and ident["hashed"] == "all bytes"
    assert ident["tensors"]["inp.weight"] == ident["tensors"]["out.weight"]
    # every element counts when hashed in full; a strided sample past FULL_HASH_BYTES
    monkeypatch.setattr(ckpt_io, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(ckpt_io, "HASH_SAMPLE", 10)
    sampled = ckpt_io.module_identity(tied, "tied")
    assert sampled["hashed"] == "strided sample of 10 elements a tensor"
    assert ckpt_io.identity_differences(ident, sampled) == []  # schemes differ: not compared
    with torch.no_grad():
        emb.weight.view(-1)[-1] += 1  # the last element is always in the sample
    assert ckpt_io.identity_differences(sampled, ckpt_io.module_identity(tied, "tied")) == [
        "values differ in 2 of 2 tensors (inp.weight, out.weight)"
    ]
