"""The statistics and the report of the KV-alignment study (:mod:`fastcore.train.kv_study`).

Pure functions of the per-run numbers, so that the interval arithmetic and the sentence that
states the result can be checked on their own (``tests/test_kv_study.py`` feeds them
synthetic numbers both ways):

* :func:`t_quantile`: Student's t quantile (no SciPy: the regularised incomplete beta
  function by its continued fraction, inverted by bisection);
* :func:`t_interval`: a mean and its two-sided t-interval over seeds;
* :func:`paired_bootstrap`: a two-level (seeds, then held-out windows) percentile bootstrap
  of a paired mean difference;
* :func:`verdict` / :func:`conclusion`: the words, decided by the intervals alone;
* :func:`summarize`, :func:`render_markdown`, :func:`plot_curves`: the tables, report.md and
  the curve figure.

Differences are in log-perplexity (token-mean NLL, nats): ``arm - lm`` per seed, negative
when the arm's held-out perplexity is lower; ``exp`` of a difference is a perplexity ratio.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HELPS, HURTS, NO_EVIDENCE = "helps", "hurts", "no evidence"


# ------------------------------------------------------------------------ t quantiles


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``.

    Examples:
        >>> round(betainc(2.0, 3.0, 0.4), 10)  # 1 - sum_{j<2} C(4, j) 0.4^j 0.6^(4-j)
        0.5248
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df`` degrees of freedom.

    Examples:
        >>> t_cdf(0.0, 4), round(t_cdf(1.0, 1), 12)  # Cauchy: 1/2 + atan(1)/pi
        (0.5, 0.75)
    """
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (to ~1e-12).

    Examples:
        >>> round(t_quantile(0.975, 4), 6), round(t_quantile(0.975, 9), 6)
        (2.776445, 2.262157)
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], alpha: float = 0.05) -> dict[str, float]:
    """The mean of ``values`` (one per seed) and its two-sided ``1 - alpha`` t-interval:
    ``mean -+ t(1 - alpha/2, n - 1) * sd / sqrt(n)`` with the sample standard deviation.

    Examples:
        >>> ci = t_interval([1.0, 2.0, 3.0])
        >>> ci["mean"], round(ci["low"], 4), round(ci["high"], 4)  # 2 -+ 4.3027 / sqrt(3)
        (2.0, -0.4841, 4.4841)
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 2:
        raise ValueError(f"t_interval: needs at least 2 values, got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval: non-finite values {x.tolist()}")
    mean = float(x.mean())
    sd = float(x.std(ddof=1))
    q = t_quantile(1.0 - alpha / 2.0, n - 1)
    half = q * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "t": q, "half": half, "low": mean - half,
            "high": mean + half}  # fmt: skip


def paired_bootstrap(
    arm: np.ndarray,
    ref: np.ndarray,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """A percentile interval of the paired mean difference ``arm - ref``.

    ``arm`` and ``ref`` are ``[seeds, windows]`` per-window token-mean NLLs of the same
    held-out windows. Each resample draws seeds with replacement and, independently,
    windows with replacement (the same windows for both arms: paired), and averages the
    differences; so the interval reflects both the training noise (seeds) and the finite
    held-out set (windows). With few seeds the seed level is coarse: the t-interval over
    seeds is the primary interval.
    """
    d = np.asarray(arm, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 2:
        raise ValueError(f"paired_bootstrap: expected [seeds >= 2, windows], got {d.shape}")
    rng = np.random.default_rng(seed)
    s, w = d.shape
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory: 256 x seeds x windows
        b = min(256, resamples - start)
        si = rng.integers(0, s, size=(b, s))
        wi = rng.integers(0, w, size=(b, w))
        means[start : start + b] = d[si[:, :, None], wi[:, None, :]].mean(axis=(1, 2))
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high),
            "resamples": resamples}  # fmt: skip


def verdict(low: float, high: float) -> str:
    """``helps`` when the whole interval of ``arm - lm`` lies below 0 (lower held-out
    perplexity), ``hurts`` when it lies above 0, else ``no evidence``.

    Examples:
        >>> verdict(-0.3, -0.1), verdict(0.05, 0.2), verdict(-0.1, 0.1)
        ('helps', 'hurts', 'no evidence')
    """
    if high < 0:
        return HELPS
    if low > 0:
        return HURTS
    return NO_EVIDENCE


def pct(log_ratio: float) -> str:
    """A log-perplexity difference as a signed percent change of perplexity."""
    return f"{100.0 * math.expm1(log_ratio):+.1f}%"


# ---------------------------------------------------------------------- the tables

KV_ARMS = ("kv_mse", "kv_cosine")
CONTROLS = ("ctrl_random_proj", "ctrl_shuffled_map", "ctrl_random_teacher")
#: What each control takes away from the KV arm it is compared with.
REMOVES = {
    "ctrl_random_proj": "a trained projector",
    "ctrl_shuffled_map": "the matching layer map",
    "ctrl_random_teacher": "a pretrained teacher",
}


def summarize(
    nll: dict[str, dict[int, float]],
    windows: dict[str, dict[int, np.ndarray]] | None,
    alpha: float,
    reference: str = "lm",
    control_of: str | None = "kv_mse",
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The study's tables from the final held-out NLLs.

    Args:
        nll: ``{arm: {seed: token-mean NLL over the whole held-out set}}``.
        windows: ``{arm: {seed: per-window NLLs}}`` for the bootstrap (None: no bootstrap).
        alpha: two-sided level of every interval.
        reference: the arm the others are compared with (``lm``).
        control_of: the KV arm the controls are compared with as well (the arm with the
            controls' loss), or None.

    Returns:
        ``{"arms": {arm: perplexity interval}, "vs_reference": {arm: paired difference},
        "vs_controls": {"kv - ctrl": paired difference}, "seeds", "alpha"}``; each paired
        difference holds the t-interval of the per-seed log-perplexity differences, its
        verdict, the perplexity ratio and its interval, how many seeds improved, and the
        bootstrap interval.
    """
    arms = list(nll)
    seeds = sorted(nll[reference])
    for arm in arms:
        if sorted(nll[arm]) != seeds:
            raise ValueError(f"arm {arm!r} has seeds {sorted(nll[arm])}, {reference!r} {seeds}")

    def paired(a: str, b: str) -> dict[str, Any]:
        diffs = [nll[a][s] - nll[b][s] for s in seeds]
        ci = t_interval(diffs, alpha)
        out = {
            "diffs": diffs,
            **{k: ci[k] for k in ("mean", "sd", "low", "high", "t")},
            "ratio": math.exp(ci["mean"]),
            "ratio_low": math.exp(ci["low"]),
            "ratio_high": math.exp(ci["high"]),
            "better_seeds": sum(d < 0 for d in diffs),
            "verdict": verdict(ci["low"], ci["high"]),
        }
        if windows is not None:
            out["bootstrap"] = paired_bootstrap(
                np.stack([windows[a][s] for s in seeds]),
                np.stack([windows[b][s] for s in seeds]),
                alpha,
                resamples,
                seed,
            )
        return out

    table: dict[str, Any] = {"alpha": alpha, "seeds": seeds, "reference": reference}
    table["arms"] = {}
    for arm in arms:
        ppl = [math.exp(nll[arm][s]) for s in seeds]
        ci = t_interval(ppl, alpha)
        table["arms"][arm] = {
            "ppl": ppl,
            "nll": [nll[arm][s] for s in seeds],
            **{k: ci[k] for k in ("mean", "sd", "low", "high")},
        }
    table["vs_reference"] = {arm: paired(arm, reference) for arm in arms if arm != reference}
    table["vs_controls"] = {}
    if control_of in nll:
        for ctrl in CONTROLS:
            if ctrl in nll:
                table["vs_controls"][f"{control_of} - {ctrl}"] = paired(control_of, ctrl)
    return table


