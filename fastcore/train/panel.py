"""The panel job: any panel + graph -> a probabilistic spatiotemporal forecaster.

``python -m fastcore.train --config configs/panel.yaml`` (docs/panel.md, "The panel job").

Data (``data.source``): ``synthetic`` (:func:`fastcore.data.epidemic.simulate_epidemic`
with the parameters of ``data.synthetic``), ``wind`` (the Irish wind speeds of
:mod:`fastcore.data.wind`, k-NN station graph), ``counts:<name-or-path>`` (a count panel of
:func:`fastcore.data.counts.load_count_panel`, e.g. ``counts:measlesWeserEms``) or
``npz:<path>`` (your own file: :func:`load_npz` documents the arrays). The series becomes a
:class:`~fastcore.data.panel.PanelData` (chronological splits ``data.splits``, normalisation
``data.normalize`` fitted on the training split, missing flags as inputs, seasonal features
of ``data.period`` / the dates) with windows of ``data.lookback`` inputs and
``data.horizon`` targets.

Model: :class:`fastcore.models.panel.PanelForecaster` with the head ``model.head``
(gaussian | poisson | nb | zinb): an hhh4-type backbone, fitted by maximum likelihood on
the training windows when the job is built (``model.fit_backbone``), plus the network's
corrections, which start at zero. Loss: the head's negative log-likelihood of the raw
targets, missing ones masked. Validation reports ``val_loss`` (the NLL, batch means) and,
over the whole validation split, ``val_nll``, ``val_mae``, ``val_rmse``, ``val_crps`` and
the interval coverage and width at each level of ``data.eval.levels``, in the series'
units (:func:`fastcore.train.panel_report.score_split`); ``best.pt`` follows ``val_nll``
in the shipped configs. ``evaluate --split test`` scores the rolling origins of the test
split (every ``data.eval.every`` steps) and writes the forecasts (``predict``). At the end
of training the job writes the report (``report.md``, ``report.html``, ``report.json``,
plots) into the run directory: the model against persistence, the seasonal naive, the
training mean and the neighbour blend (:mod:`fastcore.train.panel_report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fastcore.data.epidemic import simulate_epidemic
from fastcore.data.panel import Calendar, PanelBatch, PanelData
from fastcore.models.panel import COUNT_DISTRIBUTIONS, PanelForecaster, training_mean
from fastcore.ops.graph import Graph
from fastcore.train.config import SEED_MAX, Config, option
from fastcore.train.jobs import JobContext, JobParts
from fastcore.train.panel_report import (
    PanelSetup,
    SplitWindows,
    distribution_mean,
    level_name,
    metric_names,
    model_inputs,
    point_forecast,
    score_split,
    write_report,
)

SOURCES = "synthetic | wind | counts:<name-or-path> | npz:<path>"


def _valid_source(text: str) -> bool:
    if text in ("synthetic", "wind"):
        return True
    kind, _, rest = text.partition(":")
    return kind in ("counts", "npz") and bool(rest.strip())


def _valid_levels(levels: list[float]) -> bool:
    return len(levels) == len(set(levels)) and len(levels) <= 4


@dataclass
class SyntheticConfig:
    """The simulated endemic-epidemic panel (fastcore.data.epidemic.simulate_epidemic)."""

    steps: int = option(520, "time steps (weeks)", ge=20)
    nodes: int = option(48, "districts", ge=2)
    graph: Literal["grid", "geometric"] = option("grid", "the district graph")
    period: int = option(52, "season length in steps", ge=2)
    seed: int = option(0, "seed of the simulation", ge=0, le=SEED_MAX)
    endemic: float = option(0.04, "median endemic mean per district and step", gt=0)
    seasonality: float = option(1.0, "amplitude of the log seasonal wave", ge=0)
    lam: float = option(0.55, "autoregressive weight", ge=0, lt=1)
    phi: float = option(0.35, "neighbourhood weight (lam + phi < 1)", ge=0, lt=1)
    theta: float = option(0.4, "negative-binomial size (small: overdispersed)", gt=0)


@dataclass
class EvalConfig:
    """Rolling-origin evaluation and the report."""

    every: int = option(1, "test forecast origins every this many steps", ge=1)
    point: Literal["mean", "median", "quantile"] = option(
        "mean", "the model's point forecast for MAE/RMSE: mean | median | quantile"
    )
    quantile: float = option(0.5, "the level of point: quantile", gt=0, lt=1)
    levels: list[float] = option(
        [0.5, 0.9],
        "central prediction-interval levels whose coverage and width are reported (1-4)",
        gt=0,
        lt=1,
        check=_valid_levels,
        expected="1 to 4 distinct levels in (0, 1)",
    )
    blend_weight: float | None = option(
        None,
        "the neighbour-blend baseline's own weight w (w own + (1 - w) neighbours); null: "
        "fitted by least squares on the training split",
        ge=0,
        le=1,
    )
    report: bool = option(True, "write the report into the run directory after training")
    plot_nodes: int = option(4, "nodes in the report's forecast plot", ge=1)


@dataclass
class DataConfig:
    """The panel, its windows and the evaluation."""

    source: str = option(
        "synthetic",
        "the panel (docs/panel.md, 'The panel job')",
        check=_valid_source,
        expected=f"one of {SOURCES}",
    )
    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig, metadata={"help": "source: synthetic"}
    )
    wind_neighbours: int = option(3, "source: wind: k of the k-NN station graph", ge=1)
    lookback: int = option(26, "input window (steps)", ge=1)
    horizon: int = option(4, "lead times forecast from each origin", ge=1)
    stride: int = option(1, "training windows every this many origins", ge=1)
    splits: list[float] = option(
        [0.7, 0.15, 0.15],
        "train / val / test fractions of the steps (divided by their sum)",
        gt=0,
        length=3,
    )
    normalize: Literal["none", "standard", "log1p", "log1p_standard"] = option(
        "log1p", "input normalisation, fitted on the training split (log1p modes: counts)"
    )
    period: float | None = option(
        None,
        "season length in steps for the seasonal features and the seasonal naive baseline "
        "(null: the source's; 0: none)",
        ge=0,
    )
    harmonics: int = option(2, "seasonal harmonics (sin, cos pairs)", ge=1)
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "rolling-origin evaluation and report"}
    )


@dataclass
class ModelConfig:
    """The forecaster (fastcore.models.panel.PanelForecaster)."""

    head: Literal["gaussian", "poisson", "nb", "zinb"] = option(
        "nb", "the predictive distribution: gaussian | poisson | nb | zinb"
    )
    hidden: int = option(32, "feature width", ge=1)
    blocks: int = option(2, "SpatioTemporalBlocks over the lookback window", ge=0)
    kernel_size: int = option(3, "their causal temporal kernel", ge=1)
    embed: int = option(8, "width of the learned node and lead-time embeddings", ge=1)
    encoder: Literal["gru", "pool"] = option(
        "gru", "over the window: a graph GRU (gru) or last step + mean (pool)"
    )
    dropout: float = option(0.1, "dropout in the decoder (per-sample masks)", ge=0, lt=1)
    add_self_loops: bool = option(True, "graph convolutions keep each node's own row")
    dispersion: Literal["feature", "shared"] = option(
        "feature", "nb/zinb: theta per node and lead (feature) or one per channel (shared)"
    )
    lags: int = option(
        4,
        "the level lam multiplies: a learned mix of the last this-many values (1: the last)",
        ge=1,
    )
    fit_backbone: bool = option(
        True,
        "fit the backbone (rates, lag mix, endemic level and season per node, dispersion) "
        "by maximum likelihood on the training windows before training; false: it starts "
        "at init_lam / init_phi",
    )
    init_lam: float = option(
        1.0, "starting autoregressive rate lam (where the backbone fit starts)", gt=0
    )
    init_phi: float = option(0.05, "starting neighbourhood rate phi", gt=0)


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


@dataclass
class PanelSource:
    """A panel as loaded from ``data.source``, before windows and normalisation."""

    series: Tensor  # [T, N] or [T, N, C], NaN = missing
    edge_index: Tensor  # [2, E]
    edge_attr: Tensor | None = None  # [E, D]
    covariates: Tensor | None = None  # [T, N, K] or [T, K]
    dates: np.ndarray | None = None  # [T] datetime64
    period: float | None = None
    names: list[str] = field(default_factory=list)
    static: Tensor | None = None  # [N, S]
    description: str = ""


def load_npz(path: str | Path) -> PanelSource:
    """Your own panel from a NumPy ``.npz`` file (``np.savez``; read without pickle).

    Arrays: ``series`` float ``[T, N]`` or ``[T, N, C]`` (NaN = missing) and ``edge_index``
    int ``[2, E]`` (row 0 source, row 1 target, values in [0, N)) are required; optional
    ``edge_attr`` ``[E]`` or ``[E, D]``, ``covariates`` ``[T, N, K]`` or ``[T, K]`` (known in
    advance, finite), ``dates`` ``[T]`` (ISO strings or datetime64), ``period`` (a scalar,
    steps per season), ``names`` ``[N]`` (strings) and ``static`` ``[N, S]`` (finite node
    attributes).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.source 'npz:{path}': no such file")
    try:
        npz = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"data.source 'npz:{path}': not a readable .npz file ({error})") from None
    with npz:
        missing = [k for k in ("series", "edge_index") if k not in npz.files]
        if missing:
            raise ValueError(
                f"data.source 'npz:{path}': missing array(s) {', '.join(missing)} (has "
                f"{', '.join(sorted(npz.files)) or 'none'}); expected series [T, N(, C)] and "
                "edge_index [2, E]"
            )
        get = {k: npz[k] for k in npz.files}
    series = get["series"]
    if not np.issubdtype(series.dtype, np.number):
        raise ValueError(f"data.source 'npz:{path}': series must be numbers, got {series.dtype}")
    n = series.shape[1] if series.ndim >= 2 else 0
    names = [str(s) for s in get["names"]] if "names" in get else []
    if names and len(names) != n:
        raise ValueError(f"data.source 'npz:{path}': names has {len(names)} entries, N = {n}")
    period = None
    if "period" in get:
        period = float(np.asarray(get["period"]).reshape(()))
    return PanelSource(
        series=torch.from_numpy(np.asarray(series, dtype=np.float32)),
        edge_index=torch.from_numpy(np.asarray(get["edge_index"])),
        edge_attr=torch.from_numpy(np.asarray(get["edge_attr"], np.float32))
        if "edge_attr" in get
        else None,
        covariates=torch.from_numpy(np.asarray(get["covariates"], np.float32))
        if "covariates" in get
        else None,
        dates=np.asarray(get["dates"]).astype("datetime64[s]") if "dates" in get else None,
        period=period,
        names=names,
        static=torch.from_numpy(np.asarray(get["static"], np.float32)) if "static" in get else None,
        description=f"npz file {path}",
    )


