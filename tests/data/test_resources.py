"""Synthetic resource curves (fastcore.data.resources): the resource table, determinism by
seed and index, lengths, trend types, noise, spikes (count, depth, length, margins), bounds
and the step-change limit over 2,000 curves, and the validator catching each kind of
violation on hand-broken curves."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from fastcore.data.resources import (
    DT,
    RESOURCES,
    TREND_TYPES,
    CurveValidationError,
    ResourceCurve,
    ResourceCurveSynthesizer,
    Spike,
    check_curve,
    validate_curve,
)

N_CURVES = 2000
# The specification, written out independently of the module: (lo, hi, unit, step floor).
SPEC = {
    "cpu_cores": (0.0, 128.0, "cores", 8.0),
    "cpu_mem": (0.0, 512.0, "GB", 32.0),
    "gpu_sm": (0.0, 100.0, "%", 10.0),
    "gpu_mem": (0.0, 80.0, "GB", 8.0),
}
NAMES = tuple(SPEC)


@pytest.fixture(scope="module")
def curves() -> list[ResourceCurve]:
    synth = ResourceCurveSynthesizer(seed=7)
    return [synth.sample(i) for i in range(N_CURVES)]


def _same(a: ResourceCurve, b: ResourceCurve) -> bool:
    return (
        a.values.shape == b.values.shape
        and np.array_equal(a.values, b.values)
        and np.array_equal(a.base, b.base)
        and a.trend == b.trend
        and a.spikes == b.spikes
    )


def _spike_steps(curve: ResourceCurve, r: int) -> np.ndarray:
    mask = np.zeros(curve.values.shape[0], dtype=bool)
    for s in curve.spikes[r]:
        mask[s.start : s.start + s.length] = True
    return mask


# ----------------------------------------------------------------------------- table, keys
def test_resource_table_matches_the_specification():
    assert tuple(r.name for r in RESOURCES) == NAMES
    for res in RESOURCES:
        lo, hi, unit, floor = SPEC[res.name]
        assert (res.lo, res.hi, res.unit, res.step_floor) == (lo, hi, unit, floor)
        assert lo <= res.typical[0] < res.typical[1] <= hi
        with pytest.raises(dataclasses.FrozenInstanceError):
            res.hi = 1.0  # type: ignore[misc]


def test_same_seed_and_index_give_the_same_curve_in_any_order():
    a, b = ResourceCurveSynthesizer(3), ResourceCurveSynthesizer(3)
    forward = [a.sample(i) for i in range(6)]
    backward = [b.sample(i) for i in reversed(range(6))][::-1]
    assert all(_same(x, y) for x, y in zip(forward, backward, strict=True))
    assert _same(a.sample(4), forward[4])


def test_index_stream_is_default_rng_of_seed_and_index():
    synth = ResourceCurveSynthesizer(11)
    assert _same(synth.sample(5), synth.sample(np.random.default_rng((11, 5))))
    assert _same(synth.sample(np.int64(5)), synth.sample(5))


def test_other_index_or_seed_gives_another_curve():
    a = ResourceCurveSynthesizer(3)
    first = a.sample(0)
    assert not any(_same(first, a.sample(i)) for i in range(1, 20))
    assert not _same(first, ResourceCurveSynthesizer(4).sample(0))


@pytest.mark.parametrize("key", [-1, True, 1.5, "3"])
def test_bad_keys_are_rejected(key):
    with pytest.raises(ValueError, match="key"):
        ResourceCurveSynthesizer(0).sample(key)


@pytest.mark.parametrize("seed", [-1, 2.0, None])
def test_bad_seeds_are_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        ResourceCurveSynthesizer(seed)


# ----------------------------------------------------------------------------- curve shape
def test_shapes_dtype_dt_and_time_axis(curves):
    for c in curves[:50]:
        T = c.values.shape[0]
        assert c.values.shape == c.base.shape == (T, 4)
        assert c.values.dtype == c.base.dtype == np.float32
        assert c.dt == pytest.approx(0.1)
        assert np.allclose(c.times, np.arange(T) * 0.1)
        assert np.array_equal(c.column("gpu_sm"), c.values[:, 2].astype(np.float64))
        assert np.allclose(c.free("gpu_mem"), 80.0 - c.values[:, 3])


def test_lengths_cover_20_to_100_uniformly(curves):
    counts = Counter(c.values.shape[0] for c in curves)
    assert set(counts) == set(range(20, 101))  # every length occurs, none outside
    assert max(counts.values()) < 3 * N_CURVES / 81  # no length dominates


def test_every_trend_type_occurs_for_every_resource(curves):
    for r, name in enumerate(NAMES):
        counts = Counter(c.trend[r] for c in curves)
        assert set(counts) == set(TREND_TYPES), name
        assert min(counts.values()) > 0.1 * N_CURVES, (name, counts)


def test_noise_is_present_and_gaussian_sized(curves):
    stds = {name: [] for name in NAMES}
    for c in curves[:300]:
        for r, name in enumerate(NAMES):
            resid = (c.values[:, r] - c.base[:, r]).astype(np.float64)[~_spike_steps(c, r)]
            assert resid.std() > 0 and (resid > 0).any() and (resid < 0).any(), name
            stds[name].append(resid.std())
    for res in RESOURCES:
        typical_span = res.typical[1] - res.typical[0]
        median = np.median(stds[res.name]) / typical_span
        assert 0.004 < median < 0.025, (res.name, median)  # 0.5-2% of the typical range


# ----------------------------------------------------------------------------- spikes
def test_spikes_count_length_depth_and_margins(curves):
    counts, lengths = Counter(), Counter()
    for c in curves:
        T = c.values.shape[0]
        for r in range(4):
            counts[len(c.spikes[r])] += 1
            for s in c.spikes[r]:
                lengths[s.length] += 1
                steps = np.arange(s.start, s.start + s.length)
                ratio = c.values[steps, r].astype(np.float64) / c.base[steps, r]
                assert np.all((ratio >= 0.2 - 1e-5) & (ratio <= 0.5 + 1e-5)), (s, ratio)
                assert np.allclose(ratio, s.depth, rtol=1e-5)
                # outside the first and last 10% of the curve
                assert steps[0] >= 0.1 * T and steps[-1] + 1 <= 0.9 * T + 1e-9, (T, s)
            starts = sorted(s.start for s in c.spikes[r])
            assert len(set(starts)) == len(starts)
    assert set(counts) == {1, 2, 3}
    assert set(lengths) == {1, 2, 3, 4, 5}


def test_spike_entries_are_real_drops(curves):
    """Most entries break the step limit: the exemption is what lets them through."""
    entries = big = 0
    for c in curves[:300]:
        for r, name in enumerate(NAMES):
            floor = SPEC[name][3]
            for s in c.spikes[r]:
                before, inside = float(c.values[s.start - 1, r]), float(c.values[s.start, r])
                entries += 1
                big += before - inside > 0.5 * max(abs(before), floor)
    assert big > 0.5 * entries


# ----------------------------------------------------------------------------- validity
def test_bounds_and_step_limit_hold_over_2000_curves(curves):
    for r, name in enumerate(NAMES):
        lo, hi, _, floor = SPEC[name]
        allv = np.concatenate([c.values[:, r] for c in curves])
        assert allv.min() >= lo and allv.max() <= hi, name
        for c in curves:
            x = c.values[:, r].astype(np.float64)
            exempt = np.zeros(len(x) - 1, dtype=bool)
            for s in c.spikes[r]:
                exempt[s.start - 1] = exempt[s.start + s.length - 1] = True
            change = np.abs(np.diff(x))
            limit = 0.5 * np.maximum(np.abs(x[:-1]), floor)
            assert np.all((change <= limit * (1 + 1e-5) + 1e-4) | exempt), name


def test_validator_accepts_every_generated_curve(curves):
    assert [(i, p) for i, c in enumerate(curves) for p in validate_curve(c)] == []
    assert check_curve(curves[0]) is curves[0]


# ----------------------------------------------------------------------------- validator
@pytest.fixture(scope="module")
def victim() -> ResourceCurve:
    """A valid curve of 60+ steps whose GPU SM has a deep spike (depth <= 0.35)."""
    synth = ResourceCurveSynthesizer(0)
    for i in range(500):
        c = synth.sample(i)
        if c.values.shape[0] >= 60 and any(s.depth <= 0.35 for s in c.spikes[2]):
            return c
    raise AssertionError("no suitable curve")


def _copy(curve: ResourceCurve, **changes) -> ResourceCurve:
    fields = {"values": curve.values.copy(), "base": curve.base.copy(), **changes}
    return dataclasses.replace(curve, **fields)


def _normal_step(curve: ResourceCurve, r: int) -> int:
    """A step t with t-1 .. t+2 outside spikes."""
    spiky = _spike_steps(curve, r)
    for t in range(1, curve.values.shape[0] - 2):
        if not spiky[t - 1 : t + 3].any():
            return t
    raise AssertionError("no normal step")


def _problems(curve: ResourceCurve) -> str:
    problems = validate_curve(curve)
    with pytest.raises(CurveValidationError) as err:
        check_curve(curve)
    assert err.value.problems == problems
    return "\n".join(problems)


def test_validator_catches_out_of_bounds_values(victim):
    bad = _copy(victim)
    t = _normal_step(victim, 2)
    bad.values[t, 2] = 130.0
    bad.values[t + 1, 0] = -5.0
    bad.base[t, 3] = 95.0
    text = _problems(bad)
    assert f"gpu_sm: step {t}: value 130 % outside the bounds [0, 100]" in text
    assert f"cpu_cores: step {t + 1}: value -5 cores outside" in text
    assert f"gpu_mem: step {t}: base value 95 GB outside" in text


def test_validator_catches_nan(victim):
    bad = _copy(victim)
    bad.values[3, 1] = np.nan
    assert "cpu_mem: step 3: value nan GB outside" in _problems(bad)


def test_validator_catches_step_changes(victim):
    bad = _copy(victim)
    t = _normal_step(victim, 1)
    x = float(bad.values[t, 1])
    jump = 0.75 * max(x, 32.0)
    bad.values[t + 1, 1] = x + jump if x + jump <= 512 else x - jump
    assert f"cpu_mem: step {t} -> {t + 1}: value {x:.6g} ->" in _problems(bad)


def test_validator_flags_an_unrecorded_spike(victim):
    r = 2
    spike = next(s for s in victim.spikes[r] if s.depth <= 0.35)
    before, inside = float(victim.values[spike.start - 1, r]), float(victim.values[spike.start, r])
    assert before - inside > 0.5 * max(before, 10.0)  # the entry breaks the step limit
    others = tuple(s for s in victim.spikes[r] if s != spike)
    spikes = tuple(others if i == r else sp for i, sp in enumerate(victim.spikes))
    text = _problems(_copy(victim, spikes=spikes))
    assert f"gpu_sm: step {spike.start - 1} -> {spike.start}:" in text


def _with_spike(curve: ResourceCurve, r: int, spike: Spike, replace_all: bool = True):
    """``curve`` with resource ``r``'s spikes replaced by (or extended with) ``spike``."""
    bad = _copy(curve)
    end = spike.start + spike.length
    bad.values[spike.start : end, r] = spike.depth * bad.base[spike.start : end, r]
    own = (spike,) if replace_all else (*curve.spikes[r], spike)
    spikes = tuple(own if i == r else sp for i, sp in enumerate(curve.spikes))
    return dataclasses.replace(bad, spikes=spikes)


