"""fastcore.metrics against per-basin NumPy loops, at the edges, and with missing values."""

import math

import numpy as np
import pytest
import torch

from fastcore import metrics


def numpy_metrics(p: np.ndarray, o: np.ndarray) -> dict[str, float]:
    """One basin, the textbook formulas."""
    keep = np.isfinite(o) & np.isfinite(p)
    p, o = p[keep], o[keep]
    err = p - o
    r = np.corrcoef(p, o)[0, 1]
    alpha = p.std() / o.std()
    beta = p.mean() / o.mean()
    return {
        "rmse": math.sqrt(np.mean(err**2)),
        "mae": np.mean(np.abs(err)),
        "nse": 1 - np.sum(err**2) / np.sum((o - o.mean()) ** 2),
        "r2": r**2,
        "kge": 1 - math.sqrt((r - 1) ** 2 + (alpha - 1) ** 2 + (beta - 1) ** 2),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_basin_matches_numpy_with_missing_values(dtype):
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(3, 40, 7, generator=g, dtype=torch.float64) * 5 + 1  # (B, T, N)
    pred = obs + 0.7 * torch.randn(obs.shape, generator=g, dtype=torch.float64)
    obs[0, 3, 2] = obs[2, 10:20, 4] = float("nan")  # missing observations
    mask = torch.rand(obs.shape, generator=g) > 0.1
    got = metrics.per_basin(pred.to(dtype), obs.to(dtype), mask, time_dim=1)
    p64 = pred.to(dtype).double().transpose(0, 1).reshape(-1, 7).numpy()
    o64 = obs.to(dtype).double().transpose(0, 1).reshape(-1, 7).numpy()
    m = mask.transpose(0, 1).reshape(-1, 7).numpy()
    for n in range(7):
        o = np.where(m[:, n], o64[:, n], np.nan)
        want = numpy_metrics(p64[:, n], o)
        for name, value in want.items():
            assert float(got[name][n]) == pytest.approx(value, rel=1e-9, abs=1e-12), (name, n)
        assert int(got["count"][n]) == int(np.isfinite(o).sum())


def test_reference_values():
    o = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    perfect = metrics.per_basin(o, o)
    assert float(perfect["nse"]) == 1.0 and float(perfect["kge"]) == 1.0
    assert float(perfect["rmse"]) == 0.0 and float(perfect["r2"]) == 1.0
    mean = metrics.per_basin(torch.full_like(o, 2.5), o)
    assert float(mean["nse"]) == 0.0  # the observed mean scores exactly 0
    assert float(mean["r2"]) == 0.0 and math.isfinite(float(mean["kge"]))
    double = metrics.per_basin(2 * o, o)  # r = 1, alpha = 2, beta = 2
    assert float(double["kge"]) == pytest.approx(1 - math.sqrt(2))


def test_degenerate_basins_are_nan_and_left_out_of_aggregates():
    obs = torch.tensor([[1.0, 3.0, 1.0], [2.0, 3.0, float("nan")], [4.0, 3.0, float("nan")]])
    pred = torch.tensor([[1.5, 3.0, 1.0], [2.5, 2.0, 0.0], [3.0, 4.0, 0.0]])
    got = metrics.per_basin(pred, obs)
    assert math.isfinite(float(got["nse"][0]))
    assert math.isnan(float(got["nse"][1]))  # constant observations: no variance
    assert math.isnan(float(got["nse"][2])) and math.isnan(float(got["kge"][2]))  # 1 entry
    assert float(got["rmse"][2]) == 0.0  # rmse needs one entry only
    summary = metrics.evaluate(pred, obs)
    assert summary["nse_basins"] == 1 and summary["nse_median"] == float(got["nse"][0])
    assert summary["rmse_basins"] == 3
    assert summary["valid"] == 7 and summary["missing"] == 2


def test_all_missing_basin_and_bad_shapes():
    obs = torch.full((5, 2), float("nan"))
    got = metrics.per_basin(torch.zeros(5, 2), obs)
    assert all(math.isnan(float(got[k][0])) for k in metrics.METRICS)
    assert math.isnan(metrics.evaluate(torch.zeros(5, 2), obs)["nse_median"])
    with pytest.raises(ValueError, match=r"pred \(5, 2\) and obs \(5, 3\) must match"):
        metrics.per_basin(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="must not be the basin"):
        metrics.per_basin(torch.zeros(5, 2), torch.zeros(5, 2), time_dim=-1)


# ---------------------------------------------------------------------------------------
# Panel forecasts: point scores, CRPS, coverage, NLL (references: numpy loops, numerical
# integration, brute-force sums over the integers, torch.distributions)
# ---------------------------------------------------------------------------------------

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _count_pmf(dist, p, support):
    """pmf [support, *S] from torch.distributions (independent of fastcore.losses)."""
    k = torch.arange(support, dtype=F64).reshape(-1, *([1] * next(iter(p.values())).dim()))
    if dist == "poisson":
        return torch.distributions.Poisson(p["log_rate"].exp()).log_prob(k).exp()
    nb = (
        torch.distributions.NegativeBinomial(
            total_count=p["log_theta"].exp(), logits=p["log_mu"] - p["log_theta"]
        )
        .log_prob(k)
        .exp()
    )
    if dist == "nb":
        return nb
    pi = torch.sigmoid(p["pi_logits"])
    return (1 - pi) * nb + pi * (k == 0)


def _count_params(dist, n, seed):
    g = _gen(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)  # noqa: E731
    if dist == "poisson":
        return {"log_rate": u(-2, 3.5)}
    p = {"log_mu": u(-2, 3.5), "log_theta": u(-1, 3)}
    if dist == "zinb":
        p["pi_logits"] = u(-2, 2)
    return p


def test_point_scores_match_numpy_per_node_and_overall():
    g = _gen(30)
    obs = torch.rand(6, 4, 5, 2, generator=g, dtype=F64) * 10  # [B, H, N, C]
    pred = obs + torch.randn(obs.shape, generator=g, dtype=F64)
    obs[0, 1, 3, 0] = obs[2, :, 1, 1] = float("nan")
    mask = torch.rand(obs.shape, generator=g) > 0.1
    out = metrics.point_scores(pred, obs, mask)
    keep = np.isfinite(obs.numpy()) & mask.numpy()
    err = (pred - obs).numpy()
    assert float(out["mae"]) == pytest.approx(np.abs(err[keep]).mean(), rel=1e-12)
    assert float(out["rmse"]) == pytest.approx(math.sqrt((err[keep] ** 2).mean()), rel=1e-12)
    for node in range(5):
        k, e = keep[:, :, node], err[:, :, node]
        assert float(out["mae_node"][node]) == pytest.approx(np.abs(e[k]).mean(), rel=1e-12)
        assert float(out["rmse_node"][node]) == pytest.approx(
            math.sqrt((e[k] ** 2).mean()), rel=1e-12
        )
        assert int(out["count_node"][node]) == int(k.sum())
    none = torch.zeros_like(mask)
    empty = metrics.point_scores(pred, obs, none)
    assert math.isnan(float(empty["mae"])) and bool(torch.isnan(empty["rmse_node"]).all())
    bad = pred.clone()
    bad[1, 0, 0, 0] = float("nan")  # a broken prediction is not hidden
    assert math.isnan(float(metrics.point_scores(bad, obs)["mae"]))


def test_crps_gaussian_equals_numerical_integration():
    loc = torch.tensor([0.0, 1.5, -2.0, 0.3], dtype=F64)
    scale = torch.tensor([1.0, 0.5, 3.0, 0.05], dtype=F64)
    obs = torch.tensor([0.0, 3.0, -2.5, 0.29], dtype=F64)
    ours = metrics.crps("gaussian", {"loc": loc, "scale": scale}, obs, reduction="none")
    for i in range(4):
        normal = torch.distributions.Normal(loc[i], scale[i])
        lo = min(float(loc[i] - 12 * scale[i]), float(obs[i]) - 1)
        hi = max(float(loc[i] + 12 * scale[i]), float(obs[i]) + 1)
        # Split at the jump of 1{y <= x}, so the trapezoid rule is second order on both sides.
        below = torch.linspace(lo, float(obs[i]), 200001, dtype=F64)
        above = torch.linspace(float(obs[i]), hi, 200001, dtype=F64)
        integral = torch.trapezoid(normal.cdf(below) ** 2, below) + torch.trapezoid(
            (1 - normal.cdf(above)) ** 2, above
        )
        assert float(ours[i]) == pytest.approx(float(integral), rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("dist", ["poisson", "nb", "zinb"])
def test_crps_counts_equal_brute_force_sums(dist):
    p = _count_params(dist, 60, seed=31)
    obs = torch.randint(0, 25, (60,), generator=_gen(32)).double()
    obs[::7] = 0
    ours = metrics.crps(dist, p, obs, reduction="none")
    pmf = _count_pmf(dist, p, 30000)
    k = torch.arange(30000, dtype=F64)[:, None]
    # The integral of (F - 1{y <= x})^2 over the integer steps ...
    cdf = pmf.cumsum(0)
    by_cdf = ((cdf - (k >= obs).double()) ** 2).sum(0)
    torch.testing.assert_close(ours, by_cdf, rtol=1e-9, atol=1e-9)
    # ... and the energy form E|X - y| - E|X - X'| / 2, by a double sum over the support
    # (truncated at 400, where the pmf of these parameters has no mass left to matter).
    small = pmf[:400]
    kk = k[:400]
    e_abs = (small * (kk - obs).abs()).sum(0)
    pair = (kk - kk.T).abs()  # [400, 400]
    e_pair = torch.einsum("is,ij,js->s", small, pair, small)
    tail = 1 - small.sum(0)
    energy = e_abs - e_pair / 2
    close = tail < 1e-12
    assert int(close.sum()) >= 30
    torch.testing.assert_close(ours[close], energy[close], rtol=1e-7, atol=1e-9)


def test_crps_of_point_mass_is_absolute_error_and_masks():
    # Poisson with a vanishing rate is a point mass at 0: CRPS = |y - 0|.
    p = {"log_rate": torch.full((4,), -60.0, dtype=F64)}
    obs = torch.tensor([0.0, 1.0, 5.0, float("nan")], dtype=F64)
    out = metrics.crps("poisson", p, obs, reduction="none")
    torch.testing.assert_close(
        out[:3], torch.tensor([0.0, 1.0, 5.0], dtype=F64), atol=1e-12, rtol=0
    )
    assert math.isnan(float(out[3]))
    assert float(metrics.crps("poisson", p, obs)) == pytest.approx(2.0)
    mask = torch.tensor([True, False, True, True])
    assert float(metrics.crps("poisson", p, obs, mask)) == pytest.approx(2.5)
    per_node = metrics.crps(
        "poisson",
        {"log_rate": torch.full((2, 2), -60.0)},
        torch.tensor([[0.0, 3.0], [2.0, float("nan")]]),
        node_dim=-1,
    )
    assert per_node.tolist() == pytest.approx([1.0, 3.0])
    nan_param = {"log_rate": torch.tensor([float("nan"), 0.0])}
    assert math.isnan(float(metrics.crps("poisson", nan_param, torch.tensor([1.0, 1.0]))))


def test_crps_max_count_warns():
    p = {"log_rate": torch.tensor([math.log(500.0)])}
    with pytest.warns(RuntimeWarning, match="cut at max_count=100"):
        metrics.crps("poisson", p, torch.tensor([480.0]), max_count=100)


@pytest.mark.parametrize("fair", [True, False])
def test_crps_samples_equals_the_quadratic_formula(fair):
    g = _gen(33)
    samples = torch.randn(9, 5, 3, generator=g, dtype=F64)
    obs = torch.randn(5, 3, generator=g, dtype=F64)
    ours = metrics.crps_samples(samples, obs, reduction="none", fair=fair)
    m = samples.shape[0]
    e_abs = (samples - obs).abs().mean(0)
    pair = (samples[:, None] - samples[None, :]).abs().sum((0, 1))  # sum over i != j (i = j is 0)
    spread = pair / (2 * m * (m - 1)) if fair else pair / (2 * m * m)
    torch.testing.assert_close(ours, e_abs - spread, rtol=1e-12, atol=1e-12)


def test_crps_samples_converges_to_the_closed_forms():
    g = _gen(34)
    loc, scale = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
    obs = torch.tensor([1.2, 2.0], dtype=F64)
    draws = loc + scale * torch.randn(20000, 2, generator=g, dtype=F64)
    est = metrics.crps_samples(draws, obs, reduction="none")
    exact = metrics.crps_gaussian(loc, scale, obs)
    torch.testing.assert_close(est, exact, rtol=0.02, atol=0)
    rate = torch.tensor([3.0, 7.0], dtype=F64)
    counts = torch.poisson(rate.expand(20000, 2).contiguous(), generator=g)
    est = metrics.crps_samples(counts, torch.tensor([1.0, 9.0], dtype=F64), reduction="none")
    exact = metrics.crps(
        "poisson", {"log_rate": rate.log()}, torch.tensor([1.0, 9.0]), reduction="none"
    )
    torch.testing.assert_close(est, exact, rtol=0.02, atol=0)


def test_coverage_of_a_calibrated_forecast():
    g = _gen(35)
    n = 20000
    loc = torch.randn(n, generator=g, dtype=F64)
    scale = 0.5 + torch.rand(n, generator=g, dtype=F64)
    obs = loc + scale * torch.randn(n, generator=g, dtype=F64)
    out = metrics.interval_scores("gaussian", {"loc": loc, "scale": scale}, obs, levels=(0.5, 0.9))
    for level in (0.5, 0.9):
        assert float(out[level]["coverage"]) == pytest.approx(level, abs=0.015)
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2, dtype=F64))
        assert float(out[level]["width"]) == pytest.approx(float((2 * z * scale).mean()), rel=1e-9)
    # Counts drawn from the forecast distribution: coverage at least the level.
    rate = 0.2 + 6 * torch.rand(n, generator=g, dtype=F64)
    y = torch.poisson(rate, generator=g)
    p = {"log_rate": rate.log()}
    scores = metrics.interval_scores("poisson", p, y, levels=(0.5, 0.8, 0.95))
    for level, s in scores.items():
        lo = metrics.distribution_quantile("poisson", p, (1 - level) / 2)
        hi = metrics.distribution_quantile("poisson", p, (1 + level) / 2)
        pmf = _count_pmf("poisson", p, 200)
        k = torch.arange(200, dtype=F64)[:, None]
        inside_prob = (pmf * ((k >= lo) & (k <= hi))).sum(0).mean()
        assert float(inside_prob) >= level - 1e-9  # integer ends: conservative by construction
        assert float(s["coverage"]) == pytest.approx(float(inside_prob), abs=0.012)
        assert float(s["width"]) == pytest.approx(float((hi - lo).mean()), rel=1e-12)


