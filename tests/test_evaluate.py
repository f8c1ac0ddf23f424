"""``python -m fastcore.train evaluate`` and :func:`fastcore.train.load_run`: a finished
example run's checkpoint, evaluated again, gives exactly the validation the run logged;
the predictions are the model's; every bad input is a one-line error."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastcore.train import checkpoint as ckpt_io
from fastcore.train import evaluate_run, load_run
from fastcore.train.cli import main, resolve_config, run
from fastcore.train.example import simulate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "example.yaml"
# 300 days: 228 training windows (7 steps of 32 per epoch), 60 validation windows
SMALL = [
    "log.progress=false",
    "log.tensorboard=false",
    "train.epochs=2",
    "train.warmup_steps=3",
    "train.threads=1",
    "data.steps=300",
    "model.hidden=8",
    "checkpoint.every_steps=5",
]


def train(run_dir: Path, *extra: str):
    cfg = resolve_config(str(CONFIG), [f"run_dir={run_dir}", *SMALL, *extra])
    run(cfg)
    return cfg


def logged_val(run_dir: Path, step: int) -> dict[str, float]:
    """The val row metrics.jsonl holds for ``step`` (metrics only)."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "val" and row["step"] == step:
            return {k: v for k, v in row.items() if k.startswith("val_")}
    raise AssertionError(f"no val row at step {step}")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    return run_dir, train(run_dir)


