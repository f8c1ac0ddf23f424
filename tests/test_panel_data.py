"""fastcore.data.panel (windows, splits, normalisation, masking, rolling origins, caches,
errors) and fastcore.data.epidemic (the endemic-epidemic simulation)."""

import math

import numpy as np
import pytest
import torch

from fastcore.data.epidemic import simulate_epidemic
from fastcore.data.panel import Calendar, PanelBatch, PanelData, PanelScaler

NAN = float("nan")


def coded_series(t=40, n=3, c=2):
    """value = 1000 t + 10 n + c: every entry names its own position."""
    tt = torch.arange(t, dtype=torch.float32)[:, None, None]
    nn_ = torch.arange(n, dtype=torch.float32)[None, :, None]
    cc = torch.arange(c, dtype=torch.float32)[None, None, :]
    return 1000 * tt + 10 * nn_ + cc


def ring(n):
    src = torch.arange(n)
    return torch.stack([torch.cat([src, (src + 1) % n]), torch.cat([(src + 1) % n, src])])


# ---------------------------------------------------------------------------------------
# Windows: contents, shapes, splits, leakage
# ---------------------------------------------------------------------------------------


def test_windows_gather_the_right_steps():
    series = coded_series()
    panel = PanelData(series, ring(3), normalize="none", splits=(0.5, 0.25, 0.25))
    lookback, horizon = 5, 3
    for split in ("train", "val", "test"):
        windows = panel.windows(split, lookback, horizon)
        batch = windows.batch(range(len(windows)))
        b = len(windows)
        assert batch.x.shape == (b, lookback, 3, 2) and batch.y.shape == (b, horizon, 3, 2)
        for i, t in enumerate(windows.origins.tolist()):
            assert torch.equal(batch.x[i], series[t - lookback + 1 : t + 1])
            assert torch.equal(batch.y[i], series[t + 1 : t + 1 + horizon])
            assert torch.equal(batch.y_raw[i], series[t + 1 : t + 1 + horizon])
            assert batch.time_x[i].tolist() == list(range(t - lookback + 1, t + 1))
            assert batch.time_y[i].tolist() == list(range(t + 1, t + 1 + horizon))
        assert batch.origin.tolist() == windows.origins.tolist()
        assert bool(batch.x_mask.all()) and bool(batch.y_mask.all())


def test_two_dim_and_numpy_series_have_one_channel():
    series = np.random.default_rng(0).random((30, 4))
    panel = PanelData(series, ring(4).numpy(), normalize="none")
    batch = panel.windows("train", 4, 2).batch([0])
    assert batch.x.shape == (1, 4, 4, 1) and batch.x.dtype == torch.float32
    assert torch.allclose(batch.x[0, :, :, 0], torch.tensor(series[:4], dtype=torch.float32))


@pytest.mark.parametrize("lookback,horizon,stride", [(1, 1, 1), (6, 4, 1), (3, 2, 3), (12, 1, 2)])
def test_no_leakage_targets_inside_their_split(lookback, horizon, stride):
    panel = PanelData(coded_series(60), ring(3), splits=(0.5, 0.25, 0.25))
    covered = []
    for split in ("train", "val", "test"):
        start, stop = panel.split_bounds(split)
        windows = panel.windows(split, lookback, horizon, stride=stride)
        batch = windows.batch(range(len(windows)))
        assert int(batch.time_y.min()) >= start and int(batch.time_y.max()) < stop
        assert int(batch.time_x.min()) >= 0
        assert bool((batch.time_x.max(1).values == batch.origin).all())  # inputs end at the origin
        assert bool((batch.time_y.min(1).values == batch.origin + 1).all())
        if stride == 1:  # every target step of the split is some window's first target
            first_targets = batch.time_y[:, 0].tolist()
            expected_first = max(start, lookback)
            assert first_targets == list(range(expected_first, stop - horizon + 1))
        covered.append((start, stop))
    assert covered == [(0, 30), (30, 45), (45, 60)]


