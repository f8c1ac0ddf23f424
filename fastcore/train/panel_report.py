"""Rolling-origin evaluation of the panel job and its report:
``python -m fastcore.train.panel_report --run DIR``.

The ``panel`` job (:mod:`fastcore.train.panel`) scores its forecaster here, at every
validation (``val_nll``, ``val_mae``, ...) and for ``evaluate --split test``, and writes the
report at the end of training. The report reads a finished run (its ``config.yaml`` and a
checkpoint, ``best.pt`` by default), forecasts every rolling origin of the test period
(every ``data.eval.every`` steps, H lead times each) with the model and with the baselines
of :mod:`fastcore.models.panel` on the same origins and targets, and writes into the run
directory:

* ``report.json``: every number below, per method (the model, persistence, seasonal naive
  when the series is a period longer than the test's first origin, the training mean,
  the neighbour blend): overall, per lead time and per node, on the test split (and
  overall on the validation split);
* ``report.md`` and ``report.html``: the tables, the baselines' fitted parameters, and
  ``forecasts.png`` (truth and forecasts with their 50% / 90% intervals at a few nodes),
  ``horizon.png`` (NLL, RMSE, CRPS by lead time) and ``training.png`` (loss curves).

Metrics, in the series' original units, over the observed targets (missing ones are
masked): ``nll`` (mean negative log-likelihood per target under the head's family: a log
pmf for counts, a log density for the Gaussian), ``mae`` and ``rmse`` of the point
forecast (``data.eval.point``: the mean, the median or a quantile; a baseline's point is
its own value), ``crps`` (exact, :func:`fastcore.metrics.crps`), and for each level l of
``data.eval.levels`` the coverage and mean width of the central l-interval.

A baseline's distribution is of the head's family, fitted on the training split's windows
by maximum likelihood (:func:`fastcore.models.panel.fit_distribution`): a Gaussian with a
scale per lead time and node, or a count distribution with mean ``point + delta`` and its
dispersion per lead time.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fastcore import metrics
from fastcore.data.panel import PanelBatch, PanelData, PanelWindows
from fastcore.models.panel import (
    BaselineDistribution,
    fit_blend_weight,
    fit_distribution,
    neighbour_blend,
    neighbour_mean,
    persistence,
    seasonal_naive,
    training_mean,
)

MODEL = "fastcore"
BACKBONE = "fastcore_backbone"
"""The report's ablation row: the trained model's backbone without the network's corrections."""
BASELINES = ("persistence", "seasonal_naive", "training_mean", "neighbour_blend")
EVAL_BATCH = 64
PLOT_ORIGINS = 120
"""The forecast plot shows at most this many (the last) test origins."""


@dataclass
class PanelSetup:
    """What evaluating a panel forecaster needs besides the model (built by the job)."""

    panel: PanelData
    distribution: str
    lookback: int
    horizon: int
    every: int = 1
    point: str = "mean"
    quantile: float = 0.5
    levels: tuple[float, ...] = (0.5, 0.9)
    period: int | None = None
    blend_weight: float | None = None
    names: list[str] = field(default_factory=list)
    source: str = ""
    plot_nodes: int = 4

    def stride(self, split: str) -> int:
        """Origins every ``every`` steps on the test split, every step elsewhere."""
        return self.every if split == "test" else 1

    def origins(self, split: str) -> Tensor:
        return self.panel.split_origins(split, self.lookback, self.horizon, self.stride(split))


class SplitWindows(Dataset):
    """A split's :class:`~fastcore.data.panel.PanelWindows` with the :class:`PanelSetup`
    they belong to (items: the window dicts, batched by ``PanelBatch.collate``)."""

    def __init__(self, windows: PanelWindows, setup: PanelSetup) -> None:
        self.windows, self.setup = windows, setup

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.windows[i]

    @property
    def panel(self) -> PanelData:
        return self.windows.panel


def level_name(level: float) -> str:
    """``0.9`` -> ``"90"``, ``0.975`` -> ``"97_5"`` (metric names)."""
    return f"{level * 100:g}".replace(".", "_")