def test_validator_catches_bad_spike_depth_length_margin(victim):
    mid = victim.values.shape[0] // 2
    text = _problems(_with_spike(victim, 3, Spike(mid, 2, 0.7)))
    assert f"gpu_mem: spike at step {mid} (length 2, depth 0.7): depth 0.7 outside" in text
    text = _problems(_with_spike(victim, 3, Spike(mid, 2, 0.1)))
    assert "depth 0.1 outside [0.2, 0.5]" in text
    text = _problems(_with_spike(victim, 3, Spike(mid, 6, 0.3)))
    assert f"gpu_mem: spike at step {mid} (length 6, depth 0.3): length 6 outside 1-5" in text
    text = _problems(_with_spike(victim, 0, Spike(1, 2, 0.3)))
    assert "cpu_cores: spike at step 1 (length 2, depth 0.3): steps 1..2 reach into the" in text
    T = victim.values.shape[0]
    text = _problems(_with_spike(victim, 0, Spike(T - 3, 2, 0.3)))
    assert f"steps {T - 3}..{T - 2} reach into the" in text


def test_validator_catches_spike_count_and_gap(victim):
    none = tuple(() if i == 1 else sp for i, sp in enumerate(victim.spikes))
    assert "cpu_mem: 0 spikes, expected 1-3" in _problems(_copy(victim, spikes=none))
    mid = victim.values.shape[0] // 2
    four = tuple(Spike(mid - 12 + 4 * k, 1, 0.3) for k in range(4))
    bad = victim
    for s in four:
        bad = _with_spike(bad, 1, s, replace_all=s is four[0])
    assert "cpu_mem: 4 spikes, expected 1-3" in _problems(bad)
    bad = _with_spike(_with_spike(victim, 1, Spike(mid, 2, 0.3)), 1, Spike(mid + 3, 1, 0.3), False)
    assert f"spike at step {mid + 3} (length 1, depth 0.3): only 1 normal steps" in _problems(bad)