def test_future_values_change_nothing_before_them():
    """A panel whose test part differs gives identical train and val windows and scaler."""
    series = torch.rand(80, 5, 1, generator=torch.Generator().manual_seed(0)) * 10
    changed = series.clone()
    changed[60:] = 1e6  # the test split [60, 80) is replaced
    kwargs = dict(edge_index=ring(5), splits=(0.5, 0.25, 0.25), normalize="log1p_standard")
    a, b = PanelData(series, **kwargs), PanelData(changed, **kwargs)
    assert torch.equal(a.scaler.mean, b.scaler.mean) and torch.equal(a.scaler.std, b.scaler.std)
    for split in ("train", "val"):
        wa, wb = a.windows(split, 8, 4), b.windows(split, 8, 4)
        for name, value in wa.batch(range(len(wa))).items():
            assert torch.equal(value, getattr(wb.batch(range(len(wb))), name)), (split, name)


def test_split_forms_agree():
    series = torch.rand(100, 2)
    ei = ring(2)
    by_fraction = PanelData(series, ei, splits=(0.6, 0.2, 0.2)).splits
    by_boundary = PanelData(series, ei, splits=(60, 80)).splits
    by_dict = PanelData(series, ei, splits={"train": (0, 60), "val": (60, 80), "test": (80, 100)})
    assert by_fraction == by_boundary == by_dict.splits
    assert by_fraction == {"train": (0, 60), "val": (60, 80), "test": (80, 100)}
    two = PanelData(series, ei, splits=(0.75, 0.25)).splits
    assert two == {"train": (0, 75), "test": (75, 100)}
    gap = PanelData(series, ei, splits={"train": (10, 50), "test": (70, 100)}).splits
    assert gap == {"train": (10, 50), "test": (70, 100)}


def test_split_by_timestamps():
    cal = Calendar(start="2015-01-05", freq="W")
    panel = PanelData(
        torch.rand(156, 3), ring(3), calendar=cal, splits=("2016-01-04", "2016-07-04")
    )
    stamps = panel.timestamps()
    assert str(stamps[52])[:10] == "2016-01-04" and panel.splits["val"][0] == 52
    assert str(stamps[panel.splits["test"][0]])[:10] == "2016-07-04"
    batch = panel.windows("val", 4, 2).batch([0])
    assert [str(s)[:10] for s in panel.timestamps(batch.time_y[0])] == ["2016-01-04", "2016-01-11"]
    by_dict = PanelData(
        torch.rand(156, 3),
        ring(3),
        calendar=cal,
        splits={"train": ("2015-01-05", "2016-01-04"), "test": ("2016-01-04", "2018-01-01")},
    )
    assert by_dict.splits == {"train": (0, 52), "test": (52, 156)}


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def numpy_stats(train: np.ndarray, per_node: bool):
    """nanmean / population nanstd per (node, channel) or per channel."""
    if not per_node:
        train = train.reshape(-1, 1, train.shape[-1])
    return np.nanmean(train, 0), np.nanstd(train, 0)


