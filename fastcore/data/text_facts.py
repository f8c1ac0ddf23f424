"""Reading numbers and labels back out of generated resource descriptions.

The targets of :class:`~fastcore.data.descriptions.TextDescriptionGenerator` state their
numbers in a few typed forms: amounts (``"12.5 GB"``, ``"about 13 cores"``, ``"45
percent"``), rates (an amount followed by ``"/s"`` or ``" per second"``) and times
(``"2.3 s"``, ``"2300 ms"``, ``"2.3 seconds"``). :func:`parse_quantities` finds them in
order; :func:`fact_slots` says which fact each one states for a task (the first amount of a
trend target is its start, and so on), so :func:`score_numbers` can compare a generation
with the exact facts of its curve: a slot is right when its number lies within ``rel_tol``
(5%) of the truth, and a slot the generation does not state counts as wrong.
:func:`classify` reads the trend direction or the feasibility outcome.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastcore.data.descriptions import Description

__all__ = [
    "NUMERIC_TOLERANCE",
    "Quantity",
    "classify",
    "fact_slots",
    "parse_quantities",
    "score_numbers",
]

NUMERIC_TOLERANCE = 0.05

_NUMBER = r"(\d+(?:\.\d+)?)"
_QUANTITY = re.compile(
    _NUMBER
    + r"(?:\s?(?P<unit>GB|cores|%|percent)(?P<rate>/s| per second)?"
    + r"|\s?(?P<time>ms|seconds|s)\b)"
)
_DIRECTIONS = {
    "increasing": ("increasing", "rising", "trending upward"),
    "decreasing": ("decreasing", "falling", "trending downward"),
    "stable": ("stable", "flat", "steady"),
}


@dataclass(frozen=True)
class Quantity:
    """A number found in text: ``kind`` is ``"amount"``, ``"rate"`` or ``"time"`` (seconds)."""

    kind: str
    value: float


def parse_quantities(text: str) -> list[Quantity]:
    """Every typed number in ``text``, in order (times converted to seconds)."""
    found = []
    for m in _QUANTITY.finditer(text):
        value = float(m.group(1))
        if m.group("time"):
            found.append(Quantity("time", value / 1000 if m.group("time") == "ms" else value))
        elif m.group("rate"):
            found.append(Quantity("rate", value))
        else:
            found.append(Quantity("amount", value))
    return found


def fact_slots(desc: Description) -> list[tuple[str, str, int, float]]:
    """The facts a target states, as ``(fact, kind, occurrence, truth)``: the fact is the
    ``occurrence``-th quantity of ``kind`` in the target (the templates keep that order)."""
    f = desc.facts
    if desc.task == "trend":
        return [
            ("start", "amount", 0, float(f["start"])),
            ("end", "amount", 1, float(f["end"])),
            ("rate", "rate", 0, abs(float(f["rate"]))),
        ]
    if desc.task == "bottleneck":
        slots = [
            ("minimum", "amount", 0, float(f["minimum"])),
            ("time_s", "time", 0, float(f["time_s"])),
        ]
        if float(f.get("duration_s", 0.0)) > 0:
            slots.append(("duration_s", "time", 1, float(f["duration_s"])))
        return slots
    slots = [("free", "amount", 0, float(f["free"]))]
    if f["outcome"] == "after":
        slots.append(("time_s", "time", 0, float(f["time_s"])))
    return slots


def _close(value: float, truth: float, rel_tol: float) -> bool:
    return abs(value - truth) <= rel_tol * abs(truth)


def score_numbers(
    desc: Description, text: str, rel_tol: float = NUMERIC_TOLERANCE
) -> dict[str, bool]:
    """Per fact of ``desc``: does ``text`` state it within ``rel_tol`` of the truth?"""
    by_kind: dict[str, list[float]] = {}
    for q in parse_quantities(text):
        by_kind.setdefault(q.kind, []).append(q.value)
    out = {}
    for fact, kind, occurrence, truth in fact_slots(desc):
        values = by_kind.get(kind, [])
        out[fact] = occurrence < len(values) and _close(values[occurrence], truth, rel_tol)
    return out


def classify(task: str, text: str) -> str | None:
    """The trend direction or feasibility outcome ``text`` states (None: none found, or a
    bottleneck task, which has no label)."""
    low = text.strip().lower()
    if task == "trend":
        best, where = None, len(low) + 1
        for label, words in _DIRECTIONS.items():
            for word in words:
                i = low.find(word)
                if 0 <= i < where:
                    best, where = label, i
        return best
    if task == "feasibility":
        if low.startswith(("not yet", "later", "not right away")):
            return "after"
        if low.startswith(("no", "never")):
            return "never"
        if low.startswith("yes"):
            return "immediately"
    return None