def metric_names(levels) -> tuple[str, ...]:
    """The names :func:`score_split` reports."""
    names = ["nll", "mae", "rmse", "crps"]
    for level in levels:
        names += [f"coverage_{level_name(level)}", f"width_{level_name(level)}"]
    return tuple(names)


# ---------------------------------------------------------------------------------------
# Forecasts
# ---------------------------------------------------------------------------------------


def model_inputs(batch: PanelBatch, raw: Tensor) -> dict[str, Tensor | None]:
    """The forecaster's keyword arguments for a batch; ``raw [T, N, C]`` is the panel's raw
    series on the batch's device (``x_raw`` is gathered from it)."""
    return {
        "x": batch.x,
        "x_raw": raw[batch.time_x],
        "season_x": batch.season_x,
        "season_y": batch.season_y,
        "cov_x": batch.cov_x,
        "cov_y": batch.cov_y,
    }


@torch.no_grad()
def forecast(
    model: nn.Module,
    setup: PanelSetup,
    origins: Tensor,
    device: torch.device | str = "cpu",
    backbone: bool = False,
) -> dict[str, Tensor]:
    """The model's parameters ``{name: [W, H, N, C]}`` (float64, CPU) at ``origins``
    (``backbone``: its backbone alone, ``PanelForecaster.combine(None, ...)``)."""
    was_training = model.training
    model.eval()
    raw = setup.panel.raw.to(device)
    out: dict[str, list[Tensor]] = {}
    try:
        for chunk in origins.split(EVAL_BATCH):
            batch = setup.panel.window_batch(chunk, setup.lookback, setup.horizon).to(device)
            inputs = model_inputs(batch, raw)
            if backbone:
                params = model.combine(None, inputs["x_raw"], inputs["season_y"])
            else:
                params = model(**inputs)
            for k, v in params.items():
                out.setdefault(k, []).append(v.detach().double().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def targets(setup: PanelSetup, origins: Tensor) -> Tensor:
    """``[W, H, N, C]`` raw targets at ``origins`` (NaN where missing)."""
    ahead = origins[:, None] + torch.arange(1, setup.horizon + 1)[None, :]
    return setup.panel.raw[ahead].double()


def distribution_mean(dist: str, params: dict[str, Tensor]) -> Tensor:
    if dist == "gaussian":
        return params["loc"]
    if dist == "poisson":
        return params["log_rate"].exp()
    mu = params["log_mu"].exp()
    return mu if dist == "nb" else torch.sigmoid(-params["pi_logits"]) * mu


def point_forecast(dist: str, params: dict[str, Tensor], kind: str, q: float) -> Tensor:
    """The point forecast ``kind`` (``mean``, ``median``, ``quantile`` at level ``q``)."""
    if kind == "mean":
        return distribution_mean(dist, params)
    level = 0.5 if kind == "median" else q
    return metrics.distribution_quantile(dist, params, level)


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------


def _on_distinct(fn, tensors: list[Tensor]) -> Tensor:
    """``fn(*tensors)`` (elementwise, any same-shape float64 tensors), evaluated once per
    distinct tuple of values and scattered back: exact, and far cheaper for the baselines,
    whose parameters and targets repeat (a count quantile or CRPS scans the integers)."""
    shape = tensors[0].shape
    rows = torch.stack([t.reshape(-1) for t in tensors], 1)
    if rows.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.float64)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    values = fn(*distinct.unbind(1))
    return values[inverse].reshape(shape)