@pytest.mark.parametrize("per_node", [True, False])
def test_standard_fitted_on_train_only_and_inverts(per_node):
    g = torch.Generator().manual_seed(1)
    series = torch.randn(90, 4, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor(
        [10.0, -2.0]
    )
    series[5, 1, 0] = series[70, 2, 1] = NAN
    panel = PanelData(
        series, ring(4), splits=(0.6, 0.2, 0.2), normalize="standard", per_node=per_node
    )
    mean, std = numpy_stats(series[:54].double().numpy(), per_node)
    np.testing.assert_allclose(panel.scaler.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(panel.scaler.std.numpy(), std, rtol=1e-12)
    z = panel.values
    assert torch.allclose(
        z, ((series.double() - panel.scaler.mean) / panel.scaler.std).float(), equal_nan=True
    )
    back = panel.inverse(z)
    assert torch.allclose(back, series, atol=1e-4, equal_nan=True)
    batch = panel.windows("test", 6, 3).batch([0, 1])
    assert torch.allclose(panel.inverse(batch.y), batch.y_raw, atol=1e-4, equal_nan=True)
    # The training part is standardised, the rest not exactly.
    train_z = z[:54].double()
    if per_node:
        assert torch.allclose(
            torch.nanmean(train_z, 0), torch.zeros(4, 2, dtype=torch.float64), atol=1e-6
        )


def test_log1p_modes_round_trip_counts():
    counts = torch.poisson(torch.full((60, 3, 1), 4.0), generator=torch.Generator().manual_seed(2))
    for mode in ("log1p", "log1p_standard"):
        panel = PanelData(counts, ring(3), normalize=mode)
        if mode == "log1p":
            assert torch.allclose(panel.values, torch.log1p(counts))
        else:
            logged = torch.log1p(counts[:42]).double()
            assert torch.allclose(panel.scaler.mean, logged.mean(0))
            assert torch.allclose(panel.scaler.std, logged.std(0, unbiased=False))
        assert torch.equal(panel.inverse(panel.values).round(), counts)
        assert torch.allclose(panel.inverse(panel.values), counts, atol=1e-4)
        assert torch.allclose(panel.transform(counts), panel.values)


def test_constant_training_node_is_only_centred():
    series = torch.zeros(50, 2)
    series[:, 1] = torch.arange(50.0)
    series[45, 0] = 7.0  # an outbreak after training in a node that was 0 all along
    panel = PanelData(series, ring(2), splits=(0.6, 0.2, 0.2), normalize="standard")
    assert panel.scaler.std[0, 0] == 1.0 and panel.scaler.mean[0, 0] == 0.0
    assert panel.values[45, 0, 0] == 7.0  # not 7 / 1e-6


def test_scaler_no_valid_training_value_gets_identity():
    train = torch.full((5, 2, 1), NAN)
    train[:, 1, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    s = PanelScaler.fit(train, "standard")
    assert s.mean[0, 0] == 0 and s.std[0, 0] == 1
    assert s.mean[1, 0] == 3 and s.std[1, 0] == pytest.approx(math.sqrt(2))


def test_log1p_rejects_negative_values():
    series = torch.rand(30, 2)
    series[12, 1] = -0.5
    with pytest.raises(
        ValueError, match=r"non-negative.*1 negative values, the first -0.5 at index \(12, 1, 0\)"
    ):
        PanelData(series, ring(2), normalize="log1p")


# ---------------------------------------------------------------------------------------
# Missing values
# ---------------------------------------------------------------------------------------


def test_nan_inputs_filled_and_flagged_nan_targets_masked():
    series = coded_series(30, 2, 1)
    series[10, 0, 0] = series[12, 1, 0] = series[20, 0, 0] = NAN
    panel = PanelData(
        series,
        ring(2),
        normalize="none",
        fill_value=-1.0,
        missing_indicator=True,
        splits=(0.6, 0.2, 0.2),
    )
    assert panel.input_channels == 2
    windows = panel.windows("train", 4, 2)
    batch = windows.batch(range(len(windows)))
    assert not torch.isnan(batch.x).any()
    values, flags = batch.x[..., :1], batch.x[..., 1:]
    assert torch.equal(flags.bool(), batch.x_mask)
    gathered = series[batch.time_x]
    assert torch.equal(batch.x_mask, ~torch.isnan(gathered))
    assert torch.equal(values[~batch.x_mask], torch.full((int((~batch.x_mask).sum()),), -1.0))
    assert torch.equal(values[batch.x_mask], gathered[batch.x_mask])
    # Targets stay NaN (never filled, never dropped) and are masked.
    target = series[batch.time_y]
    assert torch.equal(batch.y_mask, ~torch.isnan(target))
    assert (
        torch.isnan(batch.y[~batch.y_mask]).all() and torch.isnan(batch.y_raw[~batch.y_mask]).all()
    )
    assert int((~batch.y_mask).sum()) > 0
    assert panel.summary()["missing"] == 3


def test_dataloader_collate_matches_batch():
    panel = PanelData(
        torch.rand(40, 3, 2), ring(3), covariates=torch.rand(40, 2), calendar=Calendar(period=7)
    )
    windows = panel.windows("train", 5, 2)
    loader = torch.utils.data.DataLoader(windows, batch_size=4, collate_fn=PanelBatch.collate)
    first = next(iter(loader))
    direct = windows.batch([0, 1, 2, 3])
    for name, value in direct.items():
        assert torch.equal(getattr(first, name), value), name


# ---------------------------------------------------------------------------------------
# Covariates, calendar, seasonal features
# ---------------------------------------------------------------------------------------


def test_covariates_for_inputs_and_horizon():
    t, n = 50, 3
    global_cov = torch.arange(t, dtype=torch.float32)[:, None].repeat(1, 2)  # [T, K=2]
    node_cov = coded_series(t, n, 1)  # [T, N, K=1]
    for cov, k in ((global_cov, 2), (node_cov, 1)):
        panel = PanelData(torch.rand(t, n), ring(n), covariates=cov, covariate_normalize="none")
        batch = panel.windows("val", 6, 3).batch([0, 2])
        assert batch.cov_x.shape == (2, 6, n, k) and batch.cov_y.shape == (2, 3, n, k)
        full = cov if cov.dim() == 3 else cov[:, None, :].expand(t, n, k)
        assert torch.equal(batch.cov_x, full[batch.time_x])
        assert torch.equal(batch.cov_y, full[batch.time_y])  # known in advance
    standard = PanelData(torch.rand(t, n), ring(n), covariates=global_cov, splits=(0.6, 0.2, 0.2))
    train = global_cov[:30].double()
    expected = (global_cov.double() - train.mean(0)) / train.std(0, unbiased=False)
    assert torch.allclose(standard.covariates[:, 0, :].double(), expected, atol=1e-6)


def test_seasonal_features_and_calendar():
    cal = Calendar(period=52, harmonics=2)
    panel = PanelData(torch.rand(120, 2), ring(2), calendar=cal)
    batch = panel.windows("test", 8, 4).batch([0])
    t = batch.time_y[0].double()
    angle = 2 * math.pi * t / 52
    expected = torch.stack([angle.sin(), angle.cos(), (2 * angle).sin(), (2 * angle).cos()], -1)
    assert torch.allclose(batch.season_y[0].double(), expected, atol=1e-6)
    assert panel.season_features == 4 and panel.timestamps() is None
    yearly = Calendar(start="2020-01-01", freq="D")
    phase = yearly.phase(367)
    assert phase[0] == 0 and phase[366] == 0  # 2020 is a leap year: day 366 is 2021-01-01
    assert phase[183] == pytest.approx(183 / 366)
    monthly = Calendar(start="2021-01-15", freq="M").timestamps(3)
    assert [str(s)[:10] for s in monthly] == ["2021-01-01", "2021-02-01", "2021-03-01"]


def test_static_and_edge_attributes_are_carried():
    static = torch.tensor([[100.0, 1.0], [300.0, 1.0], [200.0, 1.0]])
    panel = PanelData(torch.rand(30, 3), ring(3), static=static, edge_attr=torch.arange(6.0))
    assert torch.equal(panel.static, static) and panel.edge_attr.shape == (6, 1)
    z = panel.static_normalized
    assert torch.allclose(z[:, 0], torch.tensor([-1.2247, 1.2247, 0.0]), atol=1e-4)
    assert torch.equal(z[:, 1], torch.zeros(3))  # a constant column is 0, not NaN


# ---------------------------------------------------------------------------------------
# Rolling origin
# ---------------------------------------------------------------------------------------


def test_rolling_origin_every_step_and_every_k():
    series = coded_series(60, 2, 1)
    panel = PanelData(series, ring(2), normalize="none", splits=(0.6, 0.2, 0.2))
    start, stop = panel.split_bounds("test")  # (48, 60)
    lookback, horizon = 6, 3
    batches = list(panel.rolling_origin(lookback, horizon))
    assert [b.origin.item() for b in batches] == list(range(start - 1, stop - horizon))
    for b in batches:
        t = b.origin.item()
        assert torch.equal(b.x[0], series[t - lookback + 1 : t + 1])  # inputs before the origin
        assert torch.equal(b.y[0], series[t + 1 : t + 1 + horizon])  # targets after it
    every4 = [b.origin.item() for b in panel.rolling_origin(lookback, horizon, every=4)]
    assert every4 == [47, 51, 55]
    grouped = list(panel.rolling_origin(lookback, horizon, batch_size=5))
    assert [len(b) for b in grouped] == [5, 5]
    period = [b.origin.item() for b in panel.rolling_origin(lookback, horizon, split=(20, 30))]
    assert period == list(range(19, 27))


def test_rolling_origin_partial_masks_beyond_the_period_without_reading_it():
    series = coded_series(40, 2, 1)
    series[30:] = NAN  # beyond the period: would show up if read
    panel = PanelData(
        series, ring(2), normalize="none", splits={"train": (0, 20), "test": (20, 30)}
    )
    batches = list(panel.rolling_origin(4, 3, partial=True))
    assert batches[-1].origin.item() == 28
    last = batches[-1]
    assert last.y_mask[0, :, 0, 0].tolist() == [True, False, False]
    assert last.time_y[0].tolist() == [29, 30, 31]
    full = list(panel.rolling_origin(4, 3))
    assert full[-1].origin.item() == 26 and bool(full[-1].y_mask.all())
    # Partial targets are NaN because they are outside the period, even where the series is not.
    clean = PanelData(
        coded_series(40, 2, 1),
        ring(2),
        normalize="none",
        splits={"train": (0, 20), "test": (20, 30)},
    )
    last_clean = list(clean.rolling_origin(4, 3, partial=True))[-1]
    assert torch.isnan(last_clean.y_raw[0, 1:]).all()


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def test_eager_and_lazy_caches_agree_and_auto_respects_budget():
    series = torch.rand(70, 4, 2)
    series[3, 1, 1] = NAN
    panel = PanelData(
        series,
        ring(4),
        covariates=torch.rand(70, 3),
        calendar=Calendar(period=12),
        missing_indicator=True,
    )
    eager = panel.windows("train", 6, 3, cache="eager")
    lazy = panel.windows("train", 6, 3, cache="lazy")
    assert (eager.mode, lazy.mode) == ("eager", "lazy")
    idx = [5, 0, len(eager) - 1, -1]
    for name, value in eager.batch(idx).items():
        assert torch.equal(value, getattr(lazy.batch(idx), name)), name
    # cache_bytes is what the eager cache holds (covariates of [T, K] are stored once per step).
    held = sum(v.untyped_storage().nbytes() for _, v in eager._cache.items())
    assert eager.cache_bytes() == held
    assert panel.windows("train", 6, 3, max_cache_bytes=held).mode == "eager"
    assert panel.windows("train", 6, 3, max_cache_bytes=held - 1).mode == "lazy"


def test_batches_cover_every_window_once():
    panel = PanelData(torch.rand(60, 2), ring(2))
    windows = panel.windows("train", 4, 2)
    seen = torch.cat(
        [
            b.origin
            for b in windows.batches(7, shuffle=True, generator=torch.Generator().manual_seed(0))
        ]
    )
    assert sorted(seen.tolist()) == windows.origins.tolist()
    assert all(len(b) == 7 for b in windows.batches(7, drop_last=True))
    with pytest.raises(IndexError, match="out of range"):
        windows.batch([len(windows)])


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(series=torch.rand(30)),
            ValueError,
            r"series must be \[T, N\] or \[T, N, C\], got shape \(30,\)",
        ),
        (dict(series=torch.rand(30, 2, 1, 1)), ValueError, r"got shape \(30, 2, 1, 1\)"),
        (
            dict(series=torch.full((30, 3), math.inf)),
            ValueError,
            r"series has 90 infinite values.*NaN",
        ),
        (
            dict(edge_index=torch.tensor([0, 1])),
            ValueError,
            r"edge_index must be \[2, E\], got shape \(2,\)",
        ),
        (
            dict(edge_index=torch.tensor([[0, 1], [1, 3]])),
            ValueError,
            r"edge_index values must lie in \[0, N=3\), got 3 at edge 1 \(row 1\)",
        ),
        (
            dict(edge_index=torch.tensor([[0, -1], [1, 2]])),
            ValueError,
            r"got -1 at edge 1 \(row 0\)",
        ),
        (dict(edge_index=torch.tensor([[0.0], [1.0]])), TypeError, "edge_index must hold integers"),
        (dict(edge_attr=torch.rand(5, 2)), ValueError, r"edge_attr must be \[E=2, D\]"),
        (dict(edge_attr=torch.tensor([1.0, math.nan])), ValueError, "edge_attr must be finite"),
        (
            dict(static=torch.rand(4, 2)),
            ValueError,
            r"static must be \[N=3, S\], got shape \(4, 2\)",
        ),
        (
            dict(static=torch.tensor([[1.0], [math.inf], [0.0]])),
            ValueError,
            "static must be finite",
        ),
        (
            dict(covariates=torch.rand(29, 2)),
            ValueError,
            r"covariates must be \[T=30, N=3, K\] or \[T=30, K\], got shape \(29, 2\)",
        ),
        (dict(covariates=torch.rand(30, 2, 4)), ValueError, r"got shape \(30, 2, 4\)"),
        (
            dict(
                covariates=torch.ones(30, 2).index_put_(
                    (torch.tensor([7]), torch.tensor([1])), torch.tensor(math.nan)
                )
            ),
            ValueError,
            r"covariates must be finite \(they are known in advance.*the first at index \(7, 1\)",
        ),
        (dict(splits=(0.7, 0.2)), ValueError, r"positive and sum to 1, got \(0.7, 0.2\)"),
        (dict(splits=(0.5, 0.0, 0.5)), ValueError, "positive and sum to 1"),
        (
            dict(splits={"train": (0, 20), "val": (15, 30)}),
            ValueError,
            r"chronological and disjoint: 'train' is \[0, 20\) but 'val' starts at 15",
        ),
        (dict(splits={"val": (0, 20), "test": (20, 30)}), ValueError, "must include 'train'"),
        (dict(splits={"train": (0, 40)}), ValueError, r"train.stop=40 must lie in \[0, T=30\]"),
        (
            dict(splits={"train": (0, 10), "holdout": (10, 30)}),
            ValueError,
            "split name must be one of",
        ),
        (dict(splits=("2020-01-01",)), ValueError, "calendar has no dates"),
        (
            dict(normalize="minmax"),
            ValueError,
            r"normalize must be one of 'none', 'standard', 'log1p', 'log1p_standard', got 'minmax'",
        ),
        (dict(calendar="weekly"), TypeError, "calendar must be a Calendar"),
        (
            dict(calendar=Calendar(timestamps=["2020-01-01", "2020-01-08"])),
            ValueError,
            "Calendar has 2 timestamps, the series 30 steps",
        ),
    ],
)
def test_construction_errors(kwargs, error, match):
    args = dict(series=torch.rand(30, 3), edge_index=ring(3)[:, :2])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        PanelData(args.pop("series"), args.pop("edge_index"), **args)


