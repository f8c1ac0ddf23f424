"""Text descriptions of resource curves (fastcore.data.descriptions): every number in a
target parsed back out and compared with values recomputed here from ``curve.values``, the
labels (trend rule, feasibility outcome) recomputed, the feasibility outcome balance over
3,000 samples, the variety of templates and formats, prompts free of answers, determinism."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from fastcore.data.descriptions import Description, TextDescriptionGenerator
from fastcore.data.resources import ResourceCurve, ResourceCurveSynthesizer

# The specification, independent of the modules: column, upper bound, unit spellings.
SPEC = {
    "cpu_cores": (0, 128.0, {"cores"}),
    "cpu_mem": (1, 512.0, {"GB"}),
    "gpu_sm": (2, 100.0, {"%", "percent"}),
    "gpu_mem": (3, 80.0, {"GB"}),
}
DT = 0.1
QUANTITY = re.compile(
    r"(?P<approx>about |roughly |around |approximately |~)?"
    r"(?P<num>-?\d+(?:\.\d+)?)\s?"
    r"(?P<unit>GB|cores|%|percent|ms|seconds|s)(?P<per>/s| per second)?(?![A-Za-z])"
)
NUMBER = re.compile(r"\d+(?:\.\d+)?")
DIRECTION_WORDS = {
    "increasing": ("increasing", "rising", "upward"),
    "decreasing": ("decreasing", "falling", "downward"),
    "stable": ("stable", "flat", "steady"),
}
OPENINGS = {
    "immediately": ("Yes",),
    "after": ("Not yet", "Later", "Not right away"),
    "never": ("No,", "No.", "Never"),
}
N_FEASIBILITY = 3000
N_OTHER = 600


@dataclass(frozen=True)
class Quantity:
    kind: str  # "amount" (resource unit), "rate" (unit per second) or "time" (seconds)
    value: float
    tol: float  # half a unit of the last written digit (0.5 for approximate integers)
    unit: str
    approx: bool = False


def parse(text: str) -> dict[str, list[Quantity]]:
    """The quantities of ``text`` by kind, in order; fails on a number without a unit."""
    found: dict[str, list[Quantity]] = {"amount": [], "rate": [], "time": []}
    matches = list(QUANTITY.finditer(text))
    assert len(matches) == len(NUMBER.findall(text)), f"number without a unit in {text!r}"
    for m in matches:
        num = m["num"]
        decimals = len(num.split(".")[1]) if "." in num else 0
        tol = 0.5 if m["approx"] else 0.5 * 10.0**-decimals
        value, unit = float(num), m["unit"]
        if unit in ("ms", "seconds", "s"):
            assert not m["approx"] and not m["per"], text
            scale = 1e-3 if unit == "ms" else 1.0
            found["time"].append(Quantity("time", value * scale, tol * scale, unit))
        else:
            kind = "rate" if m["per"] else "amount"
            found[kind].append(Quantity(kind, value, tol, unit, bool(m["approx"])))
    return found


def assert_close(got: list[Quantity], want: list[float], text: str) -> None:
    assert len(got) == len(want), (text, got, want)
    for q, w in zip(got, want, strict=True):
        assert abs(q.value - w) <= q.tol + 1e-6 * max(1.0, abs(w)), (text, q, w)


def column(curve: ResourceCurve, resource: str) -> np.ndarray:
    return curve.values[:, SPEC[resource][0]].astype(np.float64)


@pytest.fixture(scope="module")
def curves() -> list[ResourceCurve]:
    synth = ResourceCurveSynthesizer(seed=5)
    return [synth.sample(i) for i in range(N_FEASIBILITY)]


@pytest.fixture(scope="module")
def samples(curves) -> dict[str, list[tuple[ResourceCurve, Description]]]:
    gen = TextDescriptionGenerator(seed=9)
    out = {}
    for task in ("trend", "bottleneck"):
        out[task] = [(c, gen.generate(c, task, key=i)) for i, c in enumerate(curves[:N_OTHER])]
    out["feasibility"] = [(c, gen.generate(c, "feasibility", key=i)) for i, c in enumerate(curves)]
    return out


def _units_match(d: Description, parsed: dict[str, list[Quantity]]) -> None:
    for q in parsed["amount"] + parsed["rate"]:
        assert q.unit in SPEC[d.resource][2], (d.resource, d.target)


# ----------------------------------------------------------------------------- trend
def test_trend_numbers_and_direction_recomputed(samples):
    directions = Counter()
    for curve, d in samples["trend"]:
        assert d.task == "trend"
        x = column(curve, d.resource)
        T = len(x)
        m = math.ceil(T / 10)
        start, end = x[:m].mean(), x[T - m :].mean()
        rate = (end - start) / ((T - m) * DT)
        if abs(end - start) < 0.05 * SPEC[d.resource][1]:
            direction = "stable"
        else:
            direction = "increasing" if end > start else "decreasing"
        parsed = parse(d.target)
        _units_match(d, parsed)
        assert_close(parsed["amount"], [start, end], d.target)  # start before end
        assert_close(parsed["rate"], [abs(rate)], d.target)
        assert parsed["time"] == []
        assert d.facts["direction"] == d.label == direction
        assert d.facts["start"] == pytest.approx(start, rel=1e-9)
        assert d.facts["end"] == pytest.approx(end, rel=1e-9)
        assert d.facts["rate"] == pytest.approx(rate, rel=1e-9, abs=1e-9)
        words = d.target.lower()
        for label, family in DIRECTION_WORDS.items():
            assert any(w in words for w in family) == (label == direction), (direction, d.target)
        directions[direction] += 1
    assert set(directions) == set(DIRECTION_WORDS)
    assert Counter(d.resource for _, d in samples["trend"]).keys() == SPEC.keys()


# ----------------------------------------------------------------------------- bottleneck
def test_bottleneck_numbers_recomputed(samples):
    variants = Counter()
    for curve, d in samples["bottleneck"]:
        x = column(curve, d.resource)
        k = int(np.argmin(x))
        parsed = parse(d.target)
        _units_match(d, parsed)
        amounts, times = parsed["amount"], parsed["time"]
        assert_close(amounts[:1], [x.min()], d.target)
        assert_close(times[:1], [k * DT], d.target)
        assert d.facts["minimum"] == x.min() and d.facts["time_s"] == pytest.approx(k * DT)
        if len(amounts) == 1:
            assert len(times) == 1 and "threshold" not in d.facts
            variants["plain"] += 1
            continue
        threshold = amounts[1]
        assert not threshold.approx, d.target  # a stated threshold is exact
        assert abs(threshold.value - 0.5 * np.median(x)) <= threshold.tol + 1e-9, d.target
        below = int(np.count_nonzero(x < threshold.value))
        assert d.facts["threshold"] == threshold.value
        assert d.facts["duration_s"] == pytest.approx(below * DT)
        if below:
            assert_close(times[1:], [below * DT], d.target)
            variants["duration"] += 1
        else:
            assert len(times) == 1, d.target
            variants["never below"] += 1
    assert variants["plain"] > 0.3 * N_OTHER and variants["duration"] > 0.3 * N_OTHER
    assert d.label is None


# ----------------------------------------------------------------------------- feasibility
def _outcome(free: np.ndarray, demand: float) -> tuple[str, int | None]:
    if free[0] >= demand:
        return "immediately", 0
    later = [t for t in range(1, len(free)) if free[t] >= demand]
    return ("after", later[0]) if later else ("never", None)


def test_feasibility_outcome_and_numbers_recomputed(samples):
    for curve, d in samples["feasibility"]:
        free = SPEC[d.resource][1] - column(curve, d.resource)
        asked = parse(d.prompt)
        assert asked["rate"] == [] and asked["time"] == [] and len(asked["amount"]) == 1
        demand = asked["amount"][0]
        assert demand.unit in SPEC[d.resource][2] and demand.value > 0, d.prompt
        assert not demand.approx, d.prompt
        assert demand.value == d.facts["demand"]
        outcome, k = _outcome(free, demand.value)
        assert d.facts["outcome"] == d.label == outcome, (d.prompt, d.target)
        assert d.target.startswith(OPENINGS[outcome]), d.target
        parsed = parse(d.target)
        _units_match(d, parsed)
        if outcome == "immediately":
            assert_close(parsed["amount"], [free[0]], d.target)
            assert parsed["time"] == []
        elif outcome == "after":
            assert_close(parsed["time"], [k * DT], d.target)
            assert_close(parsed["amount"], [free[k]], d.target)
        else:
            assert_close(parsed["amount"], [free.max()], d.target)
            assert parsed["time"] == []
        if not d.facts["constructed"]:  # a preset multiple of the mean free amount
            m = d.facts["multiplier"]
            assert m in (0.8, 1.2, 1.5)
            assert abs(demand.value - m * free.mean()) <= demand.tol + 1e-6, d.prompt


def test_feasibility_outcomes_are_balanced(samples):
    counts = Counter(d.facts["outcome"] for _, d in samples["feasibility"])
    for outcome in OPENINGS:
        assert abs(counts[outcome] / N_FEASIBILITY - 1 / 3) <= 0.03, counts
    # presets are the rule, construction the fallback; resources stay mixed per outcome
    presets = sum(not d.facts["constructed"] for _, d in samples["feasibility"])
    assert presets > 0.5 * N_FEASIBILITY
    for outcome in OPENINGS:
        per = Counter(d.resource for _, d in samples["feasibility"] if d.label == outcome)
        assert min(per.values()) > 0.15 * counts[outcome], (outcome, per)


# ----------------------------------------------------------------------------- prompts, variety
def test_prompts_never_contain_answers(samples):
    for task in ("trend", "bottleneck"):
        for _, d in samples[task]:
            assert not re.search(r"\d", d.prompt), d.prompt
    for _, d in samples["feasibility"]:
        assert [float(n) for n in NUMBER.findall(d.prompt)] == [d.facts["demand"]], d.prompt


def _skeleton(text: str) -> str:
    return QUANTITY.sub("#", text)


def test_templates_synonyms_and_formats_vary(samples):
    for task, pairs in samples.items():
        targets = {_skeleton(d.target) for _, d in pairs}
        prompts = {_skeleton(d.prompt) for _, d in pairs}
        assert len(targets) >= 10 and len(prompts) >= 6, task
    texts = " ".join(d.target for pairs in samples.values() for _, d in pairs)
    for pattern in (
        r"\d+\.\d GB",  # 12.5 GB
        r"\d+\.\d\dGB",  # 12.50GB
        r"(about|roughly|around) \d+ GB",  # about 13 GB
        r"~\d+",
        r"\d+% ",  # 45%
        r"\d+(\.\d)? percent",  # 45 percent
        r"at \d+\.\d s",  # at 2.3 s
        r"after \d+ ms",  # after 2300 ms
        r"\d+\.\d seconds in",
        r"/s",
        r" per second",
        r"\d+\.\d+ cores",
    ):
        assert re.search(pattern, texts), pattern
    prompts = " ".join(d.prompt for pairs in samples.values() for _, d in pairs)
    for synonyms in (("GPU memory", "VRAM", "device memory"), ("host memory", "RAM", "CPU memory")):
        assert all(s in prompts for s in synonyms), synonyms


# ----------------------------------------------------------------------------- determinism, api
def test_generation_is_deterministic_per_seed_and_index(curves):
    a, b = TextDescriptionGenerator(2), TextDescriptionGenerator(2)
    first = [a.generate(curves[i], key=i) for i in range(30)]
    again = [b.generate(curves[i], key=i) for i in reversed(range(30))][::-1]
    assert first == again
    assert Counter(d.task for d in first).keys() == {"trend", "bottleneck", "feasibility"}
    other = [TextDescriptionGenerator(3).generate(curves[i], key=i) for i in range(30)]
    assert sum(x != y for x, y in zip(first, other, strict=True)) > 20
    rng_made = a.generate(curves[0], "trend", key=np.random.default_rng(0))
    assert rng_made == b.generate(curves[0], "trend", key=np.random.default_rng(0))


def test_resource_argument_and_errors(curves):
    gen = TextDescriptionGenerator(0)
    for task in ("trend", "bottleneck", "feasibility"):
        assert gen.generate(curves[1], task, key=4, resource="gpu_sm").resource == "gpu_sm"
    with pytest.raises(ValueError, match="task"):
        gen.generate(curves[1], "forecast", key=0)
    with pytest.raises(ValueError, match="resource"):
        gen.generate(curves[1], "trend", key=0, resource="disk")
    with pytest.raises(ValueError, match="key"):
        gen.generate(curves[1], "trend", key=-2)
    with pytest.raises(ValueError, match="seed"):
        TextDescriptionGenerator(-1)