def elementwise(
    dist: str, params: dict[str, Tensor], point: Tensor, obs: Tensor, levels
) -> dict[str, Tensor]:
    """Per-target scores ``[W, H, N, C]`` (float64; 0 where not ``valid``) and ``valid``."""
    valid = torch.isfinite(obs)
    y = torch.where(valid, obs, torch.zeros((), dtype=obs.dtype))
    names = list(params)
    p = [params[k].double().expand(obs.shape) for k in names]
    zero = torch.zeros((), dtype=torch.float64)

    def nll(*values: Tensor) -> Tensor:
        return -metrics.log_prob(dist, dict(zip(names, values[:-1], strict=True)), values[-1])

    def crps(*values: Tensor) -> Tensor:
        return metrics.crps(
            dist, dict(zip(names, values[:-1], strict=True)), values[-1], reduction="none"
        )

    def quantile(q: float):
        return lambda *values: metrics.distribution_quantile(
            dist, dict(zip(names, values, strict=True)), q
        )

    out = {
        "valid": valid,
        "nll": torch.where(valid, _on_distinct(nll, [*p, y]), zero),
        "ae": torch.where(valid, (point.double() - y).abs(), zero),
        "se": torch.where(valid, (point.double() - y).square(), zero),
        "crps": torch.where(valid, _on_distinct(crps, [*p, y]), zero),
    }
    for level in levels:
        lo = _on_distinct(quantile((1 - level) / 2), p)
        hi = _on_distinct(quantile((1 + level) / 2), p)
        name = level_name(level)
        out[f"inside_{name}"] = torch.where(valid, ((lo <= y) & (y <= hi)).double(), zero)
        out[f"width_{name}"] = torch.where(valid, hi - lo, zero)
    return out


def aggregate(scores: dict[str, Tensor], levels, dims: tuple[int, ...]) -> dict[str, Tensor]:
    """Means over ``dims`` of the elementwise scores, as the metrics of
    :func:`metric_names` (``rmse`` = sqrt of the mean squared error)."""
    count = scores["valid"].double().sum(dims)
    safe = count.clamp_min(1)

    def mean(name: str) -> Tensor:
        m = scores[name].sum(dims) / safe
        return torch.where(count > 0, m, torch.full_like(m, math.nan))

    out = {"nll": mean("nll"), "mae": mean("ae"), "rmse": mean("se").sqrt(), "crps": mean("crps")}
    for level in levels:
        name = level_name(level)
        out[f"coverage_{name}"] = mean(f"inside_{name}")
        out[f"width_{name}"] = mean(f"width_{name}")
    out["count"] = count
    return out


def summarize(scores: dict[str, Tensor], levels) -> dict:
    """Overall, per lead time and per node (channels pooled) as plain floats / lists."""

    def plain(values: dict[str, Tensor]) -> dict:
        return {
            k: (float(v) if v.dim() == 0 else [None if math.isnan(x) else x for x in v.tolist()])
            for k, v in values.items()
        }

    return {
        "overall": plain(aggregate(scores, levels, (0, 1, 2, 3))),
        "by_horizon": plain(aggregate(scores, levels, (0, 2, 3))),
        "by_node": plain(aggregate(scores, levels, (0, 1, 3))),
    }