def load_source(data: DataConfig) -> PanelSource:
    """The panel ``data.source`` names."""
    source = data.source
    if source == "synthetic":
        s = data.synthetic
        try:
            sim = simulate_epidemic(
                steps=s.steps,
                nodes=s.nodes,
                graph=s.graph,
                period=s.period,
                seed=s.seed,
                endemic=s.endemic,
                seasonality=s.seasonality,
                lam=s.lam,
                phi=s.phi,
                theta=s.theta,
            )
        except ValueError as error:
            raise ValueError(f"data.synthetic: {error}") from None
        return PanelSource(
            series=sim.counts,
            edge_index=sim.edge_index,
            edge_attr=sim.edge_weight[:, None],
            period=float(s.period),
            names=[f"d{i}" for i in range(s.nodes)],
            static=sim.positions,
            description=f"synthetic endemic-epidemic panel ({s.graph} graph, seed {s.seed})",
        )
    if source == "wind":
        from fastcore.data.wind import load_wind

        wind = load_wind()
        if not data.wind_neighbours < wind.num_stations:
            raise ValueError(
                f"data.wind_neighbours = {data.wind_neighbours}: expected < {wind.num_stations} "
                "(the stations)"
            )
        edge_index, edge_attr = wind.graph(data.wind_neighbours)
        return PanelSource(
            series=wind.speed,
            edge_index=edge_index,
            edge_attr=edge_attr,
            dates=wind.dates.astype("datetime64[s]"),
            period=365.25,
            names=list(wind.code),
            static=torch.as_tensor(np.stack([wind.lat, wind.lon], 1), dtype=torch.float32),
            description=f"Irish wind speeds (knots), {wind.num_stations} stations, "
            f"{data.wind_neighbours}-NN graph",
        )
    kind, _, rest = source.partition(":")
    rest = rest.strip()
    if kind == "npz":
        return load_npz(rest)
    try:
        from fastcore.data.counts import load_count_panel
    except ImportError as error:
        raise ValueError(
            f"data.source {source!r} needs fastcore.data.counts, which is not importable "
            f"here ({error})"
        ) from None
    try:
        panel = load_count_panel(rest)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"data.source {source!r}: {error}") from None
    static = None
    if getattr(panel, "population", None) is not None:
        population = torch.as_tensor(np.asarray(panel.population, dtype=np.float64))
        static = population.clamp_min(1).log().float()[:, None]
    dates = getattr(panel, "dates", None)
    return PanelSource(
        series=torch.as_tensor(np.asarray(panel.counts, dtype=np.float32)),
        edge_index=torch.as_tensor(np.asarray(panel.edge_index)).long(),
        dates=None if dates is None else np.asarray(dates).astype("datetime64[s]"),
        period=getattr(panel, "period", None),
        names=[str(n) for n in getattr(panel, "names", [])],
        static=static,
        description=f"count panel {rest!r}",
    )