def test_interval_coverage_per_node_and_masks():
    lower = torch.zeros(3, 2)
    upper = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    obs = torch.tensor([[0.5, 3.0], [2.0, 1.0], [float("nan"), 2.0]])
    out = metrics.interval_coverage(lower, upper, obs, node_dim=-1)
    assert out["coverage"].tolist() == [0.5, pytest.approx(2 / 3)]
    assert out["width"].tolist() == [1.0, 2.0] and out["count"].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dist", ["gaussian", "poisson", "nb", "zinb"])
def test_mean_nll_is_the_losses_likelihood(dist):
    if dist == "gaussian":
        p = {"loc": torch.randn(30, dtype=F64), "scale": torch.rand(30, dtype=F64) + 0.2}
        obs = torch.randn(30, dtype=F64)
    else:
        p = _count_params(dist, 30, seed=36)
        obs = torch.randint(0, 12, (30,), generator=_gen(37)).double()
    obs[4] = float("nan")
    got = metrics.mean_nll(dist, p, obs)
    ref = -metrics.log_prob(dist, p, obs.nan_to_num(0.0))
    assert float(got) == pytest.approx(float(ref[torch.isfinite(obs)].mean()), rel=1e-12)
    if dist != "gaussian":
        pmf = _count_pmf(dist, p, 50)
        k = obs.nan_to_num(0).long()
        by_pmf = -pmf.gather(0, k[None]).log()[0]
        assert float(got) == pytest.approx(float(by_pmf[torch.isfinite(obs)].mean()), rel=1e-9)


