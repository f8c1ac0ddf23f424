"""The basin job's pieces: windows and normalisation, the hierarchical model against its
reference-layer twin, the rollout guards, the baselines, the report, end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from fastcore.data.basin import (
    INPUTS,
    BasinSeries,
    BasinWindows,
    DischargeScaler,
    Prepared,
    prepare,
    static_attributes,
)
from fastcore.data.synthetic import synthetic_network
from fastcore.models.basin import BasinGRU, HierarchicalBasinModel, RiverGRUCell
from fastcore.nn.spatiotemporal import last_and_mean
from fastcore.ops import spmm
from fastcore.testing import LoopLayersBasinModel
from fastcore.train.basin import causal_edges
from fastcore.train.basin_report import climatology_forecast, persistence, report
from fastcore.train.cli import resolve_config, run

FAST = [
    "log.progress=false",
    "log.tensorboard=false",
    "data.network=synthetic",
    "data.synthetic_basins=14",
    "data.years=2",
    "data.lookback=8",
    "data.horizon=3",
    "model.hidden=4",
    "train.epochs=1",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.threads=1",
]


def small_series(days=120, basins=6, missing=True) -> BasinSeries:
    g = torch.Generator().manual_seed(0)
    forcings = torch.rand(days, basins, 3, generator=g) * torch.tensor([5.0, 10.0, 2.0])
    discharge = 10 + 5 * torch.rand(days, basins, generator=g)
    if missing:
        forcings[5, 1, 0] = float("nan")
        discharge[[10, 11, 100], 2] = float("nan")
    return BasinSeries(
        forcings=forcings,
        discharge=discharge,
        static=torch.rand(basins, 4, generator=g),
        doy=torch.arange(days) % 365 + 1,
    )


def test_windows_normalisation_and_missing_values(tmp_path):
    series = small_series()
    data = prepare(series, (0.6, 0.2, 0.2), cache=tmp_path / "cache.pt")
    assert data.splits == {"train": (0, 72), "val": (72, 96), "test": (96, 120)}
    assert not torch.isnan(data.inputs).any() and not torch.isnan(data.future).any()
    assert data.missing == {"forcings": 1, "discharge": 3}
    assert torch.isnan(data.target[[10, 11, 100], 2]).all()
    assert data.inputs[10, 2, INPUTS.index("discharge_observed")] == 0
    assert data.inputs[9, 2, INPUTS.index("discharge_observed")] == 1
    # statistics from the training days only: changing later days changes nothing
    later = small_series()
    later.forcings[80:] += 100.0
    later.discharge[80:] *= 50.0
    again = prepare(later, (0.6, 0.2, 0.2))
    assert torch.equal(again.forcing_mean, data.forcing_mean)
    assert torch.equal(again.q_max, data.q_max)
    train_max = torch.nan_to_num(series.discharge[:72], nan=-1).amax(0)
    torch.testing.assert_close(data.q_max, 1.5 * train_max)
    cached = Prepared.load(tmp_path / "cache.pt")  # weights_only=True inside
    assert torch.equal(cached.inputs, data.inputs) and cached.splits == data.splits

    val = BasinWindows(data, "val", lookback=7, horizon=3)
    x, future, y = val[0]
    assert x.shape == (7, 6, 5) and future.shape == (3, 6, 3) and y.shape == (3, 6)
    assert int(val.origins[0]) == 71 and int(val.origins[-1]) == 92  # targets 72 .. 95
    assert torch.equal(y, data.target[72:75])
    strided = BasinWindows(data, "val", 7, 3, stride=4)
    assert strided.origins.tolist() == val.origins[::4].tolist()
    with pytest.raises(ValueError, match="too short for lookback 7 \\+ horizon 30"):
        BasinWindows(data, "val", 7, 30)
    with pytest.raises(ValueError, match="split must be one of train, val, test, got 'dev'"):
        BasinWindows(data, "dev", 7, 3)


def test_discharge_scaler_is_exactly_invertible():
    q = torch.tensor([[1.0, 0.0, float("nan")], [4.0, 0.0, float("nan")]])
    scaler = DischargeScaler.fit(q, headroom=2.0)
    assert scaler.q_max.tolist() == [8.0, 1.0, 1.0]  # all-zero and all-missing basins -> 1
    x = torch.rand(5, 3, dtype=torch.float64) * 10
    assert torch.equal(scaler.inverse(scaler.transform(x)), x)
    with pytest.raises(ValueError, match="q_max must be > 0"):
        DischargeScaler(torch.tensor([1.0, 0.0]))


def tiny_model(loop_layers=False, hidden=4):
    net = synthetic_network(14, seed=3)
    hierarchy = net.to_hierarchy(
        num_features=len(INPUTS),
        causal_edges=[causal_edges(lv.num_basins).numpy() for lv in net.levels],
    )
    torch.manual_seed(0)
    cls = LoopLayersBasinModel if loop_layers else HierarchicalBasinModel
    model = cls(
        hierarchy,
        static_attributes(net.levels[0]),
        num_inputs=len(INPUTS),
        num_forcings=3,
        hidden=hidden,
        q_feature=INPUTS.index("discharge"),
    )
    with torch.no_grad():  # a trained-looking head (it starts at zero: persistence)
        model.decoder.head.linear.weight.normal_(0.0, 0.5)
    return net, model


def inputs(n, batch=2, steps=9, horizon=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, n, len(INPUTS), generator=g)
    future = torch.randn(batch, horizon, n, 3, generator=g)
    y = torch.rand(batch, horizon, n, generator=g)
    return x, future, y


def test_model_matches_its_reference_layer_twin():
    net, fast = tiny_model()
    _, ref = tiny_model(loop_layers=True)
    ref.load_state_dict(fast.state_dict())
    x, future, y = inputs(net.levels[0].num_basins)
    out = fast(x, future)
    assert out.shape == y.shape and ((out > 0) & (out < 1)).all()
    expected = ref(x, future)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad((out - y).square().sum(), list(fast.parameters()))
    ref_grads = torch.autograd.grad((expected - y).square().sum(), list(ref.parameters()))
    # The outputs agree to float32 rounding (above); each gradient then carries that
    # difference relative to its own scale (about 1e-5 of its largest entry on a 2-core
    # Xeon VM, whose MKL rounds differently from the EPYC VM's), so an element far below
    # the largest is held to the tensor's scale, not to a fixed 1e-6.
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=max(1e-6, 5e-5 * r.abs().max().item()))
    assert all(g.abs().sum() > 0 for g in grads[:3])  # the input latents learn


def test_river_gru_cell_prepare_and_step_are_its_forward():
    net, model = tiny_model()
    river = model.hierarchy.graphs(0)[0]
    n = net.levels[0].num_basins
    torch.manual_seed(2)
    cell = RiverGRUCell(7, 5).double()
    x, h = torch.randn(3, n, 7, dtype=torch.float64), torch.randn(3, n, 5, dtype=torch.float64)
    x.requires_grad_()

    def oracle(x, h):  # the cell's definition: GRU([x, A [x, h]], h) in one nn.GRUCell call
        mixed = spmm(torch.cat([x, h], -1), river, cell.gate(river, x.dtype), dim=1)
        flat = cell.cell(torch.cat([x, mixed], -1).reshape(3 * n, -1), h.reshape(3 * n, -1))
        return flat.view(3, n, 5)

    want = oracle(x, h)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *cell.parameters()])
    for k in (0, 3, 7):  # k leading columns prepared once, the rest stepped
        weight = cell.gate(river, x.dtype)
        got = cell.step(x[..., k:], h, river, weight, cell.prepare(x[..., :k], river, weight))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(got.square().sum(), [x, *cell.parameters()])
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cell(x, h, river), want, rtol=1e-12, atol=1e-12)
    weight = cell.gate(river, x.dtype).detach()
    with pytest.raises(ValueError, match="more than input_size 7"):
        cell.prepare(torch.randn(3, n, 8, dtype=torch.float64), river, weight)
    with pytest.raises(ValueError, match="expected input_size - k = 4"):
        cell.step(x, h, river, weight, cell.prepare(x[..., :3], river, weight))


def test_last_and_mean_gradients_are_autograds_bit_for_bit():
    h = torch.randn(3, 6, 4, 2, 5, requires_grad=True)
    g_last, g_mean = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    last, mean = last_and_mean(h)
    assert torch.equal(last, h[:, -1]) and torch.equal(mean, h.mean(1))
    got = torch.autograd.grad((last, mean), h, (g_last, g_mean))[0]
    want = torch.autograd.grad((h[:, -1], h.mean(1)), h, (g_last, g_mean))[0]
    assert torch.equal(got, want)


def test_embedding_is_the_per_variable_affine_map():
    net, model = tiny_model()
    x = inputs(net.levels[0].num_basins)[0]
    got = model.embed(x)
    static = model.static_proj(model.static)[:, None, :]
    want = x[..., None] * model.in_weight + model.in_bias + static
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    params = [model.in_weight, model.in_bias, *model.static_proj.parameters()]
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, params, upstream)
    for g, w in zip(grads, torch.autograd.grad(want, params, upstream), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_guards_count_and_never_pass_nan():
    net, model = tiny_model()
    n = net.levels[0].num_basins
    x, future, _ = inputs(n)
    x[0, 3, 2, 0] = float("nan")
    future[1, 0, 4, 1] = float("inf")
    out = model(x, future)
    assert torch.isfinite(out).all()
    counts = model.guards.pop()
    assert counts["nonfinite_inputs"] == 2.0 and counts["clamped_logits"] == 0.0
    with torch.no_grad():
        model.decoder.head.scale.fill_(1e4)  # saturate: every logit hits the clamp
        model.decoder.head.linear.bias.fill_(1.0)
    out = model(*inputs(n)[:2])
    counts = model.guards.pop()
    assert counts["clamped_logits"] == out.numel()
    assert model.guards.pop() == {}  # popped counts reset


def test_teacher_forcing_and_detached_hidden_state():
    net, model = tiny_model()
    x, future, y = inputs(net.levels[0].num_basins)
    free = model(x, future)
    forced = model(x, future, teacher=y, teacher_prob=1.0)
    assert torch.equal(free[:, 0], forced[:, 0])  # step 1 sees no teacher yet
    assert not torch.allclose(free[:, 1:], forced[:, 1:])
    # detached between steps: the last step's loss reaches the decoder's init only
    # through the context, not through earlier hidden states
    model.decoder.init.weight.grad = None
    forced[:, -1].sum().backward()
    assert model.decoder.init.weight.grad is None or model.decoder.init.weight.grad.abs().sum() == 0


def test_gru_baseline_shapes_and_bad_inputs():
    static = torch.rand(6, 4)
    gru = BasinGRU(len(INPUTS), 3, static, hidden=8)
    x, future, _ = inputs(6)
    assert gru(x, future).shape == (2, 4, 6)
    _, model = tiny_model()
    with pytest.raises(ValueError, match=r"x must be \(B, T, N=14, F=5\)"):
        model(torch.zeros(2, 9, 13, 5), future)


def test_persistence_and_climatology_baselines():
    data = prepare(small_series(days=1000), (0.8, 0.1, 0.1))  # 800 training days
    w = BasinWindows(data, "test", lookback=5, horizon=3)
    p = persistence(w, data)
    t = int(w.origins[0])
    assert torch.equal(p[0, 0], data.target[t]) and torch.equal(p[0, 2], data.target[t])
    # a missing day carries the last observation forward (days 10 and 11 of basin 2)
    train = BasinWindows(data, "train", lookback=5, horizon=3)
    at = int(torch.nonzero(train.origins == 11)[0])
    held = persistence(train, data)[at]
    assert torch.isnan(data.target[11, 2]) and held[0, 2] == data.target[9, 2]
    assert torch.equal(held[:, 0], data.target[11, 0].expand(3))
    c = climatology_forecast(w, data)
    doy = int(data.doy[t + 1])
    train_days = torch.nonzero(data.doy[:800] == doy).flatten()
    assert train_days.numel() == 2
    torch.testing.assert_close(c[0, 0], data.target[train_days].nanmean(0))


def test_basin_job_trains_and_reports(tmp_path):
    root = tmp_path / "runs"
    common = [*FAST, f"data.cache_dir={tmp_path / 'cache'}"]
    val = run(resolve_config("configs/basin.yaml", [*common, f"run_dir={root / 'hierarchical'}"]))
    assert (
        math.isfinite(val["val_nse"])
        and "val_kge" in val
        and val["val_guard_nonfinite_inputs"] == 0
    )
    log = (root / "hierarchical" / "train.log").read_text()
    assert "[SANITY] Hierarchy SANITY: 3 levels" in log and "missing (filled with 0" in log
    run(
        resolve_config("configs/basin.yaml", [*common, "model.arch=gru", f"run_dir={root / 'gru'}"])
    )
    results = report(root)
    assert set(results["models"]) == {"hierarchical", "gru", "persistence", "climatology"}
    for name, per in results["models"].items():
        assert math.isfinite(per["test"]["nse"]), name
        assert len(per["test"]["nse_lead"]) == 3
    for f in ("report.md", "loss.png", "hydrographs.png", "nse.png", "metrics.json"):
        assert (root / f).is_file(), f
    assert "| persistence |" in (root / "report.md").read_text()
    with open(root / "predictions_test.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["origin_day", "lead", "basin", "predicted_m3s", "observed_m3s"]
    assert len(rows) - 1 == results["predictions_test_rows"] > 0
    assert json.loads((root / "metrics.json").read_text())["predictions_test_rows"] == len(rows) - 1
    assert np.isfinite(float(rows[1][3]))
    # forecasting while writing (stream_predictions, two chunks of the report's batch of
    # 64 windows) gives the same file
    from fastcore.train.basin_report import load_run, stream_predictions

    _, parts = load_run(root / "hierarchical")
    test = BasinWindows(parts.val_set.data, "test", 8, 3)
    assert len(test) > 64
    streamed = root / "streamed.csv"
    assert (
        stream_predictions(parts.model, test, parts.val_set.data, streamed, "cpu", 64)
        == len(rows) - 1
    )
    assert streamed.read_text() == (root / "predictions_test.csv").read_text()


def test_station_network_levels():
    from fastcore.data.stations import station_network

    g = np.random.default_rng(0)
    lat, lon = 51.5 + 3 * g.random(12), -10 + 4 * g.random(12)
    net = station_network(lat, lon, "stations")
    fine, medium, coarse = net.levels
    assert (fine.num_basins, medium.num_basins, coarse.num_basins) == (12, 4, 1)
    assert np.bincount(fine.parent).tolist() == [3, 3, 3, 3]  # median splits of 12
    assert fine.num_edges == 36 and (fine.river_edges[0] != fine.river_edges[1]).all()
    for r in range(4):  # a region's centroid is its stations' mean position
        assert medium.lat[r] == pytest.approx(lat[fine.parent == r].mean())
    assert coarse.num_edges == 0 and (medium.parent == 0).all()
    hierarchy = net.to_hierarchy(num_features=len(INPUTS))
    assert hierarchy.num_nodes == (12, 4, 1)
    with pytest.raises(ValueError, match="need >= 4 stations"):
        station_network(lat[:3], lon[:3], "few")


def test_wind_job_runs_on_the_real_data(tmp_path):
    from fastcore.data.wind import wind_path

    if not wind_path().is_file():
        pytest.skip("the wind data is not fetched (python scripts/fetch_wind.py)")
    val = run(
        resolve_config(
            "configs/wind.yaml",
            [
                f"run_dir={tmp_path / 'wind'}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "log.progress=false",
                "log.tensorboard=false",
                "train.max_steps=3",
                "data.val_stride=20",
            ],
        )
    )
    assert math.isfinite(val["val_nse"]) and val["val_missing_targets"] == 0
