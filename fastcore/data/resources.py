"""Synthetic system-resource curves for the temporal encoder: CPU cores, CPU memory, GPU SM
utilisation and GPU memory sampled every 100 ms.

:class:`ResourceCurveSynthesizer` draws one :class:`ResourceCurve` (all four resources,
float32 ``[T, 4]``) per call, deterministic per ``(seed, index)`` so a data set of any size
(50k-200k curves) is generated lazily and reproducibly. How a curve is made:

* Length: ``T`` uniform in 20..100 steps, ``dt = 0.1`` s per step.
* Base (per resource, float64 then rounded to float32): one trend type from
  :data:`TREND_TYPES` inside the resource's typical operating range, then rate-limited (see
  below). ``linear``: straight line between two levels. ``exponential``: a convex or concave
  ``expm1`` curve between two levels. ``sinusoidal``: 0.5-2.5 cycles around a mean.
  ``step``: a staircase of 1-3 changes of at least 15% of the typical range.
  ``plateau_jump``: a flat low plateau for the first 40-80% of the curve, then one upward
  jump by 30-55% of the typical range.
* Noise: Gaussian, standard deviation 0.5-2% of the typical range (drawn per resource),
  clipped into the physical bounds ``[lo, hi]`` and rate-limited again.
* Spikes (policy: per resource, each resource independently): 1-3 downward spikes of 1-5
  steps. A spike sets ``values = depth * base`` on its steps (noise-free) with one depth in
  [0.2, 0.5] per spike: it drops to 20-50% of the pre-spike trend value. Spike steps lie in
  ``[m, T - m)`` with the margin ``m = ceil(T / 10)`` (:func:`margin_steps`), and two
  spikes of one resource have at least :data:`SPIKE_GAP` normal steps between them.
* Step-change limit: for every transition ``t -> t + 1`` of every resource,
  ``|x[t+1] - x[t]| <= 0.5 * max(|x[t]|, floor)`` with the resource's ``step_floor``
  (8 cores, 32 GB, 10 %, 8 GB), EXCEPT the spike entry ``(start - 1 -> start)`` and exit
  ``(start + length - 1 -> start + length)`` transitions of the recorded spikes. The
  generator clamps each step sequentially (only where a violation exists). Inside a spike
  the limit holds because the base obeys it and ``depth < 1``.

:func:`validate_curve` checks all of the above and names the resource, step and value of
each violation; :func:`check_curve` raises :class:`CurveValidationError` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "DT",
    "MAX_STEPS",
    "MIN_STEPS",
    "RESOURCES",
    "RESOURCE_NAMES",
    "SPIKES_PER_RESOURCE",
    "SPIKE_DEPTH",
    "SPIKE_GAP",
    "SPIKE_LENGTH",
    "STEP_LIMIT",
    "TREND_TYPES",
    "CurveValidationError",
    "Resource",
    "ResourceCurve",
    "ResourceCurveSynthesizer",
    "Spike",
    "check_curve",
    "margin_steps",
    "resource_index",
    "validate_curve",
]

DT = 0.1  # seconds per step
MIN_STEPS, MAX_STEPS = 20, 100
STEP_LIMIT = 0.5  # max relative change per step, relative to max(|x[t]|, step_floor)
SPIKES_PER_RESOURCE = (1, 3)
SPIKE_LENGTH = (1, 5)  # steps
SPIKE_DEPTH = (0.2, 0.5)  # fraction of the base (trend) value kept during a spike
SPIKE_GAP = 2  # minimum normal steps between two spikes of one resource
NOISE_FRACTION = (0.005, 0.02)  # noise std as a fraction of the typical range
TREND_TYPES = ("linear", "exponential", "sinusoidal", "step", "plateau_jump")
_REL_TOL = 1e-5  # validation tolerance as a fraction of the bound span (float32 rounding)


@dataclass(frozen=True)
class Resource:
    """One monitored resource.

    ``name`` is the identifier (``"gpu_mem"``), ``label`` the display name, ``unit`` the
    unit of ``lo``/``hi`` (physical bounds), ``typical`` the ``(low, high)`` operating range
    trends are drawn in and ``step_floor`` the floor of the step-change limit (same unit).
    """

    name: str
    label: str
    unit: str
    lo: float
    hi: float
    typical: tuple[float, float]
    step_floor: float

    def __post_init__(self) -> None:
        t_lo, t_hi = self.typical
        if not (self.lo <= t_lo < t_hi <= self.hi) or self.step_floor <= 0:
            raise ValueError(
                f"resource {self.name!r}: need lo <= typical low < typical high <= hi and "
                f"step_floor > 0, got bounds [{self.lo}, {self.hi}], typical {self.typical}, "
                f"step_floor {self.step_floor}"
            )

    @property
    def span(self) -> float:
        """``hi - lo`` in the resource's unit."""
        return self.hi - self.lo


