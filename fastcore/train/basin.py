"""The basin forecasting job: ``python -m fastcore.train --config configs/basin.yaml``.

Data: a :class:`~fastcore.data.network.BasinNetwork` (the real Rhine network by default,
or a synthetic one of any size) and the seeded hydrological simulation over it
(:func:`fastcore.data.hydrology.simulate`), with missing days in the observed copies;
windows and normalisation from :mod:`fastcore.data.basin`. ``model.arch`` picks
:class:`~fastcore.models.basin.HierarchicalBasinModel` (default) or the graph-free
:class:`~fastcore.models.basin.BasinGRU` baseline, trained by the same loop.

Loss: masked MSE on the normalised discharge, each basin weighted by
``1 / (std_n + 0.1)^2`` of its training targets (an NSE-like weighting: every basin counts,
whatever its size). Validation runs the pure autoregressive forecast (no teacher forcing)
over every validation window and reports NSE, KGE, RMSE, MAE and R² on the de-normalised
discharge (median over basins, mean over lead times); ``best.pt`` follows ``val_nse``.
``python -m fastcore.train evaluate --run DIR --split test`` reports the same metrics on
every test window and writes the forecasts (``prediction``/``target`` ``[W, S, N]`` in
m³/s, NaN where unobserved).
Scheduled sampling: the teacher-forcing probability decays linearly from
``teacher_forcing`` to 0 over ``teacher_forcing_steps`` training forward passes (a buffer
of the model, so a resumed run continues the schedule exactly).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fastcore import metrics
from fastcore.data.basin import (
    FORCINGS,
    INPUTS,
    BasinSeries,
    BasinWindows,
    Prepared,
    prepare,
    static_attributes,
)
from fastcore.data.hydrology import simulate
from fastcore.data.network import BasinNetwork
from fastcore.losses import masked_mse
from fastcore.models.basin import BasinGRU, HierarchicalBasinModel
from fastcore.train.config import SEED_MAX, Config, option
from fastcore.train.jobs import JobContext, JobParts


@dataclass
class DataConfig:
    """The network, its simulation and the windows."""

    network: Literal["rhine", "synthetic", "wind"] = option(
        "rhine",
        "'rhine' (the committed real network), 'synthetic', or 'wind' (the Irish wind "
        "stations: real observations, fetched by scripts/fetch_wind.py)",
    )
    synthetic_basins: int = option(200, "fine basins of a synthetic network", ge=1)
    years: int = option(12, "simulated years (365-day years); 'wind' uses all its 18 years", ge=1)
    seed: int = option(0, "seed of the simulation (and of a synthetic network)", ge=0, le=SEED_MAX)
    missing_forcings: float = option(
        0.01, "fraction of missing days per observed forcing", ge=0, lt=1
    )
    missing_discharge: float = option(
        0.02, "fraction of missing days of observed discharge", ge=0, lt=1
    )
    lookback: int = option(21, "input window (days)", ge=1)
    horizon: int = option(5, "forecast lead times (days)", ge=1)
    splits: list[float] = option(
        [0.7, 0.15, 0.15],
        "train / val / test fractions of the days (relative: divided by their sum)",
        gt=0,
        length=3,
    )
    val_stride: int = option(
        3, "validation during training uses every this-many-th origin (the report uses all)", ge=1
    )
    cache_dir: str | None = option(
        "runs/cache", "where the prepared series is cached (.pt, weights_only); null: never"
    )


@dataclass
class ModelConfig:
    """The forecaster."""

    arch: Literal["hierarchical", "gru"] = option(
        "hierarchical", "'hierarchical' or 'gru' (the graph-free baseline)"
    )
    hidden: int = option(8, "latent width per (basin, variable) of the hierarchical model", ge=1)
    blocks: int = option(2, "SpatioTemporalBlocks per level on the way down", ge=1)
    kernel_size: int = option(7, "causal temporal kernel", ge=1)
    decoder_hidden: int = option(32, "the autoregressive decoder's state width (both archs)", ge=1)
    teacher_forcing: float = option(
        0.5,
        "initial teacher-forcing probability of the decoder (each draw keyed per window, "
        "the same under any split over processes)",
        ge=0,
        le=1,
    )
    teacher_forcing_steps: int = option(300, "forward passes over which it decays to 0", ge=1)


def build_network(data: DataConfig) -> BasinNetwork:
    if data.network == "rhine":
        from fastcore.data.rhine import load_rhine

        return load_rhine()
    if data.network == "synthetic":
        from fastcore.data.synthetic import synthetic_network

        return synthetic_network(data.synthetic_basins, seed=data.seed)
    if data.network == "wind":
        from fastcore.data.stations import station_network
        from fastcore.data.wind import load_wind

        wind = load_wind()
        return station_network(wind.lat, wind.lon, "irish-wind")
    raise ValueError(f"data.network must be 'rhine', 'synthetic' or 'wind', got {data.network!r}")


def wind_series(network: BasinNetwork) -> BasinSeries:
    """The wind speeds as the 'discharge' role, with seasonal harmonics of the day of year
    (known in advance) as the three 'forcings'."""
    from fastcore.data.wind import load_wind

    wind = load_wind()
    days = wind.dates.astype("datetime64[D]")
    doy = (days - days.astype("datetime64[Y]")).astype(np.int64) + 1
    phase = 2 * np.pi * np.minimum(doy, 365) / 365.0
    harmonics = np.stack([np.sin(phase), np.cos(phase), np.sin(2 * phase)], -1)
    n = wind.num_stations
    forcings = torch.as_tensor(
        np.broadcast_to(harmonics[:, None, :], (len(doy), n, 3)).copy(), dtype=torch.float32
    )
    return BasinSeries(
        forcings=forcings,
        discharge=wind.speed.float(),
        static=static_attributes(network.levels[0]),
        doy=torch.as_tensor(np.minimum(doy, 366), dtype=torch.long),
    )


def causal_edges(num_basins: int) -> torch.Tensor:
    """``[2, 4 N]``: within each basin, every forcing -> discharge and the observed flag ->
    discharge (ids ``basin * F + variable``)."""
    f = len(INPUTS)
    q = INPUTS.index("discharge")
    basins = torch.arange(num_basins)
    sources = [i for i in range(f) if i != q]
    src = torch.cat([basins * f + s for s in sources])
    dst = torch.cat([basins * f + q for _ in sources])
    return torch.stack([src, dst])


def load_data(data: DataConfig, network: BasinNetwork) -> Prepared:
    """Simulate and prepare, or read the cache written by an identical config."""
    key = hashlib.sha256(
        json.dumps(
            {k: v for k, v in asdict(data).items() if k not in ("cache_dir", "val_stride")},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache = Path(data.cache_dir) / f"basin-{key}.pt" if data.cache_dir else None
    if cache is not None and cache.is_file():
        return Prepared.load(cache)
    if data.network == "wind":
        return prepare(wind_series(network), tuple(data.splits), cache=cache)
    days = 365 * data.years
    sim = simulate(
        network,
        days,
        seed=data.seed,
        missing_forcings=data.missing_forcings,
        missing_discharge=data.missing_discharge,
    )
    forcings = torch.as_tensor(
        np.stack([sim.observed_precip, sim.observed_temp, sim.observed_pet], -1),
        dtype=torch.float32,
    )
    series = BasinSeries(
        forcings=forcings,
        discharge=torch.as_tensor(sim.observed_discharge, dtype=torch.float32),
        static=static_attributes(network.levels[0]),
        doy=torch.as_tensor(sim.doy, dtype=torch.long),
    )
    return prepare(series, tuple(data.splits), cache=cache)


def basin_weights(prepared: Prepared) -> torch.Tensor:
    a, b = prepared.splits["train"]
    q = prepared.target[a:b]
    valid = torch.isfinite(q)
    mean = torch.where(valid, q, 0.0).sum(0) / valid.sum(0).clamp_min(1)
    var = torch.where(valid, (q - mean) ** 2, 0.0).sum(0) / valid.sum(0).clamp_min(1)
    w = 1.0 / (var.sqrt() + 0.1) ** 2
    return w / w.mean()


@torch.no_grad()
def predict(
    model: nn.Module,
    windows: BasinWindows,
    batch_size: int,
    device,
    indices: range | None = None,
) -> torch.Tensor:
    """Autoregressive forecasts ``[W, S, N]`` (normalised) for the windows ``indices``
    (default: all), in order."""
    indices = range(len(windows)) if indices is None else indices
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        x, future, _ = windows.batch(indices[start : start + batch_size])
        out.append(model(x.to(device), future.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def forecast_metrics(pred01: torch.Tensor, windows: BasinWindows, prepared: Prepared) -> dict:
    """Metrics of normalised forecasts ``[W, S, N]`` on the de-normalised discharge: per
    lead time, then the mean over leads of each basin-median."""
    obs01 = windows.targets()
    scaler = prepared.scaler
    pred, obs = scaler.inverse(pred01), scaler.inverse(obs01)
    leads = [metrics.evaluate(pred[:, k], obs[:, k]) for k in range(pred.shape[1])]
    out = {}
    for name in metrics.METRICS:
        out[name] = sum(lead[f"{name}_median"] for lead in leads) / len(leads)
        out[f"{name}_lead"] = [lead[f"{name}_median"] for lead in leads]
    out["missing_targets"] = sum(lead["missing"] for lead in leads)
    return out


def build(cfg: Config, ctx: JobContext) -> JobParts:
    data, mcfg = cfg.data, cfg.model
    network = build_network(data)
    prepared = load_data(data, network)
    hierarchy = network.to_hierarchy(
        num_features=len(INPUTS),
        causal_edges=[causal_edges(lv.num_basins).numpy() for lv in network.levels],
        device=ctx.device,
    )
    static = prepared.static
    if mcfg.arch == "hierarchical":
        model: nn.Module = HierarchicalBasinModel(
            hierarchy,
            static,
            num_inputs=len(INPUTS),
            num_forcings=len(FORCINGS),
            hidden=mcfg.hidden,
            blocks=mcfg.blocks,
            kernel_size=mcfg.kernel_size,
            q_feature=INPUTS.index("discharge"),
            decoder_hidden=mcfg.decoder_hidden,
        )
    else:
        model = BasinGRU(
            len(INPUTS),
            len(FORCINGS),
            static,
            hidden=mcfg.decoder_hidden,
            q_feature=INPUTS.index("discharge"),
        )
    model.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))
    weights = basin_weights(prepared).to(ctx.device)
    train = BasinWindows(prepared, "train", data.lookback, data.horizon)
    val = BasinWindows(prepared, "val", data.lookback, data.horizon, data.val_stride)
    try:
        test: BasinWindows | None = BasinWindows(prepared, "test", data.lookback, data.horizon)
    except ValueError:  # a test split shorter than one window: no 'evaluate --split test'
        test = None

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inner = getattr(model, "module", model)
        x, future, y = batch
        teacher_prob = 0.0
        if inner.training:
            progress = float(inner.forward_calls) / max(1, mcfg.teacher_forcing_steps)
            teacher_prob = max(0.0, mcfg.teacher_forcing * (1.0 - progress))
            inner.forward_calls += 1
        pred = model(x, future, y if teacher_prob > 0 else None, teacher_prob)
        valid = torch.isfinite(y)
        loss = masked_mse(pred, y, valid.float() * weights)
        guards = inner.guards.pop()
        values = {
            "mse": masked_mse(pred.detach(), y, valid),
            "teacher_prob": torch.tensor(teacher_prob),
            "missing_targets": (~valid).sum().float(),
            **{f"guard_{k}": torch.tensor(v) for k, v in guards.items()},
        }
        return loss, values

    def evaluate(model: nn.Module, split: str = "val") -> dict[str, float]:
        windows = {"val": val, "test": test}[split]
        pred = predict(model, windows, 64, ctx.device)
        m = forecast_metrics(pred, windows, prepared)
        return {k: v for k, v in m.items() if not isinstance(v, list)}

    def predict_batch(model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, future, y = batch
        pred = model(x, future)  # eval mode: the pure autoregressive forecast
        getattr(model, "module", model).guards.pop()
        return {
            "prediction": prepared.scaler.inverse(pred.float()),
            "target": prepared.scaler.inverse(y.float()),
        }

    def sanity() -> str:
        lines = [hierarchy.report()]
        lines.append(
            f"data: {network.name}, {prepared.inputs.shape[0]} days x {prepared.inputs.shape[1]} "
            f"fine basins, splits {prepared.splits}, windows train {len(train)} val {len(val)}; "
            f"missing (filled with 0, masked in loss/metrics): forcings "
            f"{prepared.missing['forcings']}, discharge {prepared.missing['discharge']}"
        )
        return "\n".join(lines)

    return JobParts(
        model=model,
        train_set=train,
        val_set=val,
        test_set=test,
        loss_fn=loss_fn,
        sanity=sanity,
        evaluate=evaluate,
        evaluate_metrics=(*metrics.METRICS, "missing_targets"),
        evaluate_splits=("val", "test"),
        predict=predict_batch,
    )