def check_head(head: str, series: Tensor, source: str) -> None:
    """A count head needs non-negative integer values (NaN = missing is fine)."""
    if head not in COUNT_DISTRIBUTIONS:
        return
    values = series[torch.isfinite(series)]
    bad = (values < 0) | (values != values.round())
    if bool(bad.any()):
        raise ValueError(
            f"model.head = {head!r} models counts, but data.source {source!r} has "
            f"{int(bad.sum())} negative or non-integer values (e.g. {float(values[bad][0])!r}); "
            "use model.head=gaussian"
        )


def build_panel(data: DataConfig, source: PanelSource) -> tuple[PanelData, float | None]:
    """The :class:`PanelData` of a source and the season length used (None: none)."""
    period = source.period if data.period is None else (data.period or None)
    if period is not None and not period > 1:
        raise ValueError(f"data.period = {period!r}: expected a season longer than one step")
    calendar = None
    if period is not None or source.dates is not None:
        calendar = Calendar(timestamps=source.dates, period=period, harmonics=data.harmonics)
    total = sum(data.splits)
    splits = tuple(f / total for f in data.splits)
    panel = PanelData(
        source.series,
        source.edge_index,
        edge_attr=source.edge_attr,
        static=source.static,
        covariates=source.covariates,
        calendar=calendar,
        splits=splits,
        normalize=data.normalize,
        missing_indicator=True,
    )
    return panel, period


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


