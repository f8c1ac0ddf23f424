"""The panel job (fastcore/train/panel.py): trains on a small synthetic panel, writes its
report, ``evaluate --split test`` reproduces the report's test metrics from the
checkpoint; the baselines on hand-computed cases; the forecaster's backbone; the npz
source and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcore import metrics
from fastcore.data.epidemic import simulate_epidemic
from fastcore.models.panel import (
    PanelForecaster,
    fit_blend_weight,
    fit_distribution,
    forward_fill,
    neighbour_blend,
    neighbour_mean,
    persistence,
    seasonal_naive,
    training_mean,
)
from fastcore.ops import Graph
from fastcore.train import ConfigError, load_run
from fastcore.train.cli import main, resolve_config, run
from fastcore.train.jobs import JobContext, load_job
from fastcore.train.panel_report import BACKBONE, BASELINES, MODEL, model_inputs, write_report

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "panel.yaml"
# 120 weeks x 6 districts: train [0, 84), val [84, 102), test [102, 120)
SMALL = [
    "data.synthetic.steps=120",
    "data.synthetic.nodes=6",
    "data.synthetic.endemic=0.5",
    "data.lookback=6",
    "data.horizon=2",
    "data.eval.every=2",
    "data.eval.plot_nodes=2",
    "model.hidden=8",
    "model.blocks=1",
    "model.embed=4",
    "train.epochs=1",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.threads=1",
    "log.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("panel") / "run"
    run(resolve_config(str(CONFIG), [f"run_dir={run_dir}", *SMALL]))
    return run_dir


def test_the_run_writes_its_report(finished):
    for name in ("report.md", "report.html", "report.json", "forecasts.png", "horizon.png"):
        assert (finished / name).is_file(), name
    assert (finished / "checkpoints" / "best.pt").is_file()
    results = json.loads((finished / "report.json").read_text())
    methods = results["methods"]
    assert list(methods) == [MODEL, BACKBONE, *BASELINES]  # the series is a period longer
    info = results["info"]
    assert info["test_steps"] == [102, 120] and info["origins"] == 9  # 101, 103, ..., 117
    assert info["targets"] == 9 * 2 * 6  # no missing value in the simulation
    for m in methods.values():
        o = m["overall"]
        assert all(math.isfinite(o[k]) for k in ("nll", "mae", "rmse", "crps"))
        assert len(m["by_horizon"]["rmse"]) == 2 and len(m["by_node"]["nll"]) == 6
        assert 0 <= o["coverage_50"] <= o["coverage_90"] <= 1
    text = (finished / "report.md").read_text()
    assert "## Test: overall" in text and "![forecasts.png](forecasts.png)" in text
    assert "<table>" in (finished / "report.html").read_text()
    # the persistence row is the last value, scored by hand
    sim = simulate_epidemic(steps=120, nodes=6, endemic=0.5, seed=0)
    origins = torch.arange(101, 118, 2)
    y = sim.counts[origins[:, None] + torch.tensor([1, 2])].double()  # [9, 2, 6]
    last = sim.counts[origins].double()[:, None, :]
    rmse = float((y - last).square().mean().sqrt())
    assert methods["persistence"]["overall"]["rmse"] == pytest.approx(rmse, rel=1e-12)
    assert methods["persistence"]["overall"]["mae"] == pytest.approx(
        float((y - last).abs().mean()), rel=1e-12
    )


def test_evaluate_reproduces_the_reports_test_metrics(finished, capsys):
    assert main(["evaluate", "--run", str(finished), "--split", "test"]) == 0
    capsys.readouterr()
    report = json.loads((finished / "eval" / "test-best.json").read_text())
    logged = json.loads((finished / "report.json").read_text())["methods"][MODEL]["overall"]
    assert report["samples"] == 9
    got = report["metrics"]
    for name in ("nll", "mae", "rmse", "crps", "coverage_50", "width_50", "coverage_90"):
        assert got[f"test_{name}"] == pytest.approx(logged[name], rel=1e-9, abs=1e-12), name
    # the predictions: parameters, point, interval ends, targets, origins
    pred = torch.load(finished / "eval" / "test-best.pt", weights_only=True)
    assert pred["param_log_mu"].shape == pred["point"].shape == (9, 2, 6, 1)
    assert torch.equal(pred["origin"], torch.arange(101, 118, 2))
    sim = simulate_epidemic(steps=120, nodes=6, endemic=0.5, seed=0)
    steps = pred["origin"][:, None] + torch.tensor([1, 2])
    assert torch.equal(pred["target"][..., 0], sim.counts[steps])
    assert bool((pred["lower_90"] <= pred["lower_50"]).all())
    assert bool((pred["upper_50"] <= pred["upper_90"]).all())
    mean = pred["param_log_mu"].double().exp()
    assert torch.allclose(pred["point"], mean, rtol=1e-6)  # data.eval.point: mean
    nll = metrics.mean_nll(
        "nb",
        {"log_mu": pred["param_log_mu"], "log_theta": pred["param_log_theta"]},
        pred["target"],
    )
    assert float(nll) == pytest.approx(got["test_nll"], rel=1e-5)


def test_the_report_command_and_the_backbone_row(finished, capsys):
    assert main_report(finished) == 0
    out = capsys.readouterr().out
    assert "fastcore: NLL" in out and "persistence: NLL" in out
    loaded = load_run(finished)
    model, setup = loaded.model, loaded.parts.test_set.setup
    # the backbone row is the trained model's backbone alone
    batch = setup.panel.window_batch(setup.origins("test"), setup.lookback, setup.horizon)
    x_raw = setup.panel.raw[batch.time_x]
    with torch.no_grad():
        backbone = model.combine(None, x_raw, batch.season_y)
    results = json.loads((finished / "report.json").read_text())
    nll = metrics.mean_nll("nb", backbone, batch.y_raw)
    assert results["methods"][BACKBONE]["overall"]["nll"] == pytest.approx(float(nll), rel=1e-5)


def main_report(run_dir: Path) -> int:
    from fastcore.train.panel_report import main as report_main

    return report_main(["--run", str(run_dir)])


# ------------------------------------------------------------------- baselines by hand


NAN = math.nan


def test_persistence_and_seasonal_naive_by_hand():
    raw = torch.tensor([[1.0, NAN], [2.0, NAN], [NAN, 3.0], [4.0, NAN], [5.0, 7.0]])[..., None]
    fallback = torch.tensor([[9.0], [8.0]])
    assert forward_fill(raw, fallback)[:, :, 0].tolist() == [
        [1, 8], [2, 8], [2, 3], [4, 3], [5, 7]
    ]  # fmt: skip
    p = persistence(raw, torch.tensor([1, 2, 3]), 2, fallback)
    assert p.shape == (3, 2, 2, 1)
    assert p[:, 0, :, 0].tolist() == [[2, 8], [2, 3], [4, 3]]  # not yet observed: fallback
    assert torch.equal(p[:, 0], p[:, 1])  # the same value for every lead time
    s = seasonal_naive(raw, torch.tensor([2, 3]), 2, 2, fallback)
    # origin 2: targets 3, 4 <- steps 1, 2 (step 2 of node 0 is missing: step 1's 2)
    assert s[:, :, :, 0].tolist() == [[[2, 8], [2, 3]], [[2, 3], [4, 3]]]
    with pytest.raises(ValueError, match="one period"):
        seasonal_naive(raw, torch.tensor([0]), 1, 2, fallback)
    assert training_mean(raw, 0, 4)[:, 0].tolist() == pytest.approx([7 / 3, 3.0])
    assert training_mean(raw, 0, 2)[:, 0].tolist() == [1.5, 0.0]  # never observed: 0


def test_neighbour_blend_by_hand():
    edges = torch.tensor([[1, 0, 2], [0, 1, 1]])  # 1 -> 0, 0 -> 1, 2 -> 1; node 2 has none
    own = torch.tensor([[1.0], [2.0], [3.0]])
    nbr = neighbour_mean(own, edges)
    assert nbr[:, 0].tolist() == [2.0, 2.0, 3.0]  # node 2 keeps its own value
    assert neighbour_blend(own, nbr, 0.5)[:, 0].tolist() == [1.5, 2.0, 3.0]
    # the least-squares weight recovers a blend exactly, and is clipped to [0, 1]
    g = torch.Generator().manual_seed(0)
    own = torch.rand(50, 4, 1, generator=g, dtype=torch.float64)
    nbr = torch.rand(50, 4, 1, generator=g, dtype=torch.float64)
    assert fit_blend_weight(own, nbr, 0.3 * own + 0.7 * nbr) == pytest.approx(0.3, abs=1e-9)
    assert fit_blend_weight(own, nbr, 2 * own - nbr) == 1.0
    assert fit_blend_weight(own, own, own) == 0.5  # no information: the default


def test_baseline_distributions_are_maximum_likelihood():
    # Gaussian: the RMS of the residuals per lead time and node
    point = torch.zeros(4, 1, 2, 1)
    target = torch.tensor([[1.0, 2.0], [-1.0, 2.0], [1.0, -2.0], [-1.0, NAN]])[:, None, :, None]
    fit = fit_distribution("gaussian", point, target)
    assert fit.sigma[0, :, 0].tolist() == pytest.approx([1.0, 2.0])
    assert fit.params(point)["scale"].shape == point.shape
    # Poisson around 0: the maximum-likelihood mean is the targets' mean
    counts = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(4, 1, 1, 1)
    fit = fit_distribution("poisson", torch.zeros_like(counts), counts)
    assert float(fit.delta) == pytest.approx(2.0, rel=1e-5)
    # NB: no theta does better than the fitted one
    rng = np.random.default_rng(1)
    point = rng.poisson(3.0, size=(400, 1, 3, 1)).astype(np.float64)
    target = torch.from_numpy(rng.poisson(point * rng.gamma(2.0, 0.5, point.shape)) * 1.0)
    point = torch.from_numpy(point)
    fit = fit_distribution("nb", point, target)
    best = metrics.mean_nll("nb", fit.params(point), target)
    for factor in (0.7, 1.4):
        p = fit.params(point)
        p["log_theta"] = p["log_theta"] + math.log(factor)
        assert float(metrics.mean_nll("nb", p, target)) > float(best)


# ------------------------------------------------------------------------ the model


def test_the_untrained_network_is_its_backbone_and_the_fit_finds_the_rates():
    sim = simulate_epidemic(steps=300, nodes=16, seed=3, endemic=0.2)
    graph = Graph(sim.edge_index, 16)
    model = PanelForecaster(
        graph, distribution="nb", channels=1, input_channels=2, horizon=1,
        center=torch.ones(16, 1), scale=torch.ones(16, 1), hidden=8, blocks=1, lags=1,
    )  # fmt: skip
    origins = torch.arange(4, 299)
    x_raw = sim.counts[origins[:, None] + torch.arange(-4, 1)][..., None]  # [W, 5, 16, 1]
    y_raw = sim.counts[origins + 1][:, None, :, None]
    x = torch.cat([x_raw.log1p(), torch.ones_like(x_raw)], -1)
    with torch.no_grad():
        assert torch.equal(model(x, x_raw)["log_mu"], model.combine(None, x_raw)["log_mu"])
    fit = model.fit_backbone(x_raw, y_raw)
    assert fit["after"] < fit["before"]
    lam, phi = model.log_rates.detach().exp()[0, :, 0].tolist()
    assert lam == pytest.approx(0.55, abs=0.12) and phi == pytest.approx(0.35, abs=0.15)
    assert float(model.lead_dispersion.detach().exp()) == pytest.approx(0.4, rel=0.35)  # theta


# ------------------------------------------------------------------ sources and errors


def build(tmp_path, *overrides):
    cfg = resolve_config(str(CONFIG), [f"run_dir={tmp_path}", *SMALL, *overrides])
    ctx = JobContext(torch.device("cpu"), 0, 0, 1, tmp_path, "fp32")
    return load_job("panel").build(cfg, ctx)


def test_a_users_npz_panel(tmp_path):
    g = np.random.default_rng(0)
    series = g.gamma(2.0, 3.0, size=(80, 5, 2)).astype(np.float32)
    series[10, 2, 1] = np.nan
    edges = np.array([[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 2]])
    path = tmp_path / "mine.npz"
    np.savez(path, series=series, edge_index=edges, edge_attr=np.ones(6), period=np.array(7.0),
             names=np.array(list("abcde")), dates=np.arange("2020-01-01", 80, dtype="datetime64[D]"))  # fmt: skip
    parts = build(tmp_path, f"data.source=npz:{path}", "model.head=gaussian",
                  "data.normalize=standard")  # fmt: skip
    setup = parts.test_set.setup
    assert (setup.panel.nodes, setup.panel.channels, setup.period) == (5, 2, 7)
    assert setup.names == list("abcde")
    batch = parts.collate_fn([parts.train_set[i] for i in range(3)])
    loss, values = parts.loss_fn(parts.model, batch)
    assert torch.isfinite(loss) and set(values) == {"nll", "mae", "mse"}
    params = parts.model(**model_inputs(batch, setup.panel.raw))
    assert params["loc"].shape == params["scale"].shape == (3, 2, 5, 2)
    np.savez(path, series=series)
    with pytest.raises(ValueError, match=r"missing array\(s\) edge_index"):
        build(tmp_path, f"data.source=npz:{path}", "model.head=gaussian")


def test_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source = 'csv:x': expected one of synthetic"):
        resolve_config(str(CONFIG), ["data.source=csv:x"])
    with pytest.raises(ConfigError, match=r"data.eval.levels = \[0.5, 0.5\]: expected 1 to 4"):
        resolve_config(str(CONFIG), ["data.eval.levels=[0.5,0.5]"])
    with pytest.raises(
        ConfigError,
        match=r"^model.head: expected 'gaussian' \| 'poisson' \| 'nb' \| 'zinb', got 'normal'",
    ):
        resolve_config(str(CONFIG), ["model.head=normal"])
    with pytest.raises(ValueError, match=r"^data.synthetic: lam \+ phi must be < 1"):
        build(tmp_path, "data.synthetic.lam=0.7", "data.synthetic.phi=0.4")
    with pytest.raises(ValueError, match=r"split 'val' covers steps \[84, 102\)"):
        build(tmp_path, "data.lookback=6", "data.horizon=30")
    with pytest.raises(FileNotFoundError, match=r"^data.source 'npz:nowhere.npz': no such file"):
        build(tmp_path, "data.source=npz:nowhere.npz")
    path = tmp_path / "floats.npz"
    np.savez(path, series=np.full((80, 3), 1.5), edge_index=np.array([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match=r"model.head = 'nb' models counts, .* use model.head"):
        build(tmp_path, f"data.source=npz:{path}")
    with pytest.raises(FileNotFoundError, match=r"has no config\.yaml"):
        write_report(tmp_path)


def test_docstring_examples():
    import doctest

    import fastcore.models.panel as module

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