def conclusion(table: dict[str, Any], steps: int | None = None) -> list[str]:
    """The result in words, decided by the intervals in ``table`` (:func:`summarize`):
    one headline sentence on KV alignment, then one on its specificity (the controls)."""
    alpha, n, ref = table["alpha"], len(table["seeds"]), table["reference"]
    level = f"{100 * (1 - alpha):g}%"
    vs = table["vs_reference"]
    at = f" after {steps} steps" if steps is not None else ""
    kv = [a for a in KV_ARMS if a in vs]

    def show(arm: str, d: dict) -> str:
        return (
            f"{arm} {pct(d['mean'])} [{pct(d['low'])}, {pct(d['high'])}]"
            f" ({d['better_seeds']}/{n} seeds lower)"
        )

    lines = []
    helped = [a for a in kv if vs[a]["verdict"] == HELPS]
    hurt = [a for a in kv if vs[a]["verdict"] == HURTS]
    ctx = (
        f"held-out perplexity relative to `{ref}` (LM loss alone), {level} t-intervals "
        f"over {n} seeds{at}"
    )
    if not kv:
        lines.append(f"No KV-alignment arm was run; nothing to conclude ({ctx}).")
    elif helped:
        rest = [a for a in kv if a not in helped]
        tail = ""
        if rest:
            tail = "; " + "; ".join(f"{show(a, vs[a])}: {vs[a]['verdict']}" for a in rest)
        lines.append(
            "**KV alignment helped the student**: "
            + "; ".join(show(a, vs[a]) for a in helped)
            + tail
            + f" ({ctx})."
        )
    elif hurt:
        rest = [a for a in kv if a not in hurt]
        tail = ""
        if rest:
            tail = "; " + "; ".join(f"{show(a, vs[a])}: no evidence" for a in rest)
        lines.append(
            "**KV alignment hurt the student**: "
            + "; ".join(show(a, vs[a]) for a in hurt)
            + tail
            + f" ({ctx})."
        )
    else:
        bound = max(-vs[a]["low"] for a in kv)
        lines.append(
            "**No evidence that KV alignment helps or hurts the student**: every KV arm's "
            "interval includes no change ("
            + "; ".join(show(a, vs[a]) for a in kv)
            + f"); at this budget the intervals rule out gains larger than "
            f"{100 * -math.expm1(-bound):.1f}% ({ctx})."
        )
    controls = [c for c in CONTROLS if c in vs]
    if controls:
        parts = [f"{show(c, vs[c])}: {vs[c]['verdict']}" for c in controls]
        lines.append("Controls against `" + ref + "`: " + "; ".join(parts) + ".")
    for key, d in table.get("vs_controls", {}).items():
        arm, ctrl = key.split(" - ")
        numbers = f"{arm} vs {ctrl}: {pct(d['mean'])} [{pct(d['low'])}, {pct(d['high'])}]"
        what = REMOVES.get(ctrl, "what the control changes")
        if arm in helped:
            if d["verdict"] == HELPS:
                words = f"{arm} beat {ctrl} ({numbers}): part of its gain needs {what}"
                own = vs.get(ctrl)
                if own is not None and own["verdict"] == HELPS:
                    share = min(max(own["mean"] / vs[arm]["mean"], 0.0), 1.0)
                    words += (
                        f", but {ctrl} alone already gets {pct(own['mean'])} against `{ref}` "
                        f"({100 * share:.0f}% of {arm}'s change in log-perplexity)"
                    )
                elif own is not None:
                    words = f"{arm} beat {ctrl} ({numbers}): its gain needs {what}"
            elif d["verdict"] == HURTS:
                words = f"{arm} did worse than {ctrl} ({numbers}): its gain does not need {what}"
            else:
                words = (
                    f"{arm} did not beat {ctrl} ({numbers}): its gain is not shown to need {what}"
                )
        elif d["verdict"] == NO_EVIDENCE:
            continue
        else:
            words = (
                f"{arm}'s perplexity was {'lower' if d['verdict'] == HELPS else 'higher'} "
                f"than {ctrl}'s ({numbers}), while {arm} did not beat `{ref}`"
            )
        lines.append(words + ".")
    return lines