def node_statistics(panel: PanelData) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` ``[N, C]`` of each node's raw training values (std 1 where it is 0
    or undefined)."""
    start, stop = panel.split_bounds("train")
    part = panel.raw[start:stop].double()
    mean = training_mean(panel.raw.double(), start, stop)
    valid = torch.isfinite(part)
    var = torch.where(valid, (part - mean).square(), 0.0).sum(0) / valid.sum(0).clamp_min(1)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()


def build(cfg: Config, ctx: JobContext) -> JobParts:
    data, mcfg = cfg.data, cfg.model
    source = load_source(data)
    check_head(mcfg.head, source.series, data.source)
    panel, period = build_panel(data, source)
    lookback, horizon = data.lookback, data.horizon
    setup = PanelSetup(
        panel=panel,
        distribution=mcfg.head,
        lookback=lookback,
        horizon=horizon,
        every=data.eval.every,
        point=data.eval.point,
        quantile=data.eval.quantile,
        levels=tuple(data.eval.levels),
        period=None if period is None else round(period),
        blend_weight=data.eval.blend_weight,
        names=source.names or [str(i) for i in range(panel.nodes)],
        source=source.description,
        plot_nodes=data.eval.plot_nodes,
    )
    sets = {
        split: SplitWindows(
            panel.windows(split, lookback, horizon, stride), setup
        )  # errors name the split, its length and the window
        for split, stride in (("train", data.stride), ("val", 1), ("test", data.eval.every))
    }
    center, scale = node_statistics(panel)
    train_mean = float(torch.nan_to_num(center, nan=0.0).mean())
    graph = Graph(panel.edge_index, panel.nodes, edge_attr=panel.edge_attr)
    model = PanelForecaster(
        graph,
        distribution=mcfg.head,
        channels=panel.channels,
        input_channels=panel.input_channels,
        horizon=horizon,
        center=center,
        scale=scale,
        season_features=panel.season_features,
        covariates=panel.covariate_count,
        static=panel.static_normalized,
        hidden=mcfg.hidden,
        blocks=mcfg.blocks,
        kernel_size=mcfg.kernel_size,
        embed=mcfg.embed,
        dropout=mcfg.dropout,
        add_self_loops=mcfg.add_self_loops,
        encoder=mcfg.encoder,
        dispersion=mcfg.dispersion,
        init_mean=max(0.1 * train_mean, 0.01),
        lags=mcfg.lags,
        init_rates=(mcfg.init_lam, mcfg.init_phi),
    ).to(ctx.device)
    raw = panel.raw.to(ctx.device)
    backbone_fit = None
    if mcfg.fit_backbone:
        train = panel.window_batch(sets["train"].windows.origins, lookback, horizon)
        backbone_fit = model.fit_backbone(
            raw[train.time_x.to(ctx.device)],
            train.y_raw.to(ctx.device),
            None if train.season_y is None else train.season_y.to(ctx.device),
        )

    def params_of(model: nn.Module, batch: PanelBatch) -> dict[str, Tensor]:
        return {k: v.float() for k, v in model(**model_inputs(batch, raw)).items()}

    def loss_fn(model: nn.Module, batch: PanelBatch):
        params = params_of(model, batch)
        inner = getattr(model, "module", model)
        nll = inner.head.nll(params, batch.y_raw)
        with torch.no_grad():
            mean = distribution_mean(mcfg.head, params)
            valid = batch.y_mask
            err = torch.where(valid, mean - torch.nan_to_num(batch.y_raw), 0.0)
            count = valid.sum().clamp_min(1)
            values = {
                "nll": nll.detach(),
                "mae": err.abs().sum() / count,
                "mse": err.square().sum() / count,
            }
        return nll, values

    def evaluate(model: nn.Module, split: str = "val") -> dict[str, float]:
        return score_split(model, setup, split, ctx.device)

    def predict(model: nn.Module, batch: PanelBatch) -> dict[str, Tensor]:
        params = params_of(model, batch)
        out = {f"param_{k}": v for k, v in params.items()}
        detached = {k: v.detach().double().cpu() for k, v in params.items()}
        out["point"] = point_forecast(mcfg.head, detached, data.eval.point, data.eval.quantile)
        for level in data.eval.levels:
            name = level_name(level)
            for end, q in (("lower", (1 - level) / 2), ("upper", (1 + level) / 2)):
                out[f"{end}_{name}"] = point_forecast(mcfg.head, detached, "quantile", q)
        out["target"] = batch.y_raw
        out["origin"] = batch.origin
        return out

    def finish(trainer) -> None:
        if data.eval.report:
            write_report(trainer.run_dir, "best", device=str(ctx.device))

    def sanity() -> str:
        s = panel.summary()
        return (
            f"panel: {source.description}; {s['steps']} steps x {s['nodes']} nodes x "
            f"{s['channels']} channels, {s['edges']} edges, {s['missing']} missing values, "
            f"zero fraction {s['zero_fraction']:.3f}; splits {s['splits']}; normalize "
            f"{s['normalize']}; season period {period} ({panel.season_features} features); "
            f"windows train {len(sets['train'])} val {len(sets['val'])} test "
            f"{len(sets['test'])} (lookback {lookback}, horizon {horizon}); head {mcfg.head}"
            + (
                ""
                if backbone_fit is None
                else "\nbackbone fit on the training windows: NLL + level prior "
                f"{backbone_fit['before']:.4f} -> {backbone_fit['after']:.4f}"
            )
        )

    return JobParts(
        model=model,
        train_set=sets["train"],
        val_set=sets["val"],
        test_set=sets["test"],
        loss_fn=loss_fn,
        collate_fn=PanelBatch.collate,
        evaluate=evaluate,
        evaluate_metrics=metric_names(data.eval.levels),
        evaluate_splits=("val", "test"),
        predict=predict,
        finish=finish,
        sanity=sanity,
    )