def test_window_errors():
    panel = PanelData(torch.rand(40, 2), ring(2), splits=(0.7, 0.15, 0.15))  # val [28, 34)
    with pytest.raises(
        ValueError,
        match=r"split 'val' covers steps \[28, 34\) \(6 steps\): too short for lookback=4 \+ horizon=7",
    ):
        panel.windows("val", 4, 7)
    with pytest.raises(
        ValueError,
        match=r"split 'train' covers steps \[0, 28\) \(28 steps\): too short for lookback=25 \+ horizon=4",
    ):
        panel.windows("train", 25, 4)
    with pytest.raises(ValueError, match="lookback must be >= 1, got 0"):
        panel.windows("train", 0, 2)
    with pytest.raises(ValueError, match="split must be one of 'train', 'val', 'test', got 'dev'"):
        panel.windows("dev", 3, 2)
    with pytest.raises(ValueError, match="cache must be one of"):
        panel.windows("train", 3, 2, cache="disk")
    with pytest.raises(ValueError, match=r"origins must lie in \[lookback - 1 = 3, 38\]"):
        panel.window_batch([2], 4, 1)
    with pytest.raises(ValueError, match="too short"):  # raised at the call, not at next()
        panel.rolling_origin(4, 10, split="test")


def test_calendar_errors():
    with pytest.raises(
        ValueError,
        match="strictly increasing, got 2020-01-08T00:00:00 then 2020-01-01T00:00:00 at steps 1, 2",
    ):
        Calendar(timestamps=["2020-01-01", "2020-01-08", "2020-01-01"])
    with pytest.raises(ValueError, match="start and freq go together"):
        Calendar(start="2020-01-01")
    with pytest.raises(ValueError, match="freq must be one of 'h', 'D', 'W', 'M', got 'Q'"):
        Calendar(start="2020-01-01", freq="Q")
    with pytest.raises(ValueError, match="period must be a finite number > 1, got 1"):
        Calendar(period=1)
    with pytest.raises(ValueError, match="needs timestamps, start and freq, or a period"):
        Calendar()
    with pytest.raises(ValueError, match="not both"):
        Calendar(timestamps=["2020-01-01"], start="2020-01-01", freq="D")