def early_stopping_line(table: dict[str, Any], steps: dict[str, dict[int, int]]) -> str:
    """The second look in one sentence: every run stopped at its lowest dev NLL, the paired
    change of held-out perplexity against the reference and its verdict, per arm."""
    ref, n = table["reference"], len(table["seeds"])
    parts = []
    for arm, d in table["vs_reference"].items():
        parts.append(
            f"{arm} {pct(d['mean'])} [{pct(d['low'])}, {pct(d['high'])}] "
            f"({d['better_seeds']}/{n} seeds lower): {d['verdict']}"
        )
    ref_steps = sorted(steps.get(ref, {}).values())
    return (
        "With early stopping instead (each run at the validation with its lowest NLL on the "
        f"dev split; `{ref}` stopped at steps {ref_steps}): " + "; ".join(parts) + "."
    )


def bottom_line(table: dict[str, Any], es_table: dict[str, Any] | None = None) -> str | None:
    """When a KV arm helped at equal steps: whether that is evidence that the teacher's
    knowledge transfers, from the random-teacher control (how much of the best KV arm's
    gain, in log-perplexity, a teacher with random weights already gets) and from the
    early-stopping look (whether a KV arm still helps against the LM-only student stopped
    in time). None when no KV arm helped or neither look was run."""
    vs = table["vs_reference"]
    helped = [a for a in KV_ARMS if a in vs and vs[a]["verdict"] == HELPS]
    if not helped:
        return None
    best = min(helped, key=lambda a: vs[a]["mean"])
    against, towards = [], []
    rt = vs.get("ctrl_random_teacher")
    if rt is not None:
        share = min(max(rt["mean"] / vs[best]["mean"], 0.0), 1.0)
        text = (
            f"a teacher with random weights (`ctrl_random_teacher`) gets {pct(rt['mean'])}, "
            f"{100 * share:.0f}% of {best}'s {pct(vs[best]['mean'])} (in log-perplexity)"
        )
        if share >= 0.5:
            against.append(text + ": most of the gain is the KV loss acting as a regulariser")
        else:
            towards.append(text + ": most of the gain needs the pretrained teacher")
    if es_table is not None:
        es = es_table["vs_reference"]
        verdicts = {a: es[a]["verdict"] for a in helped if a in es}
        listed = "; ".join(
            f"{a} {pct(es[a]['mean'])} [{pct(es[a]['low'])}, {pct(es[a]['high'])}]: {v}"
            for a, v in verdicts.items()
        )
        if verdicts and all(v == HELPS for v in verdicts.values()):
            towards.append(f"the gain survives early stopping of `{table['reference']}` ({listed})")
        elif verdicts and not any(v == HELPS for v in verdicts.values()):
            against.append(
                f"against `{table['reference']}` stopped early on the dev split no KV arm "
                f"helps ({listed})"
            )
    if against:
        return (
            "**Bottom line**: the gain at equal steps is not evidence that the teacher's "
            "knowledge transfers: " + "; ".join(against + towards) + "."
        )
    if towards:
        return "**Bottom line**: KV alignment passes on something: " + "; ".join(towards) + "."
    return None