def model_scores(
    model: nn.Module,
    setup: PanelSetup,
    split: str,
    device: torch.device | str = "cpu",
    levels: tuple[float, ...] | None = None,
    backbone: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """``(elementwise scores, params, point)`` of the model (or its ``backbone``) on a
    split's rolling origins (interval scores at ``levels``, default the setup's)."""
    origins = setup.origins(split)
    params = forecast(model, setup, origins, device, backbone)
    point = point_forecast(setup.distribution, params, setup.point, setup.quantile)
    obs = targets(setup, origins)
    levels = setup.levels if levels is None else levels
    return elementwise(setup.distribution, params, point, obs, levels), params, point


def score_split(
    model: nn.Module, setup: PanelSetup, split: str, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """The model's overall metrics (:func:`metric_names`) on a split: the job's
    ``evaluate`` hook (``val_nll``, ``test_rmse``, ...) and the report's model row."""
    scores, _, _ = model_scores(model, setup, split, device)
    overall = aggregate(scores, setup.levels, (0, 1, 2, 3))
    return {k: float(v) for k, v in overall.items() if k != "count"}


# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------


@dataclass
class Baseline:
    """A baseline's point forecasts on a split and its fitted distribution."""

    name: str
    point: Tensor  # [W, H, N, C]
    distribution: BaselineDistribution
    fit: dict

    def params(self) -> dict[str, Tensor]:
        return self.distribution.params(self.point)


def baseline_points(setup: PanelSetup, origins: Tensor, blend_weight: float | None = None):
    """``{name: [W, H, N, C]}``: the baselines' point forecasts at ``origins`` (a name is
    left out when it cannot forecast them: the seasonal naive without a period, or before
    the series is a period long). ``blend_weight`` None: 0.5."""
    panel = setup.panel
    raw = panel.raw
    start, stop = panel.split_bounds("train")
    mean = training_mean(raw, start, stop)
    out = {"persistence": persistence(raw, origins, setup.horizon, mean)}
    if setup.period is not None:
        first = int(origins.min()) + 1 - setup.period if origins.numel() else -1
        if first >= 0:
            out["seasonal_naive"] = seasonal_naive(raw, origins, setup.horizon, setup.period, mean)
    out["training_mean"] = mean.expand(origins.numel(), setup.horizon, -1, -1).clone()
    own = out["persistence"]
    nbr = neighbour_mean(own, panel.edge_index)
    out["neighbour_blend"] = neighbour_blend(
        own, nbr, 0.5 if blend_weight is None else blend_weight
    )
    return out


def fit_baselines(setup: PanelSetup) -> tuple[dict[str, BaselineDistribution], dict]:
    """Each baseline's distribution (and the blend weight, unless the setup fixes it),
    fitted on the training split's windows (every origin; for the seasonal naive, those a
    period after the series' start)."""
    panel = setup.panel
    origins = setup.origins("train")
    obs = targets(setup, origins)
    weight = setup.blend_weight
    if weight is None:
        own = persistence(
            panel.raw,
            origins,
            setup.horizon,
            training_mean(panel.raw, *panel.split_bounds("train")),
        )
        weight = fit_blend_weight(own, neighbour_mean(own, panel.edge_index), obs)
    fits: dict[str, dict] = {
        "neighbour_blend": {"weight": weight, "weight_fitted": setup.blend_weight is None}
    }
    points = baseline_points(setup, origins, weight)
    fit_targets = dict.fromkeys(points, obs)
    fitted_on = dict.fromkeys(points, "train")
    if setup.period is not None and "seasonal_naive" not in points:
        # the training windows a period after the series' start; without any (a series
        # barely two periods long), the validation windows: the past of the test period
        for split in ("train", "val"):
            if split not in panel.splits:
                continue
            some = setup.origins(split)
            some = some[some + 1 - setup.period >= 0]
            if some.numel():
                points["seasonal_naive"] = baseline_points(setup, some, weight)["seasonal_naive"]
                fit_targets["seasonal_naive"] = targets(setup, some)
                fitted_on["seasonal_naive"] = split
                break
    dists = {}
    for name, point in points.items():
        dists[name] = fit_distribution(setup.distribution, point, fit_targets[name])
        fits.setdefault(name, {}).update(_describe_fit(dists[name], int(point.shape[0])))
        fits[name]["fitted_on"] = fitted_on[name]
    return dists, fits


def _describe_fit(dist: BaselineDistribution, windows: int) -> dict:
    out: dict = {"windows": windows}
    if dist.sigma is not None:
        out["sigma_mean_by_horizon"] = dist.sigma.mean((1, 2)).tolist()
    if dist.delta is not None:
        out["delta_by_horizon"] = dist.delta.mean((1, 2)).tolist()
    if dist.log_theta is not None:
        out["theta_by_horizon"] = dist.log_theta.exp().mean((1, 2)).tolist()
    if dist.pi_logits is not None:
        out["pi_by_horizon"] = torch.sigmoid(dist.pi_logits).mean((1, 2)).tolist()
    return out


def baselines(
    setup: PanelSetup, split: str, fitted: tuple[dict, dict] | None = None
) -> tuple[dict[str, Baseline], dict]:
    """The baselines on a split's rolling origins, with their fitted distributions
    (``fitted``: :func:`fit_baselines`' result, computed when None)."""
    dists, fits = fit_baselines(setup) if fitted is None else fitted
    origins = setup.origins(split)
    points = baseline_points(setup, origins, fits["neighbour_blend"]["weight"])
    out = {}
    for name, point in points.items():
        if name in dists:
            out[name] = Baseline(name, point.double(), dists[name], fits[name])
    return out, fits


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def evaluate(model: nn.Module, setup: PanelSetup, device: torch.device | str = "cpu") -> dict:
    """Everything the report shows: the model and every baseline on the test split
    (overall, per lead time, per node) and the validation split (overall), plus what the
    plots need under ``"_arrays"`` (not JSON)."""
    results: dict = {"methods": {}, "val": {}}
    arrays: dict = {}
    fitted = fit_baselines(setup)
    for split in ("val", "test"):
        levels = setup.levels if split == "test" else ()  # validation: overall scores only
        scores, params, point = model_scores(model, setup, split, device, levels)
        bases, fits = baselines(setup, split, fitted)
        obs = targets(setup, setup.origins(split))
        rows = {
            MODEL: (scores, params, point),
            BACKBONE: model_scores(model, setup, split, device, levels, backbone=True),
        }
        for name, base in bases.items():
            p = base.params()
            rows[name] = (
                elementwise(setup.distribution, p, base.point, obs, levels),
                p,
                base.point,
            )
        for name, (s, p, pt) in rows.items():
            if split == "test":
                results["methods"][name] = summarize(s, setup.levels)
                arrays[name] = (p, pt)
            else:
                results["val"][name] = summarize(s, ())["overall"]
        if split == "test":
            results["baseline_fit"] = fits
            arrays["_obs"] = obs
            arrays["_origins"] = setup.origins(split)
    results["_arrays"] = arrays
    return results


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000 or (0 < abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def curves(run_dir: Path) -> tuple[list, list]:
    train, val = {}, {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and "loss" in row:
            train[row["step"]] = row["loss"]
        elif row.get("kind") == "val" and "val_nll" in row:
            val[row["step"]] = row["val_nll"]
    return sorted(train.items()), sorted(val.items())


def plot_nodes(setup: PanelSetup, obs: Tensor) -> list[int]:
    """The nodes the forecast plot shows: the largest test totals (ties by index)."""
    total = torch.nan_to_num(obs, nan=0.0).sum((0, 1, 3))
    order = sorted(range(total.numel()), key=lambda n: (-float(total[n]), n))
    return order[: max(1, min(setup.plot_nodes, total.numel()))]


def plots(out: Path, setup: PanelSetup, results: dict, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = results["_arrays"]
    obs, origins = arrays["_obs"], arrays["_origins"]
    dist = setup.distribution
    names = setup.names
    written = []

    nodes = plot_nodes(setup, obs)
    leads = sorted({0, setup.horizon - 1})
    params, point = arrays[MODEL]
    persist = arrays["persistence"][1]
    if origins.numel() > PLOT_ORIGINS:  # a long test period: its last PLOT_ORIGINS origins
        keep = slice(origins.numel() - PLOT_ORIGINS, None)
        origins, obs, point, persist = origins[keep], obs[keep], point[keep], persist[keep]
        params = {k: v[keep] for k, v in params.items()}
    fig, axes = plt.subplots(
        len(nodes), len(leads), figsize=(6.5 * len(leads), 2.4 * len(nodes)), squeeze=False
    )
    stamps = setup.panel.timestamps()
    for row, n in enumerate(nodes):
        for col, h in enumerate(leads):
            ax = axes[row, col]
            steps = (origins + h + 1).numpy()
            x = stamps[steps] if stamps is not None else steps
            sub = {k: v[:, h, n, 0] for k, v in params.items()}
            for level, alpha in sorted(
                zip(setup.levels, (0.35, 0.2, 0.12, 0.08), strict=False), reverse=True
            ):
                lo = metrics.distribution_quantile(dist, sub, (1 - level) / 2)
                hi = metrics.distribution_quantile(dist, sub, (1 + level) / 2)
                ax.fill_between(
                    x,
                    lo.numpy(),
                    hi.numpy(),
                    color="C0",
                    alpha=alpha,
                    lw=0,
                    label=f"{level:.0%} interval",
                )
            ax.plot(x, persist[:, h, n, 0].numpy(), "C1--", lw=0.8, alpha=0.8, label="persistence")
            ax.plot(x, point[:, h, n, 0].numpy(), "C0-", lw=1.3, label=f"{MODEL} ({setup.point})")
            ax.plot(x, obs[:, h, n, 0].numpy(), "k.", ms=4, label="observed")
            label = names[n] if n < len(names) else f"node {n}"
            ax.set_title(f"{label}, lead {h + 1}", fontsize=9)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "forecasts.png", dpi=100)
    plt.close(fig)
    written.append("forecasts.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    lead = np.arange(1, setup.horizon + 1)
    for ax, metric in zip(axes, ("nll", "rmse", "crps"), strict=True):
        for i, (name, m) in enumerate(results["methods"].items()):
            values = [np.nan if v is None else v for v in m["by_horizon"][metric]]
            style = {MODEL: "o-", BACKBONE: "o:"}.get(name, "s--")
            ax.plot(lead, values, style, color=f"C{i}", label=name, lw=1.5 if name == MODEL else 1)
        ax.set(xlabel="lead time (steps)", title=metric.upper())
        ax.set_xticks(lead)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "horizon.png", dpi=100)
    plt.close(fig)
    written.append("horizon.png")

    train, val = curves(run_dir)
    if train:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        ax.plot([s for s, _ in train], [v for _, v in train], lw=0.8, label="training loss (NLL)")
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation NLL")
        ax.set(xlabel="step", ylabel="NLL per target")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=100)
        plt.close(fig)
        written.append("training.png")
    return written


def markdown(results: dict, setup: PanelSetup, images: list[str]) -> str:
    levels = setup.levels
    methods = results["methods"]
    info = results["info"]
    point_kind = setup.point if setup.point != "quantile" else f"{setup.quantile} quantile"
    lines = [
        "# Panel forecasting report",
        "",
        f"Run `{info['run_dir']}`, checkpoint `{info['checkpoint']}` (step {info['step']}). "
        f"Data: {info['source']} ({info['steps']} steps x {info['nodes']} nodes x "
        f"{info['channels']} channels, {info['edges']} edges); lookback {setup.lookback}, "
        f"horizon {setup.horizon}; head `{setup.distribution}`.",
        "",
        f"Rolling-origin evaluation over the test split, steps {info['test_steps'][0]}.."
        f"{info['test_steps'][1] - 1}: {info['origins']} origins every {setup.every} step(s), "
        f"{info['targets']} observed targets. Metrics in the series' units; NLL per target "
        f"({'log pmf' if setup.distribution != 'gaussian' else 'log density'}), point forecast "
        f"of the model: its {point_kind}; a baseline's point is its own value. Lower is better "
        "except coverage, which should be near its level. "
        f"`{BACKBONE}` is an ablation, not a baseline: the trained model without its "
        "network's corrections (its hhh4-type backbone alone).",
        "",
        "## Test: overall",
        "",
    ]
    header = ["method", "NLL", "MAE", "RMSE", "CRPS"]
    for level in levels:
        header += [f"cover {level:.0%}", f"width {level:.0%}"]
    rows = []
    for name, m in methods.items():
        o = m["overall"]
        row = [f"**{name}**" if name == MODEL else name] + [
            _fmt(o[k]) for k in ("nll", "mae", "rmse", "crps")
        ]
        for level in levels:
            row += [_fmt(o[f"coverage_{level_name(level)}"]), _fmt(o[f"width_{level_name(level)}"])]
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", _verdict(methods), ""]

    lines += ["## Test: by lead time", ""]
    for metric in ("nll", "rmse", "crps"):
        header = ["lead", *methods]
        rows = []
        for h in range(setup.horizon):
            rows.append([str(h + 1)] + [_fmt(m["by_horizon"][metric][h]) for m in methods.values()])
        lines += [f"**{metric.upper()}**", "", *_table(header, rows), ""]

    lines += ["## Test: by node", ""]
    best = min((n for n in methods if n in BASELINES), key=lambda n: methods[n]["overall"]["nll"])
    header = [
        "node",
        "targets",
        f"NLL {MODEL}",
        f"NLL {best}",
        f"RMSE {MODEL}",
        "RMSE persistence",
        f"CRPS {MODEL}",
        f"CRPS {best}",
    ]
    rows = []
    model_nodes = methods[MODEL]["by_node"]
    for n in range(len(model_nodes["nll"])):
        label = setup.names[n] if n < len(setup.names) else str(n)
        rows.append(
            [
                label,
                str(int(model_nodes["count"][n] or 0)),
                _fmt(model_nodes["nll"][n]),
                _fmt(methods[best]["by_node"]["nll"][n]),
                _fmt(model_nodes["rmse"][n]),
                _fmt(methods["persistence"]["by_node"]["rmse"][n]),
                _fmt(model_nodes["crps"][n]),
                _fmt(methods[best]["by_node"]["crps"][n]),
            ]
        )
    lines += [f"(`{best}`: the baseline with the best overall NLL.)", "", *_table(header, rows), ""]

    lines += ["## Validation: overall", ""]
    rows = [
        [f"**{name}**" if name == MODEL else name]
        + [_fmt(o[k]) for k in ("nll", "mae", "rmse", "crps")]
        for name, o in results["val"].items()
    ]
    lines += [*_table(["method", "NLL", "MAE", "RMSE", "CRPS"], rows), ""]

    lines += ["## Baselines", ""]
    fit = results["baseline_fit"]
    blend = fit.get("neighbour_blend", {})
    lines += [
        "- persistence: the last observed value at or before the origin, for every lead time;",
        f"- seasonal naive: the value one period ({setup.period} steps) before each target"
        + (
            ""
            if "seasonal_naive" in methods
            else " (not available: the series is not a "
            "period longer than the test's first origin, or no period is known)"
        )
        + ";",
        "- training mean: each node's mean over the training split;",
        f"- neighbour blend: w x own last + (1 - w) x mean of the in-neighbours' last values, "
        f"w = {blend.get('weight', 0.5):.3f}"
        + (" (least squares on the training windows)" if blend.get("weight_fitted") else "")
        + ".",
        "",
        "Each baseline's distribution is of the head's family, fitted by maximum likelihood "
        "on the windows the table names (the training windows; for a seasonal naive that has "
        "none a period after the series' start, the validation windows): "
        + (
            "a Gaussian around the point with a scale per lead time and node (the RMS of the "
            "training residuals)."
            if setup.distribution == "gaussian"
            else f"{setup.distribution} with mean point + delta (delta > 0, per lead time)"
            + (", its dispersion theta" if setup.distribution != "poisson" else "")
            + (" and zero probability pi" if setup.distribution == "zinb" else "")
            + " per lead time."
        ),
        "",
    ]
    rows = []
    for name in (n for n in BASELINES if n in fit and "windows" in fit[n]):
        f = fit[name]
        values = []
        for key in (
            "sigma_mean_by_horizon",
            "delta_by_horizon",
            "theta_by_horizon",
            "pi_by_horizon",
        ):
            if key in f:
                values.append(
                    key.replace("_by_horizon", "").replace("_mean", " (mean over nodes)")
                    + ": "
                    + ", ".join(_fmt(v) for v in f[key])
                )
        rows.append([name, f"{f['windows']} ({f['fitted_on']})", "; ".join(values)])
    lines += [*_table(["baseline", "windows fitted on", "fitted (per lead time)"], rows), ""]

    lines += ["## Plots", ""]
    captions = {
        "forecasts.png": "Observed values and the model's forecasts with their intervals "
        "(lead 1 and the last lead), persistence dashed, at the nodes with the most activity"
        + (
            f" (the last {PLOT_ORIGINS} origins)."
            if results["info"]["origins"] > PLOT_ORIGINS
            else "."
        ),
        "horizon.png": "NLL, RMSE and CRPS by lead time.",
        "training.png": "Training loss and validation NLL.",
    }
    for image in images:
        lines += [captions.get(image, image), "", f"![{image}]({image})", ""]
    return "\n".join(lines) + "\n"


def _verdict(methods: dict) -> str:
    """One sentence: does the model beat every baseline on NLL, persistence and the
    neighbour blend on RMSE."""
    model = methods[MODEL]["overall"]
    others = {n: m["overall"] for n, m in methods.items() if n in BASELINES}
    nll_ok = all(model["nll"] < o["nll"] for o in others.values())
    rmse_names = [n for n in ("persistence", "neighbour_blend") if n in others]
    rmse_ok = all(model["rmse"] < others[n]["rmse"] for n in rmse_names)
    worse_nll = [n for n, o in others.items() if not model["nll"] < o["nll"]]
    worse_rmse = [n for n in rmse_names if not model["rmse"] < others[n]["rmse"]]
    text = (
        f"The model's NLL is {'below every baseline' if nll_ok else 'not below ' + ', '.join(worse_nll)}"
        f"; its RMSE is {'below' if rmse_ok else 'not below'} "
        f"{' and '.join(worse_rmse if not rmse_ok else rmse_names)}."
    )
    return text


def markdown_to_html(text: str, title: str) -> str:
    """The report's Markdown (headings, tables, images, paragraphs, lists, bold, code) as
    a standalone HTML page."""

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "</style></head><body>",
    ]
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{inline(c)}</th>" for c in table[0]) + "</tr>")
            for row in table[2:]:
                out.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
            continue
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip()):
            out.append(f"<p><img src='{html.escape(m[2])}' alt='{html.escape(m[1])}'></p>")
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, checkpoint: str = "best", device: str | None = "cpu") -> dict:
    """Evaluate a finished panel run (:func:`evaluate`) and write ``report.json``,
    ``report.md``, ``report.html`` and the plots into ``run_dir``; returns the results."""
    from fastcore.train.cli import load_run

    run_dir = Path(run_dir)
    loaded = load_run(run_dir, checkpoint, device=device)
    # duck-typed: under `python -m` this module is __main__, and the job's SplitWindows
    # is the class of fastcore.train.panel_report
    setup = getattr(loaded.parts.test_set, "setup", None)
    if setup is None:
        raise ValueError(
            f"run {str(run_dir)!r} is not a panel run with a test split (job {loaded.cfg.job!r})"
        )
    results = evaluate(loaded.model, setup, loaded.device)
    panel = setup.panel
    origins = results["_arrays"]["_origins"]
    results["info"] = {
        "run_dir": str(run_dir),
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.state.get("step"),
        "source": setup.source,
        "distribution": setup.distribution,
        "steps": panel.steps,
        "nodes": panel.nodes,
        "channels": panel.channels,
        "edges": int(panel.edge_index.shape[1]),
        "splits": {k: list(v) for k, v in panel.splits.items()},
        "test_steps": list(panel.split_bounds("test")),
        "origins": int(origins.numel()),
        "every": setup.every,
        "targets": int(torch.isfinite(results["_arrays"]["_obs"]).sum()),
        "point": setup.point,
        "levels": list(setup.levels),
        "names": list(setup.names),
    }
    images = plots(run_dir, setup, results, run_dir)
    arrays = results.pop("_arrays")
    (run_dir / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results, setup, images)
    (run_dir / "report.md").write_text(text)
    (run_dir / "report.html").write_text(markdown_to_html(text, "Panel forecasting report"))
    results["_arrays"] = arrays
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastcore.train.panel_report",
        description="evaluate a finished panel run against the baselines; write its report",
    )
    p.add_argument("--run", required=True, help="the run directory (runs/panel)")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a file")
    args = p.parse_args(argv)
    try:
        results = write_report(args.run, args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"panel_report: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    for name, m in results["methods"].items():
        o = m["overall"]
        print(
            f"{name:>16}: NLL {o['nll']:.4f}  MAE {o['mae']:.4f}  RMSE {o['rmse']:.4f}  "
            f"CRPS {o['crps']:.4f}"
        )
    print(_verdict(results["methods"]))
    print(f"report: {Path(args.run) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
