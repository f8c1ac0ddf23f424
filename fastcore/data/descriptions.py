"""Text (prompt, target) pairs about a :class:`~fastcore.data.resources.ResourceCurve`.

:class:`TextDescriptionGenerator` writes one :class:`Description` per call for one resource
(drawn per sample) and one of three tasks, with varied templates, resource synonyms and
number formats (``"12.5 GB"``, ``"12.50GB"``, ``"about 13 GB"``; ``"45%"``,
``"45 percent"``; ``"at 2.3 s"``, ``"after 2300 ms"``). Every number in a target comes from
the curve; ``Description.facts`` holds its exact value. The rules (``x`` = the resource's
values, float64 of the float32 curve, ``T`` steps, ``dt`` s per step):

* ``trend``: ``m = ceil(T / 10)`` (the spike-free margin); ``start = mean(x[:m])``,
  ``end = mean(x[T - m:])``, ``rate = (end - start) / ((T - m) * dt)`` per second (the
  distance between the two windows' centres). Direction: ``"stable"`` when
  ``|end - start| < 0.05 * (hi - lo)`` (5% of the physical bound span), else
  ``"increasing"``/``"decreasing"`` by the sign. The target states start, end and ``|rate|``
  (the direction word carries the sign).
* ``bottleneck``: the minimum ``min(x)`` and its time ``argmin(x) * dt`` (first occurrence).
  Half the samples add the time spent below a threshold: ``threshold = 0.5 * median(x)``
  rounded to the number it is written with, ``duration = dt * count(x < threshold)``.
* ``feasibility``: ``free = hi - x``; a job needing ``demand`` can start ``"immediately"``
  if ``free[0] >= demand``, ``"after"`` ``k * dt`` s where ``k > 0`` is the first step with
  ``free[k] >= demand``, else ``"never"``. Balance: the outcome is drawn first (uniform over
  the three); then the multipliers 0.8, 1.2, 1.5 of ``mean(free)`` are tried in random
  order and the first whose demand (rounded to the number the prompt states) yields that
  outcome is used. If none does, the demand is drawn inside the interval that yields it
  (``(0, free[0]]``, ``(free[0], max(free)]`` or above ``max(free)``), for the drawn resource
  or, if impossible there, another one. The outcome is always recomputed from the stated
  demand. The target states ``free[0]`` (immediately), the start time and ``free[k]``
  (after) or ``max(free)`` (never).

Prompts never contain an answer: trend and bottleneck prompts have no numbers, feasibility
prompts only the demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastcore.data.resources import RESOURCES, Resource, ResourceCurve, margin_steps, resource_index

__all__ = [
    "DEMAND_MULTIPLIERS",
    "DIRECTIONS",
    "OUTCOMES",
    "STABLE_FRACTION",
    "TASKS",
    "THRESHOLD_FRACTION",
    "Description",
    "TextDescriptionGenerator",
    "bottleneck_facts",
    "feasibility_outcome",
    "trend_facts",
]

TASKS = ("trend", "bottleneck", "feasibility")
DIRECTIONS = ("increasing", "decreasing", "stable")
OUTCOMES = ("immediately", "after", "never")
STABLE_FRACTION = 0.05  # |end - start| below this fraction of the bound span: stable
THRESHOLD_FRACTION = 0.5  # bottleneck threshold as a fraction of the median
DEMAND_MULTIPLIERS = (0.8, 1.2, 1.5)  # of the mean free amount
_TEXT_STREAM = 1  # index keys draw from default_rng((seed, index, _TEXT_STREAM))

_NAMES = {
    "cpu_cores": ("CPU core usage", "the number of busy cores", "CPU core utilization"),
    "cpu_mem": ("CPU memory", "host memory", "system RAM", "host RAM"),
    "gpu_sm": ("GPU SM utilization", "GPU SM usage", "SM occupancy", "GPU compute load"),
    "gpu_mem": ("GPU memory", "VRAM", "GPU RAM", "device memory"),
}
_OF_RESOURCE = {
    "cpu_cores": ("on the CPU", "of CPU", "of CPU capacity"),
    "cpu_mem": ("of host memory", "of CPU memory", "of RAM"),
    "gpu_sm": ("of the GPU's SMs", "of GPU SM capacity", "of GPU compute"),
    "gpu_mem": ("of GPU memory", "of VRAM", "of device memory"),
}
_UNIT_TEXT = {"GB": (" GB", "GB"), "cores": (" cores",), "%": ("%", " percent")}
_APPROX = ("about ", "roughly ", "around ", "~")
_DIRECTION_WORDS = {
    "increasing": ("increasing", "rising", "trending upward"),
    "decreasing": ("decreasing", "falling", "trending downward"),
    "stable": ("stable", "flat", "steady"),
}

_TREND_PROMPTS = (
    "Describe the trend of {r}.",
    "How does {r} evolve over this window?",
    "Is {r} going up, going down or staying flat? Give its start and end values and its rate.",
    "Summarize {r}: direction, start and end values, rate of change.",
)
_TREND_TARGETS = (
    "{R} is {dir}: it goes from {start} to {end}, a change of {rate}.",
    "{Dir}. {R} starts at {start} and ends at {end} ({rate}).",
    "Over this window {r} is {dir}, moving from {start} at the start to {end} at the end "
    "at {rate}.",
    "{R}: {dir}, {start} at first and {end} at the end, changing by {rate}.",
)
_BOTTLENECK_PROMPTS = (
    "When does {r} reach its minimum, and what is the value?",
    "Find the bottleneck in {r}: the lowest value and when it happens.",
    "What is the lowest {r} in this window, and at what time?",
)
_BOTTLENECK_DURATION_PROMPTS = (
    " How long does it stay low?",
    " Also say how long it spends below half its median.",
)
_BOTTLENECK_TARGETS = (
    "{R} bottoms out at {min} {when}.",
    "The minimum of {r} is {min}, reached {when}.",
    "Lowest point: {min} {when}.",
)
_BELOW_TARGETS = (
    " It stays below {thr} for {dur} in total.",
    " In total it spends {dur} under {thr} (half its median).",
)
_NEVER_BELOW_TARGETS = (
    " It never drops below {thr}.",
    " It is never under {thr} (half its median).",
)
_FEASIBILITY_PROMPTS = (
    "Can a job needing {demand} {of} start? If so, when?",
    "A task requires {demand} {of}. Could it be scheduled now, later, or never?",
    "Free capacity is the bound minus usage. When could a job that needs {demand} {of} start?",
    "Is there room for a job asking for {demand} {of}? When?",
)
_FEASIBILITY_TARGETS = {
    "immediately": (
        "Yes, it can start immediately: {free} is free at the start.",
        "Yes, right away: {free} is available at time zero.",
        "Yes. The free capacity at the start is {free}, enough to start immediately.",
    ),
    "after": (
        "Not yet: free capacity first reaches {free} {when}, so the job can start then.",
        "Later: it has to wait until free capacity reaches {free}, {when}.",
        "Not right away. It can start {when}, when {free} becomes free.",
    ),
    "never": (
        "No, never: the free capacity peaks at {free}, which is not enough.",
        "No. Even at its highest only {free} is free, so the job never fits.",
        "Never: the most free capacity over the window is {free}, short of the demand.",
    ),
}


@dataclass(frozen=True)
class Description:
    """One (prompt, target) pair about ``resource`` (a name from RESOURCE_NAMES).

    ``facts``: every number in ``target`` by name with its exact value (units of the
    resource, seconds for ``*_s``), the label (``direction`` or ``outcome``) and, for
    feasibility, the prompt's ``demand`` and its ``multiplier`` of the mean free amount.
    """

    task: str
    resource: str
    prompt: str
    target: str
    facts: dict[str, float | str | bool]

    @property
    def label(self) -> str | None:
        """The trend direction or the feasibility outcome (None for bottleneck)."""
        value = self.facts.get("direction", self.facts.get("outcome"))
        return None if value is None else str(value)


def _seconds(steps: int, dt: float) -> float:
    """``steps * dt`` without float noise (``2.9``, not ``2.9000000000000004``)."""
    return round(steps * dt, 9)


def trend_facts(curve: ResourceCurve, resource: str | int) -> dict[str, float | str]:
    """``start``, ``end`` (resource unit), ``rate`` (unit per s, signed) and ``direction``."""
    r = resource_index(resource)
    x, T = curve.column(r), curve.num_steps
    m = margin_steps(T)
    start, end = float(x[:m].mean()), float(x[T - m :].mean())
    if abs(end - start) < STABLE_FRACTION * RESOURCES[r].span:
        direction = "stable"
    else:
        direction = "increasing" if end > start else "decreasing"
    rate = (end - start) / ((T - m) * curve.dt)
    return {"direction": direction, "start": start, "end": end, "rate": rate}


def bottleneck_facts(
    curve: ResourceCurve, resource: str | int, threshold: float | None = None
) -> dict[str, float]:
    """``minimum`` and ``time_s``; with a ``threshold`` also ``threshold`` and ``duration_s``."""
    x = curve.column(resource)
    k = int(np.argmin(x))
    facts = {"minimum": float(x[k]), "time_s": _seconds(k, curve.dt)}
    if threshold is not None:
        facts["threshold"] = float(threshold)
        facts["duration_s"] = _seconds(int(np.count_nonzero(x < threshold)), curve.dt)
    return facts


def feasibility_outcome(free: np.ndarray, demand: float) -> tuple[str, int | None]:
    """Outcome for a job needing ``demand`` given ``free`` ``[T]``, and the first step that fits."""
    fits = np.asarray(free) >= demand
    if fits[0]:
        return "immediately", 0
    if fits.any():
        return "after", int(np.argmax(fits))
    return "never", None


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Formatter:
    """Number formats drawn per call; every method returns text with its unit."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def _unit(self, res: Resource) -> str:
        return _pick(self.rng, _UNIT_TEXT[res.unit])

    def amount(self, value: float, res: Resource) -> str:
        """A reported value: fixed decimals or an approximate integer."""
        style = int(self.rng.integers(3))
        if style == 2:
            return f"{_pick(self.rng, _APPROX)}{value:.0f}{self._unit(res)}"
        decimals = style if res.unit == "%" else style + 1
        return f"{value:.{decimals}f}{self._unit(res)}"

    def exact_amount(self, value: float, res: Resource) -> tuple[str, float]:
        """A stated input (demand, threshold): 0 or 1 decimals, and the value it states."""
        decimals = int(self.rng.integers(2))
        text = f"{value:.{decimals}f}"
        return text + self._unit(res), float(text)

    def rate(self, value: float, res: Resource) -> str:
        """``|value|`` per second."""
        per = _pick(self.rng, ("/s", " per second"))
        return f"{abs(value):.{int(self.rng.integers(1, 3))}f}{self._unit(res)}{per}"

    def instant(self, seconds: float) -> str:
        """A time since the start of the curve, with its preposition."""
        style = int(self.rng.integers(3))
        if style == 0:
            return f"at {seconds:.1f} s"
        if style == 1:
            return f"after {seconds * 1000:.0f} ms"
        return f"{seconds:.1f} seconds in"

    def duration(self, seconds: float) -> str:
        style = int(self.rng.integers(3))
        if style == 0:
            return f"{seconds:.1f} s"
        if style == 1:
            return f"{seconds * 1000:.0f} ms"
        return f"{seconds:.1f} seconds"