def study_conclusion(
    table: dict[str, Any], steps: int | None = None, early: dict[str, Any] | None = None
) -> list[str]:
    """Every sentence of the report's opening: :func:`conclusion` at equal steps, the
    early-stopping look (``early``: ``{"table", "steps"}``) and the :func:`bottom_line`."""
    words = conclusion(table, steps)
    if early:
        words.append(early_stopping_line(early["table"], early["steps"]))
    line = bottom_line(table, early["table"] if early else None)
    if line:
        words.append(line)
    return words


def rerender(run_dir: str | Path) -> dict[str, Any]:
    """Rewrite a finished study's report.md (and the sentences in its results.json) from
    its results.json, with this module's words; the numbers are the run's."""
    path = Path(run_dir) / "results.json"
    result = json.loads(path.read_text())
    for key in ("nll",):
        result[key] = {a: {int(s): v for s, v in d.items()} for a, d in result[key].items()}
    for key in ("curves", "dev_curves"):
        result[key] = {
            a: {int(st): {int(s): v for s, v in d.items()} for st, d in c.items()}
            for a, c in (result.get(key) or {}).items()
        }
    early = result.get("early_stopping")
    if early:
        early["steps"] = {a: {int(s): v for s, v in d.items()} for a, d in early["steps"].items()}
    result["conclusion"] = study_conclusion(result["table"], result["setup"]["steps"], early)
    path.write_text(json.dumps(result, indent=1) + "\n")
    (Path(run_dir) / "report.md").write_text(render_markdown(result))
    return result