def test_evaluate_reproduces_the_logged_validation_exactly(finished, capsys):
    run_dir, cfg = finished
    assert main(["evaluate", "--run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "eval" / "val-best.json").read_text())
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    assert report["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
    assert (report["step"], report["split"], report["samples"]) == (best["step"], "val", 60)
    # bit for bit: the same batches (32), the same weights, the same threads
    assert report["metrics"] == logged_val(run_dir, best["step"]) == best["metrics"]
    assert set(report["metrics"]) == {"val_loss", "val_mae", "val_mse"}
    assert f"on val (60 samples): val_loss {report['metrics']['val_loss']:.6g}" in out
    assert f"wrote {run_dir / 'eval' / 'val-best.json'} and " in out

    # the predictions are the model's, in the series' units
    pred = torch.load(run_dir / "eval" / "val-best.pt", weights_only=True)
    assert set(pred) == {"prediction", "target", "index"}
    assert pred["prediction"].shape == pred["target"].shape == (60, 24)
    assert torch.equal(pred["index"], torch.arange(60))
    series, _ = simulate(cfg.data)
    split = round(300 * 0.8)
    torch.testing.assert_close(pred["target"], series[split:, :, 1], rtol=1e-5, atol=1e-5)
    flow_std = series[:split, :, 1].std()  # the job normalises with the training part
    mse = ((pred["prediction"] - pred["target"]) / flow_std).square().mean()
    assert float(mse) == pytest.approx(report["metrics"]["val_mse"], rel=1e-4)


def test_load_run_gives_the_config_and_the_best_weights(finished):
    run_dir, cfg = finished
    loaded = load_run(run_dir)
    assert loaded.checkpoint == run_dir / "checkpoints" / "best.pt"
    assert loaded.cfg.model == cfg.model and loaded.cfg.run_path == run_dir
    assert not loaded.model.training
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name
    last = load_run(run_dir, "last")
    assert last.checkpoint.name == "step-00000014.pt" and last.state["step"] == 14
    x, _ = loaded.parts.val_set[0]
    with torch.no_grad():
        assert loaded.model(x[None]).shape == (1, 24)


def test_other_checkpoints_and_out(finished, capsys):
    run_dir, _ = finished
    out = run_dir.parent / "mine" / "last.json"
    code = main(["evaluate", "--run", str(run_dir), "--checkpoint", "last", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["step"] == 14 and report["predictions"] == str(out.with_suffix(".pt"))
    assert report["metrics"] == logged_val(run_dir, 14)  # the final validation, at step 14
    assert out.with_suffix(".pt").is_file()
    # a checkpoint by its name in checkpoints/
    assert main(["evaluate", "--run", str(run_dir), "--checkpoint", "step-00000010.pt"]) == 0
    report = json.loads((run_dir / "eval" / "val-step-00000010.json").read_text())
    assert report["step"] == 10


def test_without_best_pt_the_newest_step_checkpoint_with_a_note(finished, tmp_path, capsys):
    run_dir, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "best.pt").unlink()
    assert main(["evaluate", "--run", str(copy)]) == 0
    captured = capsys.readouterr()
    assert (
        f"no best.pt in {copy / 'checkpoints'} (only a validation that improves "
        "checkpoint.best_metric writes one); using the newest step checkpoint, step-00000014.pt"
    ) in captured.err
    assert json.loads((copy / "eval" / "val-step-00000014.json").read_text())["step"] == 14


def test_a_test_split(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_dir, "data.test_fraction=0.2", "train.max_steps=3")
    assert main(["evaluate", "--run", str(run_dir), "--split", "test"]) == 0
    report = json.loads((run_dir / "eval" / "test-best.json").read_text())
    assert set(report["metrics"]) == {"test_loss", "test_mae", "test_mse"}
    assert report["samples"] == 60  # a window per day of the last 20% of 300 days
    # the validation split moved before it, and still reproduces its log
    val = evaluate_run(run_dir)
    assert val["samples"] == 60
    assert val["metrics"] == logged_val(run_dir, val["step"])


ERRORS = [
    (
        ["--split", "test"],
        "ValueError: --split test: job 'example' has no test split (its "
        "JobParts.test_set is None); it has train, val",
    ),
    (
        ["--out", "metrics.txt"],
        "ValueError: --out 'metrics.txt': expected a file ending in "
        ".json (the predictions go next to it, as .pt)",
    ),
    (["--checkpoint", "gone.pt"], "CheckpointError: checkpoint 'gone.pt' does not exist"),
    (
        ["model.hidden=12"],
        "CheckpointError: checkpoint '{ckpt}' was written for another model: shape mismatch",
    ),
    (["train.lrr=1"], "ConfigError: unknown config key 'train.lrr'; did you mean 'lr'?"),
]


@pytest.mark.parametrize(("extra", "message"), ERRORS, ids=[e[0][0] for e in ERRORS])
def test_bad_input_is_a_one_line_error(finished, capsys, extra, message):
    run_dir, _ = finished
    assert main(["evaluate", "--run", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    ckpt = run_dir / "checkpoints" / "best.pt"
    assert err.startswith(f"fastcore.train: error: {message.format(ckpt=ckpt)}"), err
    assert err.count("\n") == 1


def test_a_run_dir_without_a_config(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"fastcore.train: error: FileNotFoundError: run directory '{tmp_path}' has no "
        "config.yaml: expected the run_dir of a run of python -m fastcore.train\n"
    )
    with pytest.raises(SystemExit):  # argparse: --run is required
        main(["evaluate"])


NO_PREDICT_JOB = """
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastcore.train import JobParts


@dataclass
class DataConfig:
    pass


@dataclass
class ModelConfig:
    pass


def build(cfg, ctx):
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x.sum(1, keepdim=True))
    return JobParts(
        model=nn.Linear(3, 1),
        train_set=data,
        val_set=data,
        loss_fn=lambda model, batch: ((model(batch[0]) - batch[1]).pow(2).mean(), {}),
    )
"""


def test_a_job_without_predict(tmp_path, monkeypatch, capsys):
    (tmp_path / "no_predict_job.py").write_text(NO_PREDICT_JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        run_dir = tmp_path / "run"
        run(
            resolve_config(
                None,
                [
                    "job=no_predict_job",
                    f"run_dir={run_dir}",
                    "log.progress=false",
                    "log.tensorboard=false",
                    "train.batch_size=16",
                ],
            )
        )
        capsys.readouterr()  # the training's log
        assert main(["evaluate", "--run", str(run_dir)]) == 2
        assert capsys.readouterr().err == (
            "fastcore.train: error: ValueError: job 'no_predict_job' has no predict hook "
            "(JobParts.predict), which evaluate needs to write predictions; give its build "
            "one (docs/own-job.md)\n"
        )
    finally:
        sys.modules.pop("no_predict_job", None)


def test_the_basin_job_on_both_splits(tmp_path):
    # the job's own whole-split metrics (NSE, KGE, ...) come back too, exactly on val
    fast = [
        "log.progress=false",
        "log.tensorboard=false",
        "data.network=synthetic",
        "data.synthetic_basins=14",
        "data.years=2",
        "data.lookback=8",
        "data.horizon=3",
        "model.hidden=4",
        "train.max_steps=4",
        "train.batch_size=8",
        "train.threads=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
    ]
    run(resolve_config(str(ROOT / "configs" / "basin.yaml"), fast))
    val = evaluate_run(tmp_path / "run")
    assert "val_nse" in val["metrics"] and "val_kge" in val["metrics"]
    assert val["metrics"] == logged_val(tmp_path / "run", val["step"])
    test = evaluate_run(tmp_path / "run", "test")
    assert {"test_loss", "test_nse", "test_kge", "test_rmse"} <= set(test["metrics"])
    pred = torch.load(test["predictions"], weights_only=True)
    windows = test["samples"]
    assert pred["prediction"].shape == pred["target"].shape == (windows, 3, 14)
    assert torch.isfinite(pred["prediction"]).all()