RESOURCES: tuple[Resource, ...] = (
    Resource("cpu_cores", "CPU cores", "cores", 0.0, 128.0, (8.0, 112.0), 8.0),
    Resource("cpu_mem", "CPU memory", "GB", 0.0, 512.0, (32.0, 448.0), 32.0),
    Resource("gpu_sm", "GPU SM", "%", 0.0, 100.0, (10.0, 95.0), 10.0),
    Resource("gpu_mem", "GPU memory", "GB", 0.0, 80.0, (4.0, 76.0), 8.0),
)
RESOURCE_NAMES: tuple[str, ...] = tuple(r.name for r in RESOURCES)


def resource_index(resource: str | int) -> int:
    """Column of ``resource`` (a name from :data:`RESOURCE_NAMES` or an index) in a curve."""
    if isinstance(resource, (int, np.integer)) and not isinstance(resource, bool):
        if 0 <= resource < len(RESOURCES):
            return int(resource)
    elif resource in RESOURCE_NAMES:
        return RESOURCE_NAMES.index(resource)
    raise ValueError(f"unknown resource {resource!r}, expected one of {RESOURCE_NAMES}")


def margin_steps(num_steps: int) -> int:
    """Steps at each end of a curve that carry no spike: ``ceil(T / 10)``."""
    return -(-num_steps // 10)


class Spike(NamedTuple):
    """A downward spike: steps ``start .. start + length - 1`` hold ``depth * base``."""

    start: int
    length: int
    depth: float

    @property
    def end(self) -> int:
        """First step after the spike."""
        return self.start + self.length


@dataclass(frozen=True, eq=False)
class ResourceCurve:
    """One synthetic curve of all resources.

    ``values``: float32 ``[T, 4]`` in the units of :data:`RESOURCES` (column order);
    ``base``: float32 ``[T, 4]``, the same curve without noise and spikes; ``trend``: the
    trend type per resource; ``spikes``: the spikes per resource; ``dt``: seconds per step.
    """

    values: np.ndarray
    base: np.ndarray
    trend: tuple[str, ...]
    spikes: tuple[tuple[Spike, ...], ...]
    dt: float = DT

    @property
    def num_steps(self) -> int:
        """``T``, the number of steps."""
        return int(self.values.shape[0])

    @property
    def times(self) -> np.ndarray:
        """float64 ``[T]``: the time of each step in seconds (``t * dt``)."""
        return np.arange(self.num_steps) * self.dt

    def column(self, resource: str | int) -> np.ndarray:
        """float64 ``[T]``: the values of one resource."""
        return self.values[:, resource_index(resource)].astype(np.float64)

    def free(self, resource: str | int) -> np.ndarray:
        """float64 ``[T]``: the capacity left, ``hi - value``, of one resource."""
        r = resource_index(resource)
        return RESOURCES[r].hi - self.values[:, r].astype(np.float64)

    def spike_mask(self) -> np.ndarray:
        """bool ``[T, 4]``: True on the steps of recorded spikes."""
        mask = np.zeros(self.values.shape, dtype=bool)
        for r, spikes in enumerate(self.spikes):
            for s in spikes:
                mask[max(s.start, 0) : s.end, r] = True
        return mask

    def exempt_transitions(self) -> np.ndarray:
        """bool ``[T - 1, 4]``: True where transition ``t -> t + 1`` enters or leaves a spike."""
        exempt = np.zeros((max(self.num_steps - 1, 0), self.values.shape[1]), dtype=bool)
        for r, spikes in enumerate(self.spikes):
            for s in spikes:
                for t in (s.start - 1, s.end - 1):
                    if 0 <= t < exempt.shape[0]:
                        exempt[t, r] = True
        return exempt


class CurveValidationError(ValueError):
    """A curve breaks the synthesizer's rules; ``problems`` lists every violation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid resource curve:\n  " + "\n  ".join(problems))
        self.problems = problems


def _step_limit(x: np.ndarray, floor: float) -> np.ndarray:
    """float64 ``[T - 1]``: the allowed ``|x[t+1] - x[t]|`` for each transition."""
    return STEP_LIMIT * np.maximum(np.abs(x[:-1]), floor)


def _limit_steps(x: np.ndarray, floor: float, lo: float, hi: float) -> np.ndarray:
    """``x`` (float64 ``[T]``, inside ``[lo, hi]``) with every step clamped to the limit."""
    if np.all(np.abs(np.diff(x)) <= _step_limit(x, floor)):
        return x
    y = x.tolist()
    for t in range(1, len(y)):
        bound = STEP_LIMIT * max(abs(y[t - 1]), floor)
        y[t] = min(max(y[t], y[t - 1] - bound, lo), y[t - 1] + bound, hi)
    return np.asarray(y)


def _linear(u: np.ndarray, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.uniform(lo, hi, 2)
    return a + (b - a) * u


def _exponential(u: np.ndarray, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.uniform(lo, hi, 2)
    k = rng.uniform(1.5, 4.0) * rng.choice([-1.0, 1.0])
    return a + (b - a) * np.expm1(k * u) / math.expm1(k)


def _sinusoidal(u: np.ndarray, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    amp = rng.uniform(0.1, 0.35) * (hi - lo)
    mean = rng.uniform(lo + amp, hi - amp)
    cycles = rng.uniform(0.5, min(2.5, (len(u) - 1) / 8))
    return mean + amp * np.sin(2 * np.pi * cycles * u + rng.uniform(0, 2 * np.pi))


def _step(u: np.ndarray, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    T = len(u)
    n = int(rng.integers(1, 4))
    at = np.sort(rng.choice(np.arange(math.ceil(0.15 * T), int(0.85 * T)), n, replace=False))
    levels = [rng.uniform(lo, hi)]
    while len(levels) <= n:
        level = rng.uniform(lo, hi)
        if abs(level - levels[-1]) >= 0.15 * (hi - lo):
            levels.append(level)
    return np.asarray(levels)[np.searchsorted(at, np.arange(T), side="right")]


def _plateau_jump(u: np.ndarray, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    plateau = rng.uniform(lo, lo + 0.45 * (hi - lo))
    jump = rng.uniform(0.3, 0.55) * (hi - lo)
    return np.where(u < rng.uniform(0.4, 0.8), plateau, plateau + jump)


_TRENDS = {
    "linear": _linear,
    "exponential": _exponential,
    "sinusoidal": _sinusoidal,
    "step": _step,
    "plateau_jump": _plateau_jump,
}


def _place_spikes(num_steps: int, rng: np.random.Generator) -> tuple[Spike, ...]:
    """1-3 spikes of 1-5 steps inside ``[m, T - m)``, at least SPIKE_GAP steps apart.

    Lengths are redrawn until they fit; the free steps are then split uniformly at random
    between the gaps before, between and after the spikes.
    """
    m = margin_steps(num_steps)
    room = num_steps - 2 * m
    count = int(rng.integers(SPIKES_PER_RESOURCE[0], SPIKES_PER_RESOURCE[1] + 1))
    while True:
        lengths = rng.integers(SPIKE_LENGTH[0], SPIKE_LENGTH[1] + 1, count)
        slack = room - int(lengths.sum()) - SPIKE_GAP * (count - 1)
        if slack >= 0:
            break
    cuts = np.sort(rng.integers(0, slack + 1, count))
    depths = rng.uniform(*SPIKE_DEPTH, count)
    spikes, start, used = [], m, 0
    for k in range(count):
        start += int(cuts[k]) - used
        used = int(cuts[k])
        spikes.append(Spike(start, int(lengths[k]), float(depths[k])))
        start += int(lengths[k]) + SPIKE_GAP
    return tuple(spikes)


class ResourceCurveSynthesizer:
    """Seeded generator of :class:`ResourceCurve` (see the module docstring for the rules).

    ``sample(i)`` for an index ``i >= 0`` draws from ``np.random.default_rng((seed, i))``:
    the same curve every time, independent of any other index.
    """

    def __init__(self, seed: int = 0) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)

    def sample(self, key: int | np.random.Generator) -> ResourceCurve:
        """One curve, from an index (reproducible) or a caller's Generator."""
        rng = _rng_for(self.seed, key)
        T = int(rng.integers(MIN_STEPS, MAX_STEPS + 1))
        u = np.linspace(0.0, 1.0, T)
        values = np.empty((T, len(RESOURCES)), dtype=np.float32)
        base = np.empty_like(values)
        trends, spikes = [], []
        for r, res in enumerate(RESOURCES):
            t_lo, t_hi = res.typical
            kind = TREND_TYPES[int(rng.integers(len(TREND_TYPES)))]
            b = np.clip(_TRENDS[kind](u, t_lo, t_hi, rng), t_lo, t_hi)
            b = _limit_steps(b, res.step_floor, t_lo, t_hi).astype(np.float32).astype(np.float64)
            noise = rng.normal(0.0, rng.uniform(*NOISE_FRACTION) * (t_hi - t_lo), T)
            x = _limit_steps(np.clip(b + noise, res.lo, res.hi), res.step_floor, res.lo, res.hi)
            placed = _place_spikes(T, rng)
            for s in placed:
                x[s.start : s.end] = s.depth * b[s.start : s.end]
            values[:, r], base[:, r] = x, b
            trends.append(kind)
            spikes.append(placed)
        return ResourceCurve(values, base, tuple(trends), tuple(spikes), DT)


def _rng_for(seed: int, key: int | np.random.Generator) -> np.random.Generator:
    """``key`` itself if it is a Generator, else ``default_rng((seed, key))``."""
    if isinstance(key, np.random.Generator):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= 0:
        return np.random.default_rng((seed, int(key)))
    raise ValueError(f"key must be a non-negative index or a numpy Generator, got {key!r}")


def _check_spikes(curve: ResourceCurve, r: int, problems: list[str]) -> None:
    """Count, length, depth, margins, gaps and values of one resource's spikes."""
    res, T = RESOURCES[r], curve.num_steps
    spikes = sorted(curve.spikes[r], key=lambda s: s.start)
    m = margin_steps(T)
    lo_n, hi_n = SPIKES_PER_RESOURCE
    if not lo_n <= len(spikes) <= hi_n:
        problems.append(f"{res.name}: {len(spikes)} spikes, expected {lo_n}-{hi_n}")
    tol = _REL_TOL * res.span
    for k, s in enumerate(spikes):
        where = f"{res.name}: spike at step {s.start} (length {s.length}, depth {s.depth:.4g})"
        if not SPIKE_LENGTH[0] <= s.length <= SPIKE_LENGTH[1]:
            problems.append(
                f"{where}: length {s.length} outside {SPIKE_LENGTH[0]}-{SPIKE_LENGTH[1]}"
            )
        if not SPIKE_DEPTH[0] <= s.depth <= SPIKE_DEPTH[1]:
            problems.append(
                f"{where}: depth {s.depth:.4g} outside [{SPIKE_DEPTH[0]}, {SPIKE_DEPTH[1]}]"
            )
        if s.start < m or s.end > T - m:
            problems.append(
                f"{where}: steps {s.start}..{s.end - 1} reach into the {m}-step margin "
                f"(allowed {m}..{T - m - 1})"
            )
        if k and s.start - spikes[k - 1].end < SPIKE_GAP:
            problems.append(
                f"{where}: only {s.start - spikes[k - 1].end} normal steps after the spike at "
                f"step {spikes[k - 1].start}, need {SPIKE_GAP}"
            )
        for t in range(max(s.start, 0), min(s.end, T)):
            want = s.depth * float(curve.base[t, r])
            got = float(curve.values[t, r])
            if abs(got - want) > tol:
                problems.append(
                    f"{res.name}: step {t}: spike value {got:.6g} {res.unit}, expected "
                    f"depth * base = {want:.6g}"
                )


def validate_curve(curve: ResourceCurve) -> list[str]:
    """Every rule violation of ``curve`` as a message naming resource, step and value.

    Checks shapes, ``dt``, ``T`` in [20, 100], trend types, physical bounds of ``values`` and
    ``base``, the spikes (count, length, depth, margins, gaps, values ``depth * base``) and
    the step-change limit outside the recorded spike entries/exits. Empty when valid.
    """
    values, base = np.asarray(curve.values), np.asarray(curve.base)
    n = len(RESOURCES)
    if values.ndim != 2 or values.shape[1] != n or base.shape != values.shape:
        return [f"values/base: expected shape [T, {n}], got {values.shape} and {base.shape}"]
    if len(curve.trend) != n or len(curve.spikes) != n:
        return [f"trend/spikes: expected {n} entries, got {len(curve.trend)}/{len(curve.spikes)}"]
    problems: list[str] = []
    T = curve.num_steps
    if not MIN_STEPS <= T <= MAX_STEPS:
        problems.append(f"T = {T} steps, expected {MIN_STEPS}-{MAX_STEPS}")
    if not math.isclose(curve.dt, DT):
        problems.append(f"dt = {curve.dt} s, expected {DT} s")
    exempt = curve.exempt_transitions()
    for r, res in enumerate(RESOURCES):
        if curve.trend[r] not in TREND_TYPES:
            problems.append(f"{res.name}: unknown trend type {curve.trend[r]!r}")
        for what, arr in (("value", values), ("base value", base)):
            x = arr[:, r].astype(np.float64)
            for t in np.flatnonzero(~((x >= res.lo) & (x <= res.hi))):
                problems.append(
                    f"{res.name}: step {t}: {what} {x[t]:.6g} {res.unit} outside the "
                    f"bounds [{res.lo:g}, {res.hi:g}]"
                )
        _check_spikes(curve, r, problems)
        x = values[:, r].astype(np.float64)
        change = np.abs(np.diff(x))
        limit = _step_limit(x, res.step_floor)
        for t in np.flatnonzero((change > limit + _REL_TOL * res.span) & ~exempt[:, r]):
            problems.append(
                f"{res.name}: step {t} -> {t + 1}: value {x[t]:.6g} -> {x[t + 1]:.6g} "
                f"{res.unit} changes by {change[t]:.6g}, limit {limit[t]:.6g} "
                f"({STEP_LIMIT} * max(|x|, {res.step_floor:g})), not a recorded spike edge"
            )
    return problems


def check_curve(curve: ResourceCurve) -> ResourceCurve:
    """``curve`` itself; raises :class:`CurveValidationError` listing every violation."""
    problems = validate_curve(curve)
    if problems:
        raise CurveValidationError(problems)
    return curve