def _fmt_ci(mean: float, low: float, high: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table_lines(table: dict[str, Any]) -> list[str]:
    """The A/B table as Markdown lines (also what the log prints)."""
    level = f"{100 * (1 - table['alpha']):g}%"
    n = len(table["seeds"])
    ref = table["reference"]
    has_boot = any("bootstrap" in d for d in table["vs_reference"].values())
    head = (
        f"| arm | val ppl, mean [{level} CI] | Δ log-ppl vs {ref} [{level} CI] | "
        f"ppl ratio vs {ref} [{level} CI] | seeds lower |"
        + (" bootstrap Δ [CI] |" if has_boot else "")
        + " verdict |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, a in table["arms"].items():
        ppl = _fmt_ci(a["mean"], a["low"], a["high"])
        if arm == ref:
            row = f"| `{arm}` | {ppl} | (reference) | 1 | - |" + (" - |" if has_boot else "")
            lines.append(row + " - |")
            continue
        d = table["vs_reference"][arm]
        row = (
            f"| `{arm}` | {ppl} | {_fmt_ci(d['mean'], d['low'], d['high'], 4)} | "
            f"{_fmt_ci(d['ratio'], d['ratio_low'], d['ratio_high'], 4)} | "
            f"{d['better_seeds']}/{n} |"
        )
        if has_boot:
            b = d.get("bootstrap")
            row += f" {_fmt_ci(b['mean'], b['low'], b['high'], 4)} |" if b else " - |"
        lines.append(row + f" {d['verdict']} |")
    return lines


def control_lines(table: dict[str, Any]) -> list[str]:
    """The KV arm against each control, as Markdown lines (empty without controls)."""
    if not table.get("vs_controls"):
        return []
    level = f"{100 * (1 - table['alpha']):g}%"
    n = len(table["seeds"])
    lines = [
        f"| comparison | Δ log-ppl [{level} CI] | ppl ratio [{level} CI] | seeds lower | verdict |",
        "|---|---|---|---|---|",
    ]
    for key, d in table["vs_controls"].items():
        lines.append(
            f"| `{key}` | {_fmt_ci(d['mean'], d['low'], d['high'], 4)} | "
            f"{_fmt_ci(d['ratio'], d['ratio_low'], d['ratio_high'], 4)} | "
            f"{d['better_seeds']}/{n} | {d['verdict']} |"
        )
    return lines


def per_seed_lines(nll: dict[str, dict[int, float]]) -> list[str]:
    """Every run's held-out perplexity: one row per seed, one column per arm."""
    arms = list(nll)
    seeds = sorted(next(iter(nll.values())))
    lines = ["| seed | " + " | ".join(f"`{a}`" for a in arms) + " |", "|---|" + "---|" * len(arms)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{math.exp(nll[a][s]):.4f}" for a in arms) + " |")
    return lines


def curve_lines(
    curves: dict[str, dict[int, dict[int, float]]], reference: str, alpha: float
) -> list[str]:
    """Mean held-out perplexity per arm at each validation, and each arm's paired
    log-perplexity difference to the reference there (t-interval over seeds)."""
    arms = list(curves)
    steps = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    if not steps:
        return []
    lines = [
        "| step | " + " | ".join(f"`{a}`" for a in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for step in steps:
        cells = []
        for arm in arms:
            seeds = sorted(curves[arm][step])
            ppl = float(np.mean([math.exp(curves[arm][step][s]) for s in seeds]))
            if arm == reference or len(seeds) < 2:
                cells.append(f"{ppl:.3f}")
                continue
            diffs = [curves[arm][step][s] - curves[reference][step][s] for s in seeds]
            ci = t_interval(diffs, alpha)
            cells.append(f"{ppl:.3f} ({pct(ci['mean'])} [{pct(ci['low'])}, {pct(ci['high'])}])")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """report.md from the study's result (what :mod:`fastcore.train.kv_study` writes)."""
    t = result["table"]
    level = f"{100 * (1 - t['alpha']):g}%"
    setup = result["setup"]
    teacher = result["teacher"]
    data = result["data"]
    out = [
        "# Does KV alignment help a student? (fastcore kv_study)",
        "",
        *[f"{line}" for line in result["conclusion"]],
        "",
        f"## Held-out perplexity after {setup['steps']} steps ({len(t['seeds'])} seeds)",
        "",
        *table_lines(t),
        "",
        f"Δ log-ppl: per seed, the arm's held-out token-mean NLL minus `{t['reference']}`'s "
        f"(nats; negative = lower perplexity); its {level} t-interval over seeds decides the "
        "verdict (`helps`: the interval lies below 0, `hurts`: above 0, else `no evidence`). "
        "The ppl ratio is exp(Δ). The bootstrap column resamples seeds and held-out windows "
        "(paired, "
        f"{setup['bootstrap']} resamples) as a second look. Each comparison is at level "
        f"alpha = {t['alpha']:g} on its own (no multiplicity correction).",
        "",
    ]
    ctrl = control_lines(t)
    if ctrl:
        out += ["### The KV arm against its controls", "", *ctrl, ""]
    es = result.get("early_stopping")
    if es:
        out += [
            "### A second look: early stopping on the dev split",
            "",
            "Each run taken at the validation (every "
            f"{setup.get('eval_every', '?')} steps) where its NLL on the dev split (sentences "
            "no model trains on, disjoint from the held-out ones) is lowest; the held-out "
            "perplexity there. This answers whether KV alignment beats simply stopping the "
            "LM-only student in time.",
            "",
            *table_lines(es["table"]),
            "",
            "Steps chosen: "
            + "; ".join(
                f"`{arm}` {sorted(by_seed.values())}" for arm, by_seed in es["steps"].items()
            )
            + ".",
            "",
        ]
        ctrl = control_lines(es["table"])
        if ctrl:
            out += [*ctrl, ""]
    out += ["### Every run (held-out perplexity)", "", *per_seed_lines(result["nll"]), ""]
    curve = curve_lines(result["curves"], t["reference"], t["alpha"])
    if curve:
        out += [
            "### Along the way",
            "",
            "Mean held-out perplexity at each validation (and the paired change against "
            f"`{t['reference']}`, {level} t-interval over seeds):",
            "",
            *curve,
            "",
        ]
        if result.get("plot"):
            out += [f"![held-out perplexity vs step]({result['plot']})", ""]
    w = setup["kv_weights"]
    out += [
        "## Setup",
        "",
        f"- Teacher: tiny Qwen2 ({teacher['params']:,} params, {teacher['layers']} layers, "
        f"{teacher['kv_heads']} KV heads of {teacher['head_dim']}), pretrained with the LM "
        f"loss on the training text for {teacher['steps']} steps "
        f"({'reused from ' + teacher['path'] if teacher['reused'] else 'trained in this run'}): "
        f"held-out perplexity **{teacher['ppl']:.3f}** (students at step 0: "
        f"{setup['init_ppl']:.1f}; uniform over the vocabulary: {data['vocab']}"
        + (
            f"; the random teacher of `ctrl_random_teacher`, the same model before "
            f"pretraining: {teacher['random_ppl']:.1f}"
            if "random_ppl" in teacher
            else ""
        )
        + ").",
        f"- Students: tiny Qwen2 ({setup['student_params']:,} params, {setup['student_layers']} "
        f"layers, {setup['student_kv_heads']} KV heads of {setup['student_head_dim']}); per "
        "seed every arm starts from the same student weights (and the KV arms from the same "
        "projector weights) and sees the same batches in the same order; "
        f"{setup['steps']} optimizer steps of {setup['batch_size']} windows of "
        f"{data['seq_len']} tokens, AdamW lr {setup['lr']:g} (warm-up {setup['warmup']} "
        f"steps, cosine), weight decay {setup['weight_decay']:g}, "
        f"{'no gradient clipping' if setup['grad_clip'] is None else 'clip ' + str(setup['grad_clip'])}.",
        f"- Optimizer: {setup['optimizer_note']}",
        f"- Arms: {'; '.join(f'`{a}`: {d}' for a, d in setup['arm_docs'].items())}.",
        f"- KV weights (fixed before training, {w['how']}): mse {w['mse']:.4g}, cosine "
        f"{w['cosine']:.4g}; at init the LM loss was {w['lm_init']:.3f} and the KV losses "
        f"mse {w['kv_init']['mse']:.4g}, cosine {w['kv_init']['cosine']:.4g}. The controls "
        f"use the `{setup['control_loss']}` loss and weight"
        + (
            f"; `ctrl_random_teacher` the weight the same rule gives against the random "
            f"teacher: {w['random']:.4g} (its KV loss at init {w['kv_init']['random']:.4g})"
            if "random" in w
            else ""
        )
        + ".",
        f"- Layer maps: default {setup['layer_map']}, shuffled {setup['shuffled_map']}.",
        f"- Data: {data['docs']} generated sentences (seed {data['seed']}), split by sentence "
        f"text: {data['train_sentences']} distinct training sentences "
        f"({data['train_tokens']:,} tokens; {data['student_text']}), "
        f"{data['val_sentences']} distinct held-out sentences ({data['val_tokens']:,} tokens; "
        f"{data['val_windows']} windows tile them)"
        + (
            f", {data['dev_sentences']} distinct dev sentences ({data['dev_tokens']:,} tokens, "
            f"{data['dev_windows']} windows; no model trains on them)"
            if data.get("dev_sentences")
            else ""
        )
        + f"; {data['shared_sentences']} sentences on two sides. {data['overlap_text']}",
        f"- Pairing check: at step 0 the arms of each seed score the same held-out NLL "
        f"(largest spread {setup['step0_spread']:.3g} nats).",
        f"- Runtime: {result['runtime']['total_s']:.0f} s in all (teacher "
        f"{result['runtime']['teacher_s']:.0f} s, study {result['runtime']['study_s']:.0f} s) "
        f"on {result['runtime']['threads']} thread(s); {result['runtime']['machine']}.",
        "",
        "Every number above is in `results.json` (per run: final NLL, per-window NLLs, the curve).",
        "",
    ]
    return "\n".join(out)


def plot_curves(
    curves: dict[str, dict[int, dict[int, float]]],
    path: Path,
    teacher_ppl: float | None = None,
    reference: str = "lm",
    alpha: float = 0.05,
) -> bool:
    """Two panels as a PNG: mean held-out perplexity vs step per arm (the seed range
    shaded; step 0, where every arm scores the same, left out), and each arm's paired
    perplexity ratio to ``reference`` with its t-interval over seeds. False when matplotlib
    is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, by_step in curves.items():
        steps = [s for s in sorted(by_step) if s > 0]
        if not steps:
            continue
        seeds = sorted(by_step[steps[0]])
        ppl = np.array([[math.exp(by_step[s][k]) for k in seeds] for s in steps])
        (line,) = ax.plot(steps, ppl.mean(1), marker="o", ms=3, label=arm)
        ax.fill_between(steps, ppl.min(1), ppl.max(1), alpha=0.15, color=line.get_color())
        if arm == reference or reference not in curves or len(seeds) < 2:
            continue
        ref = curves[reference]
        cis = [t_interval([by_step[s][k] - ref[s][k] for k in seeds], alpha) for s in steps]
        bx.plot(steps, [math.exp(c["mean"]) for c in cis], marker="o", ms=3,
                color=line.get_color(), label=arm)  # fmt: skip
        bx.fill_between(steps, [math.exp(c["low"]) for c in cis],
                        [math.exp(c["high"]) for c in cis], alpha=0.15,
                        color=line.get_color())  # fmt: skip
    if teacher_ppl is not None:
        ax.axhline(teacher_ppl, color="k", ls="--", lw=1, label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out perplexity (mean; seed range)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    bx.axhline(1.0, color="k", lw=1)
    bx.set_xlabel("optimizer step")
    bx.set_ylabel(f"perplexity / {reference}'s (paired; {100 * (1 - alpha):g}% CI)")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":  # python -m fastcore.train.kv_study_report RUN_DIR
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fastcore.train.kv_study_report RUN_DIR")
    for line in rerender(sys.argv[1])["conclusion"]:
        print(line)