# ---------------------------------------------------------------------------------------
# The endemic-epidemic simulation
# ---------------------------------------------------------------------------------------


def test_epidemic_defaults_are_sparse_with_outbreaks():
    sim = simulate_epidemic()
    assert sim.counts.shape == (520, 48)
    assert 0.8 <= sim.zero_fraction <= 0.9, sim.zero_fraction
    assert float(sim.counts.max()) >= 10  # outbreaks, not a sprinkle of ones
    # Outbreaks spread: a district's count follows its neighbours' counts of the step before
    # far more than other districts' counts.
    y = sim.counts.double()
    src, dst = sim.edge_index
    nb_next = (y[:-1, src] * y[1:, dst]).mean()
    n = y.shape[1]
    far_src = torch.arange(n).repeat_interleave(n)
    far_dst = torch.arange(n).repeat(n)
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    adjacency[src, dst] = True
    far = ~adjacency[far_src, far_dst] & (far_src != far_dst)
    far_next = (y[:-1, far_src[far]] * y[1:, far_dst[far]]).mean()
    assert nb_next > 2 * far_next, (float(nb_next), float(far_next))


def test_epidemic_means_follow_the_model():
    sim = simulate_epidemic(steps=200, nodes=20, graph="geometric", seed=3)
    p = sim.params
    nu = p.endemic(200)
    assert torch.allclose(nu.float(), sim.endemic)
    w = torch.zeros(20, 20, dtype=torch.float64)
    w[sim.edge_index[0], sim.edge_index[1]] = sim.edge_weight.double()
    assert torch.allclose(w.sum(0), torch.ones(20, dtype=torch.float64))  # sum_j w[j, i] = 1
    y = sim.counts.double()
    expected = nu[1:] + p.lam * y[:-1] + p.phi * (y[:-1] @ w)
    assert torch.allclose(sim.mean[1:].double(), expected, rtol=1e-5)
    assert abs(float(y.mean()) - float(sim.mean.double().mean())) < 0.15 * float(y.mean())


