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