class TextDescriptionGenerator:
    """Seeded (prompt, target) generator for the trend, bottleneck and feasibility tasks.

    ``generate(curve, task, key=i)`` with an index draws from
    ``np.random.default_rng((seed, i, 1))`` (a stream apart from the curve synthesizer's
    ``(seed, i)``): the same description for the same curve every time.
    """

    def __init__(self, seed: int = 0) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)

    def _rng(self, key: int | np.random.Generator) -> np.random.Generator:
        if isinstance(key, np.random.Generator):
            return key
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= 0:
            return np.random.default_rng((self.seed, int(key), _TEXT_STREAM))
        raise ValueError(f"key must be a non-negative index or a numpy Generator, got {key!r}")

    def generate(
        self,
        curve: ResourceCurve,
        task: str | None = None,
        *,
        key: int | np.random.Generator,
        resource: str | int | None = None,
    ) -> Description:
        """A description of ``curve``; ``task`` and ``resource`` are drawn when None."""
        rng = self._rng(key)
        if task is None:
            task = _pick(rng, TASKS)
        elif task not in TASKS:
            raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
        fixed = resource is not None
        r = resource_index(resource) if fixed else int(rng.integers(len(RESOURCES)))
        fmt = _Formatter(rng)
        if task == "trend":
            return self._trend(curve, r, rng, fmt)
        if task == "bottleneck":
            return self._bottleneck(curve, r, rng, fmt)
        return self._feasibility(curve, r, fixed, rng, fmt)

    def _trend(
        self, curve: ResourceCurve, r: int, rng: np.random.Generator, fmt: _Formatter
    ) -> Description:
        res, facts = RESOURCES[r], trend_facts(curve, r)
        name = _pick(rng, _NAMES[res.name])
        word = _pick(rng, _DIRECTION_WORDS[str(facts["direction"])])
        target = _pick(rng, _TREND_TARGETS).format(
            r=name,
            R=_capitalize(name),
            dir=word,
            Dir=_capitalize(word),
            start=fmt.amount(float(facts["start"]), res),
            end=fmt.amount(float(facts["end"]), res),
            rate=fmt.rate(float(facts["rate"]), res),
        )
        prompt = _pick(rng, _TREND_PROMPTS).format(r=name)
        return Description("trend", res.name, _capitalize(prompt), _capitalize(target), facts)

    def _bottleneck(
        self, curve: ResourceCurve, r: int, rng: np.random.Generator, fmt: _Formatter
    ) -> Description:
        res = RESOURCES[r]
        name = _pick(rng, _NAMES[res.name])
        prompt = _pick(rng, _BOTTLENECK_PROMPTS).format(r=name)
        threshold_text, threshold = None, None
        if rng.random() < 0.5:
            median = float(np.median(curve.column(r)))
            threshold_text, threshold = fmt.exact_amount(THRESHOLD_FRACTION * median, res)
            prompt += _pick(rng, _BOTTLENECK_DURATION_PROMPTS)
        facts = bottleneck_facts(curve, r, threshold)
        target = _pick(rng, _BOTTLENECK_TARGETS).format(
            r=name,
            R=_capitalize(name),
            min=fmt.amount(facts["minimum"], res),
            when=fmt.instant(facts["time_s"]),
        )
        if threshold is not None:
            if facts["duration_s"] > 0:
                target += _pick(rng, _BELOW_TARGETS).format(
                    thr=threshold_text, dur=fmt.duration(facts["duration_s"])
                )
            else:
                target += _pick(rng, _NEVER_BELOW_TARGETS).format(thr=threshold_text)
        return Description("bottleneck", res.name, _capitalize(prompt), _capitalize(target), facts)

    def _demand(
        self,
        free: np.ndarray,
        res: Resource,
        outcome: str,
        rng: np.random.Generator,
        fmt: _Formatter,
    ) -> tuple[str, float, float | None] | None:
        """(prompt text, stated demand, preset multiplier or None if constructed) yielding
        ``outcome``, or None when neither a preset multiplier nor the construction does."""
        for m in rng.permutation(DEMAND_MULTIPLIERS):
            text, demand = fmt.exact_amount(float(m) * float(free.mean()), res)
            if demand > 0 and feasibility_outcome(free, demand)[0] == outcome:
                return text, demand, float(m)
        first, most = float(free[0]), float(free.max())
        for _ in range(4):
            if outcome == "immediately":
                value = rng.uniform(0.5, 0.95) * first
            elif outcome == "after":
                value = first + rng.uniform(0.1, 1.0) * (most - first)
            else:
                value = most + rng.uniform(0.2, 0.8) * max(res.hi - most, 0.05 * res.span)
            text, demand = fmt.exact_amount(value, res)
            if demand > 0 and feasibility_outcome(free, demand)[0] == outcome:
                return text, demand, None
        return None

    def _feasibility(
        self,
        curve: ResourceCurve,
        r: int,
        fixed: bool,
        rng: np.random.Generator,
        fmt: _Formatter,
    ) -> Description:
        outcome = _pick(rng, OUTCOMES)
        order = [r] if fixed else [r, *(int(i) for i in rng.permutation(len(RESOURCES)) if i != r)]
        found = None
        for candidate in order:
            found = self._demand(curve.free(candidate), RESOURCES[candidate], outcome, rng, fmt)
            if found is not None:
                r = candidate
                break
        if found is None:  # no resource allows this outcome: keep whatever 1.2x gives
            m = DEMAND_MULTIPLIERS[1]
            found = (*fmt.exact_amount(m * float(curve.free(r).mean()), RESOURCES[r]), m)
        text, demand, multiplier = found
        res, free = RESOURCES[r], curve.free(r)
        outcome, k = feasibility_outcome(free, demand)
        facts: dict[str, float | str | bool] = {
            "outcome": outcome,
            "demand": demand,
            "multiplier": demand / float(free.mean()) if multiplier is None else multiplier,
            "constructed": multiplier is None,
        }
        if outcome == "after":
            facts["time_s"] = _seconds(k, curve.dt)
        facts["free"] = float(free.max()) if k is None else float(free[k])
        target = _pick(rng, _FEASIBILITY_TARGETS[outcome]).format(
            free=fmt.amount(float(facts["free"]), res),
            when=fmt.instant(float(facts.get("time_s", 0.0))),
        )
        prompt = _pick(rng, _FEASIBILITY_PROMPTS).format(
            demand=text, of=_pick(rng, _OF_RESOURCE[res.name])
        )
        return Description("feasibility", res.name, prompt, target, facts)