def test_epidemic_graphs_and_seeds():
    grid = simulate_epidemic(steps=10, nodes=12, seed=0)
    assert grid.edge_index.shape == (2, 2 * (3 * 3 + 2 * 4))  # 3 x 4 grid
    geo = simulate_epidemic(steps=10, nodes=30, graph="geometric", seed=0)
    ei = geo.edge_index
    pairs = set(zip(ei[0].tolist(), ei[1].tolist(), strict=True))
    assert pairs == {(j, i) for i, j in pairs}
    assert set(ei[1].tolist()) == set(range(30))  # nobody isolated
    a, b = simulate_epidemic(steps=50, seed=5), simulate_epidemic(steps=50, seed=5)
    assert torch.equal(a.counts, b.counts)
    assert not torch.equal(a.counts, simulate_epidemic(steps=50, seed=6).counts)
    with pytest.raises(ValueError, match=r"lam \+ phi must be < 1.*lam=0.7 \+ phi=0.4"):
        simulate_epidemic(lam=0.7, phi=0.4)
    with pytest.raises(ValueError, match="graph must be one of 'grid', 'geometric', got 'ring'"):
        simulate_epidemic(graph="ring")


def test_epidemic_panel_feeds_the_data_path():
    sim = simulate_epidemic(steps=156, nodes=12, seed=2)
    panel = PanelData(
        sim.counts,
        sim.edge_index,
        edge_attr=sim.edge_weight,
        calendar=Calendar(period=52),
        normalize="log1p",
    )
    batch = panel.windows("train", 8, 4).batch([0, 1])
    assert torch.equal(batch.y_raw, sim.counts[batch.time_y][..., None])
    assert torch.allclose(batch.x, torch.log1p(sim.counts[batch.time_x])[..., None])