def test_distribution_metric_errors():
    p = {"log_rate": torch.zeros(2)}
    with pytest.raises(
        ValueError, match="dist must be one of 'gaussian', 'poisson', 'nb', 'zinb', got 'binomial'"
    ):
        metrics.crps("binomial", p, torch.zeros(2))
    with pytest.raises(
        ValueError, match="'nb' needs parameters log_mu, log_theta; params has log_rate"
    ):
        metrics.mean_nll("nb", p, torch.zeros(2))
    with pytest.raises(ValueError, match="q must lie strictly between 0 and 1"):
        metrics.distribution_quantile("poisson", p, 0.0)
    with pytest.raises(ValueError, match=r"samples must be \[m, \*obs.shape\]"):
        metrics.crps_samples(torch.zeros(4, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="needs m >= 2 samples, got 1"):
        metrics.crps_samples(torch.zeros(1, 2), torch.zeros(2))
    with pytest.raises(
        ValueError, match=r"interval levels must lie strictly between 0 and 1, got 1\.5"
    ):
        metrics.interval_scores("poisson", p, torch.zeros(2), levels=(1.5,))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        metrics.point_scores(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="node_dim 3 is out of range"):
        metrics.point_scores(torch.zeros(2, 2), torch.zeros(2, 2), node_dim=3)
