"""The conceptual hydrological simulation: mass balance, stores, routing, gaps, aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from fastcore.data import hydrology
from fastcore.data.hydrology import (
    Forcings,
    HydroParams,
    extraterrestrial_radiation,
    make_forcings,
    oudin_pet,
    route_runoff,
    simulate,
    triangular_weights,
)
from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.synthetic import downstream_index, synthetic_network

STORES = ("snow", "soil", "upper", "lower")


@pytest.fixture(scope="module")
def network() -> BasinNetwork:
    return synthetic_network(80, seed=4, max_elevation_m=3000.0)


@pytest.fixture(scope="module")
def result(network):
    return simulate(network, 3 * 365, seed=1, store_states=True)


def chain_network(lengths_km: list[float], area_km2: float = 100.0) -> BasinNetwork:
    """Basins 0 -> 1 -> ... -> n-1 (the outlet), one level."""
    n = len(lengths_km) + 1
    edges = np.stack([np.arange(n - 1), np.arange(1, n)]).astype(np.int64)
    area = np.full(n, area_km2)
    level = BasinLevel(
        name="fine",
        basin_id=np.arange(n, dtype=np.int64),
        area_km2=area,
        elevation_m=np.linspace(500.0, 100.0, n),
        lat=np.full(n, 50.0),
        lon=np.linspace(7.0, 8.0, n),
        upstream_area_km2=np.cumsum(area),
        parent=np.full(n, -1, np.int64),
        river_edges=edges,
        edge_length_km=np.asarray(lengths_km, np.float64),
        edge_slope=np.full(n - 1, 1e-3),
        edge_upstream_area_km2=np.cumsum(area)[:-1],
    )
    return BasinNetwork("chain", [level])


def _centroid(q: np.ndarray) -> float:
    t = np.arange(q.shape[0])
    return float((q * t).sum() / q.sum())


def _path_to_outlet(down: np.ndarray, start: int) -> list[int]:
    path = [start]
    while down[path[-1]] >= 0:
        path.append(int(down[path[-1]]))
    return path


# ----------------------------------------------------------------------------- balance


def test_water_balance_closes(result):
    assert abs(result.water_balance()) < 1e-9
    terms = result.balance_terms()
    assert terms["precip"] > 0 and terms["et"] > 0 and terms["outflow"] > 0
    assert abs(terms["residual"]) < 1e-9 * terms["precip"]


def test_balance_terms_individually(result, network):
    area = network.levels[0].area_km2 * 1000.0
    # Stores: per basin, precipitation = ET + local runoff + change of the four stores.
    d_store = sum(result.final_storage[s] - result.initial_storage[s] for s in STORES)
    per_basin = result.precip.sum(0) - result.et.sum(0) - result.runoff.sum(0) - d_store
    np.testing.assert_allclose(per_basin, 0.0, atol=1e-9 * result.precip.sum(0).max())
    # Channels: outlet volume = all local runoff volume - change of channel storage.
    runoff_volume = float(result.runoff.sum(0) @ area)
    d_channel = float((result.final_storage["channel"] - result.initial_storage["channel"]).sum())
    outflow = float(result.outlet_discharge().sum() * 86400.0)
    assert outflow == pytest.approx(runoff_volume - d_channel, rel=1e-11)
    # The stored end-of-day states end at the final storage; channel series likewise.
    for s in STORES:
        np.testing.assert_array_equal(result.states[s][-1], result.final_storage[s])
    np.testing.assert_array_equal(result.channel[-1], result.final_storage["channel"])


def test_leaking_store_breaks_the_balance(network, monkeypatch):
    original = hydrology._hbv_day

    def leaky(state, precip, temp, pet, bp):
        out = original(state, precip, temp, pet, bp)
        state["lower"] *= 0.99  # water vanishes without a flux
        return out

    monkeypatch.setattr(hydrology, "_hbv_day", leaky)
    leaked = simulate(network, 365, seed=1, spinup_days=30)
    assert abs(leaked.water_balance()) > 1e-3


def test_tampered_result_breaks_the_balance(network):
    r = simulate(network, 200, seed=2, spinup_days=10)
    assert abs(r.water_balance()) < 1e-9
    r.et = r.et * 1.01
    assert abs(r.water_balance()) > 1e-4


def test_balance_closes_without_spinup_and_for_one_basin():
    r = simulate(synthetic_network(25, seed=9), 400, seed=3, spinup_days=0)
    assert abs(r.water_balance()) < 1e-9
    np.testing.assert_array_equal(r.initial_storage["channel"], 0.0)
    single = simulate(synthetic_network(1, seed=0), 100, seed=0, spinup_days=5)
    assert abs(single.water_balance()) < 1e-9
    np.testing.assert_allclose(single.discharge[:, 0], single.outlet_discharge())


# ----------------------------------------------------------------------------- properties


def test_deterministic_per_seed(network):
    a = simulate(network, 120, seed=5, spinup_days=20)
    b = simulate(network, 120, seed=5, spinup_days=20)
    c = simulate(network, 120, seed=6, spinup_days=20)
    for name in ("precip", "temp", "pet", "et", "runoff", "discharge"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.precip, c.precip)
    assert not np.array_equal(a.discharge, c.discharge)


def test_non_negative_and_finite(result):
    for name in ("precip", "pet", "et", "runoff", "discharge", "channel"):
        values = getattr(result, name)
        assert np.isfinite(values).all(), name
        assert (values >= 0).all(), name
    assert np.isfinite(result.temp).all()
    for s in STORES:
        assert (result.states[s] >= 0).all(), s
    assert (result.states["soil"] <= result.basin_params["fc"] * (1 + 1e-12)).all()
    assert (result.et <= result.pet + 1e-12).all()


def test_forcings_are_plausible(result, network):
    fine = network.levels[0]
    annual = result.precip.mean(0) * 365
    assert 300 < np.median(annual) < 3000
    wet = (result.precip > 0).mean()
    assert 0.25 < wet < 0.65
    # Lapse rate: a fit of the mean temperature on elevation and |latitude|.
    design = np.stack([np.ones(fine.num_basins), fine.elevation_m / 1000, np.abs(fine.lat)], axis=1)
    coef = np.linalg.lstsq(design, result.temp.mean(0), rcond=None)[0]
    assert coef[1] == pytest.approx(-6.5, abs=0.5)
    # Seasonal cycle: summer warmer and with more PET than winter.
    summer = (result.doy > 170) & (result.doy < 230)
    winter = (result.doy < 40) | (result.doy > 340)
    assert result.temp[summer].mean() > result.temp[winter].mean() + 10
    assert result.pet[summer].mean() > 3 * result.pet[winter].mean()


def test_precipitation_is_spatially_correlated():
    net = synthetic_network(150, seed=2)
    fine = net.levels[0]
    f = make_forcings(net, 730, seed=0)
    x = np.radians(fine.lon) * np.cos(np.radians(fine.lat.mean())) * 6371
    y = np.radians(fine.lat) * 6371
    dist = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    corr = np.corrcoef(f.precip.T)
    near = corr[(dist > 0) & (dist < 50)]
    far = corr[dist > 400]
    assert near.size and far.size
    assert near.mean() > 0.5
    assert near.mean() > far.mean() + 0.3


def test_extraterrestrial_radiation_matches_fao56_example():
    # FAO-56 example 8: 20 degrees S on 3 September (day 246): Ra = 32.2 MJ m-2 day-1.
    ra = extraterrestrial_radiation(np.array([-20.0]), np.array([246]))
    assert ra[0, 0] == pytest.approx(32.2, abs=0.1)
    # Oudin: 0 at or below -5 degC, Ra * (T + 5) / 245 above.
    pet = oudin_pet(np.array([[-6.0, 15.0]]), np.array([-20.0, -20.0]), np.array([246]))
    assert pet[0, 0] == 0.0
    assert pet[0, 1] == pytest.approx(ra[0, 0] * 20 / 245, rel=1e-12)


def test_snow_accumulates_in_winter_and_melts_in_spring(result, network):
    fine = network.levels[0]
    # The highest basin below 2000 m (higher up, the snow may outlast the summer).
    candidates = np.flatnonzero(fine.elevation_m < 2000.0)
    high = int(candidates[np.argmax(fine.elevation_m[candidates])])
    assert fine.elevation_m[high] > 1200.0
    low = int(np.argmin(fine.elevation_m))
    snow = result.states["snow"]
    doy = result.doy
    late_winter = snow[(doy >= 60) & (doy < 90), high].mean()
    summer = snow[(doy >= 200) & (doy < 260), high].mean()
    assert late_winter > 50.0
    assert summer < 0.2 * late_winter
    # Melt: snow falls from spring to summer on days warmer than TT.
    spring = (doy >= 90) & (doy < 200)
    d_snow = np.diff(snow[:, high])[spring[1:]]
    warm = result.temp[1:, high][spring[1:]] > result.params.tt_c
    assert (d_snow[warm] <= 1e-12).all()
    assert d_snow[warm].sum() < -100.0
    # The lowest, warmest basin holds far less snow.
    assert snow[:, low].mean() < 0.2 * snow[:, high].mean()


# ----------------------------------------------------------------------------- routing


def test_triangular_weights():
    np.testing.assert_array_equal(triangular_weights(0.0), [1.0])
    np.testing.assert_array_equal(triangular_weights(1.0), [1.0])
    w = triangular_weights(4.0)
    assert w.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(w, w[::-1])
    assert (triangular_weights(3.3) >= 0).all()
    with pytest.raises(ValueError, match="maxbas_days"):
        triangular_weights(-1.0)


@pytest.mark.parametrize("maxbas", [0.0, 3.0])
def test_pulse_travels_downstream_with_the_edge_travel_time(network, maxbas):
    params = HydroParams(maxbas_days=maxbas, channel_velocity_m_s=0.5)
    fine = network.levels[0]
    down = downstream_index(fine)
    depth = np.array([len(_path_to_outlet(down, i)) for i in range(fine.num_basins)])
    head = int(np.argmax(depth))
    path = _path_to_outlet(down, head)
    assert len(path) >= 4
    runoff = np.zeros((200, fine.num_basins))
    runoff[0, head] = 10.0
    q, channel = route_runoff(network, runoff, params)
    volume = 10.0 * fine.area_km2[head] * 1000.0
    tau = np.zeros(fine.num_basins)
    tau[fine.river_edges[0]] = fine.edge_length_km * 1000.0 / (0.5 * 86400.0)
    w = triangular_weights(maxbas)
    expected = float((np.arange(w.size) * w).sum())
    centroids = []
    for k, node in enumerate(path):
        if k:
            expected += tau[path[k - 1]]
        assert q[:, node].sum() * 86400.0 == pytest.approx(volume, rel=1e-12)
        centroids.append(_centroid(q[:, node]))
        assert centroids[-1] == pytest.approx(expected, rel=1e-9)
    assert (np.diff(centroids) > 0).all()
    # Off the path nothing flows; channels are empty once the pulse has left.
    off = np.setdiff1d(np.arange(fine.num_basins), path)
    assert np.abs(q[:, off]).max() == 0.0
    np.testing.assert_allclose(channel[-1], 0.0, atol=1e-9 * volume)
    assert (channel >= 0).all()


def test_lag_grows_with_edge_length():
    peaks, centroids = [], []
    for length in (20.0, 150.0, 400.0):
        net = chain_network([length])
        runoff = np.zeros((30, 2))
        runoff[0, 0] = 5.0
        q, _ = route_runoff(net, runoff, HydroParams(maxbas_days=0.0, channel_velocity_m_s=1.0))
        peaks.append(int(np.argmax(q[:, 1])))
        centroids.append(_centroid(q[:, 1]))
        assert centroids[-1] == pytest.approx(length * 1000 / 86400, rel=1e-9)
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]
    assert centroids == sorted(centroids)


def test_rain_pulse_in_a_headwater_arrives_later_downstream():
    net = chain_network([120.0, 160.0, 200.0])
    n, days = 4, 120
    zeros = np.zeros((days, n))
    doy = np.arange(days) % 365 + 150
    temp = np.full((days, n), 15.0)
    base = Forcings(doy=doy, precip=zeros, temp=temp, pet=zeros)
    rain = zeros.copy()
    rain[2, 0] = 80.0
    pulse = Forcings(doy=doy, precip=rain, temp=temp, pet=zeros)
    kw = {"seed": 0, "spinup_days": 0, "params": HydroParams(maxbas_days=2.0)}
    q0 = simulate(net, days, forcings=base, **kw).discharge
    q1 = simulate(net, days, forcings=pulse, **kw).discharge
    response = q1 - q0
    assert (response >= -1e-9).all()
    peaks = [int(np.argmax(response[:, i])) for i in range(n)]
    centroids = [_centroid(response[:60, i]) for i in range(n)]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]
    assert (np.diff(centroids) > 0).all()
    assert response[:2].max() == 0.0  # nothing before the rain


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_to_coarser_levels(result, network):
    fine = network.levels[0]
    down = downstream_index(fine)
    index = np.arange(fine.num_basins)
    for lv in network.levels[1:]:
        index = network.levels[network.levels.index(lv) - 1].parent[index]
        k = lv.num_basins
        q = result.aggregate("discharge", lv.name)
        p = result.aggregate("precip", lv.name)
        assert q.shape == p.shape == (result.days, k)
        leaves = (down < 0) | (index[np.maximum(down, 0)] != index)
        for c in range(k):
            outlet = np.flatnonzero(leaves & (index == c))
            assert outlet.size == 1
            np.testing.assert_array_equal(q[:, c], result.discharge[:, outlet[0]])
            members = np.flatnonzero(index == c)
            a = fine.area_km2[members]
            np.testing.assert_allclose(p[:, c], result.precip[:, members] @ a / a.sum(), rtol=1e-12)
    coarse = result.aggregate("discharge", "coarse")
    outlet_coarse = index[np.flatnonzero(down < 0)[0]]
    np.testing.assert_array_equal(coarse[:, outlet_coarse], result.outlet_discharge())
    np.testing.assert_array_equal(result.aggregate("temp", "fine"), result.temp)
    np.testing.assert_allclose(result.aggregate("snow", "medium").min(), 0.0, atol=1e-9)
    with pytest.raises(KeyError, match="no level"):
        result.aggregate("precip", "huge")
    with pytest.raises(ValueError, match="not a"):
        result.aggregate("nothing", "medium")


# ----------------------------------------------------------------------------- missing values


def test_missing_values_only_in_observed_copies(network):
    clean = simulate(network, 730, seed=3, spinup_days=30)
    gappy = simulate(
        network, 730, seed=3, spinup_days=30, missing_forcings=0.2, missing_discharge=0.3
    )
    for name in ("precip", "temp", "pet", "et", "runoff", "discharge"):
        np.testing.assert_array_equal(getattr(clean, name), getattr(gappy, name))
        assert not np.isnan(getattr(gappy, name)).any()
    for name, frac in (("precip", 0.2), ("temp", 0.2), ("pet", 0.2), ("discharge", 0.3)):
        obs = getattr(gappy, f"observed_{name}")
        true = getattr(gappy, name)
        missing = np.isnan(obs)
        assert missing.mean() == pytest.approx(frac, abs=0.03), name
        np.testing.assert_array_equal(obs[~missing], true[~missing])
        # Gaps, not isolated days: runs of missing days longer than 1 on average.
        starts = missing[1:] & ~missing[:-1]
        assert missing.sum() / max(starts.sum(), 1) > 2.0
        np.testing.assert_array_equal(getattr(clean, f"observed_{name}"), true)
    assert not np.array_equal(np.isnan(gappy.observed_precip), np.isnan(gappy.observed_temp))
    agg = gappy.aggregate("observed_precip", "medium")
    assert np.isfinite(agg).mean() > 0.9
    agg_q = gappy.aggregate("observed_discharge", "medium")
    assert np.isnan(agg_q).any()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fc": 0.0}, "fc"),
        ({"k2": 1.5}, "k2"),
        ({"wet_day_fraction": 1.0}, "wet_day_fraction"),
        ({"lp": 0.0}, "lp"),
        ({"channel_velocity_m_s": float("nan")}, "channel_velocity_m_s"),
    ],
)
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HydroParams(**kwargs)


def test_bad_simulation_arguments(network):
    with pytest.raises(ValueError, match="days"):
        simulate(network, 0, seed=0)
    with pytest.raises(ValueError, match="missing_discharge"):
        simulate(network, 10, seed=0, missing_discharge=0.95)
    n = network.levels[0].num_basins
    f = Forcings(np.arange(5) + 1, np.zeros((5, n)), np.zeros((5, n)), np.zeros((5, n)))
    with pytest.raises(ValueError, match="expected \\(10"):
        simulate(network, 10, seed=0, forcings=f)
    with pytest.raises(ValueError, match="negative"):
        Forcings(np.arange(2) + 1, -np.ones((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="runoff_mm"):
        route_runoff(network, np.zeros((4, n + 1)))
    bifurcating = chain_network([10.0, 10.0])
    lv = bifurcating.levels[0]
    lv = BasinLevel(
        **{
            **{
                f: getattr(lv, f)
                for f in ("name", "basin_id", "area_km2", "elevation_m", "lat", "lon")
            },
            "upstream_area_km2": lv.upstream_area_km2,
            "parent": lv.parent,
            "river_edges": np.array([[0, 0], [1, 2]]),
            "edge_length_km": lv.edge_length_km,
            "edge_slope": lv.edge_slope,
            "edge_upstream_area_km2": lv.edge_upstream_area_km2,
        }
    )
    with pytest.raises(ValueError, match="outgoing river edges"):
        simulate(BasinNetwork("bif", [lv]), 10, seed=0)