def test_validator_catches_spike_values_off_the_depth(victim):
    r = 2
    spike = victim.spikes[r][0]
    bad = _copy(victim)
    bad.values[spike.start, r] = bad.base[spike.start, r]
    assert f"gpu_sm: step {spike.start}: spike value" in _problems(bad)


def test_validator_catches_length_dt_trend_and_shape(victim):
    short = 15
    cut = _copy(victim, values=victim.values[:short].copy(), base=victim.base[:short].copy())
    assert f"T = {short} steps, expected 20-100" in _problems(cut)
    long = _copy(victim, values=np.tile(victim.values, (2, 1)), base=np.tile(victim.base, (2, 1)))
    assert f"T = {2 * victim.values.shape[0]} steps" in _problems(long)
    assert "dt = 0.2 s, expected 0.1 s" in _problems(_copy(victim, dt=0.2))
    trend = ("linear", "zigzag", *victim.trend[2:])
    assert "cpu_mem: unknown trend type 'zigzag'" in _problems(_copy(victim, trend=trend))
    flat = _copy(victim, values=victim.values[:, :3].copy())
    assert "expected shape [T, 4]" in _problems(flat)
    assert validate_curve(_copy(victim)) == []  # the copies themselves are valid
    assert victim.dt == DT and math.isclose(DT, 0.1)
