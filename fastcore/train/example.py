"""The built-in example job: next-step forecasting on a river tree with SpatioTemporalBlocks.

Data (generated from a seed, nothing downloaded): a random river tree of ``nodes`` basins
(every basin drains into one downstream basin, the outlet into none) and a daily series of
two variables per basin, rain and flow. Rain is a seeded intermittent process; flow follows
a linear reservoir with routing along the tree:

    flow[t+1, n] = decay * flow[t, n] + route * sum(flow[t, u] for u upstream of n)
                   + gain * rain[t, n] + noise

so each basin's future depends on its own state, its rain and its upstream neighbours —
what the river graph convolution is for. A sample is a window of ``lookback`` steps of
both variables (normalised with the training split's statistics) and the next step's flow
at every basin; the first ``1 - val_fraction - test_fraction`` of the series trains, the
next ``val_fraction`` validates, and the last ``test_fraction`` (none by default) is held
out for ``python -m fastcore.train evaluate --split test``. Predictions (the ``predict``
hook, for ``evaluate``) are next-step flows in the series' own units.

Model: per-variable input embedding -> ``blocks`` x :class:`~fastcore.nn.SpatioTemporalBlock`
(river graph over basins, causal graph rain -> flow within each basin) -> dropout
(:class:`~fastcore.nn.SampleDropout`: each window's mask is keyed by its index, so any
split of a batch over processes trains the same model) -> a linear head on the last
step's latent of every basin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from fastcore.nn import SampleDropout, SpatioTemporalBlock
from fastcore.ops.graph import Graph
from fastcore.train.config import SEED_MAX, Config, option
from fastcore.train.jobs import JobContext, JobParts


@dataclass
class DataConfig:
    """The generated river-tree series."""

    path: str | None = option(
        None,
        "a .pt file {'series': [steps, nodes, 2] (rain, flow), 'edge_index': [2, E]} to train "
        "on instead of the generated tree (loaded with weights_only=True)",
    )
    nodes: int = option(24, "basins in the random river tree", ge=2)
    steps: int = option(1200, "length of the daily series", ge=1)
    lookback: int = option(12, "input window length (steps)", ge=1)
    val_fraction: float = option(
        0.2, "the fraction of the series after the training part that validates", gt=0, lt=1
    )
    test_fraction: float = option(
        0.0,
        "the last fraction of the series, held out for 'evaluate --split test' (0: no test split)",
        ge=0,
        lt=1,
    )
    decay: float = option(0.75, "linear-reservoir recession per step", ge=0, le=1)
    route: float = option(0.2, "fraction of upstream flow arriving per step", ge=0, le=1)
    noise: float = option(0.02, "std of the flow innovation", ge=0)
    seed: int = option(
        1234, "seed of the tree and the series (independent of train.seed)", ge=0, le=SEED_MAX
    )


@dataclass
class ModelConfig:
    """The forecaster."""

    hidden: int = option(16, "latent width H per (basin, variable)", ge=1)
    blocks: int = option(2, "SpatioTemporalBlocks", ge=1)
    kernel_size: int = option(3, "causal temporal kernel of each block", ge=1)
    dropout: float = option(
        0.1,
        "dropout on the head's input (training only; per-sample masks, the same under any "
        "split over processes)",
        ge=0,
        lt=1,
    )


def river_tree(nodes: int, generator: torch.Generator) -> torch.Tensor:
    """``[2, nodes - 1]`` upstream -> downstream edges of a random tree rooted at basin 0."""
    if nodes < 2:
        raise ValueError(f"data.nodes must be >= 2, got {nodes}")
    children = torch.arange(1, nodes)
    parents = (torch.rand(nodes - 1, generator=generator) * children).long()
    return torch.stack([children, parents])


def simulate(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(series [steps, nodes, 2] float32 (rain, flow), river edge_index [2, nodes - 1])``."""
    g = torch.Generator().manual_seed(cfg.seed)
    edges = river_tree(cfg.nodes, g)
    n, steps = cfg.nodes, cfg.steps
    wet = torch.rand(steps, n, generator=g) < 0.3
    rain = torch.where(wet, torch.rand(steps, n, generator=g).pow(2) * 3.0, torch.zeros(()))
    gain = 0.5 + torch.rand(n, generator=g)
    flow = torch.zeros(steps, n)
    level = torch.ones(n)
    for t in range(steps):
        flow[t] = level
        inflow = torch.zeros(n).index_add_(0, edges[1], level[edges[0]])
        level = (
            cfg.decay * level
            + cfg.route * inflow
            + gain * rain[t]
            + cfg.noise * torch.randn(n, generator=g)
        ).clamp_min(0.0)
    return torch.stack([rain, flow], -1), edges


class RiverWindows(Dataset):
    """Windows ``x [lookback, nodes, 2]`` -> ``y [nodes]`` (next-step flow), normalised."""

    def __init__(self, series: torch.Tensor, lookback: int, start: int, stop: int) -> None:
        if lookback < 1 or stop - start <= lookback:
            raise ValueError(
                f"a split of {stop - start} steps holds no window of lookback {lookback}"
            )
        self.series, self.lookback, self.start = series, lookback, start
        self.count = stop - start - lookback

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} out of range [0, {self.count})")
        t = self.start + i
        return self.series[t : t + self.lookback], self.series[t + self.lookback, :, 1]


class RiverForecaster(nn.Module):
    """``x (B, T, N, 2)`` -> next-step flow ``(B, N)`` through SpatioTemporalBlocks."""

    def __init__(
        self,
        river: Graph,
        causal: Graph,
        hidden: int,
        blocks: int,
        kernel_size: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.river, self.causal = river, causal
        self.embed_weight = nn.Parameter(torch.randn(2, hidden) * 0.5)
        self.embed_bias = nn.Parameter(torch.zeros(2, hidden))
        self.blocks = nn.ModuleList(
            SpatioTemporalBlock(2, hidden, kernel_size=kernel_size) for _ in range(blocks)
        )
        self.dropout = SampleDropout(dropout)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised windows ``x (B, T, N, 2)`` -> normalised next-step flow ``(B, N)``."""
        h = x[..., None] * self.embed_weight + self.embed_bias  # (B, T, N, 2, H)
        for block in self.blocks:
            h = block(h, self.river, self.causal)
        return self.head(self.dropout(h[:, -1].flatten(2))).squeeze(-1)

    def sanity_report(self) -> str:
        """The ``[SANITY]`` lines: each graph's node and edge count and largest index."""
        lines = []
        for name, g in (("river", self.river), ("causal", self.causal)):
            top = int(g.edge_index.max()) if g.num_edges else -1
            lines.append(
                f"{name} graph: {g.num_nodes} nodes, {g.num_edges} edges, "
                f"max index {top} < {g.num_nodes}"
            )
        return "\n".join(lines)


def load_series(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(series [steps, nodes, 2], edge_index [2, E])`` from a user's ``.pt`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    blob = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"series", "edge_index"} <= set(blob):
        raise ValueError(f"data.path {path!r} must hold a dict with 'series' and 'edge_index'")
    series, edges = blob["series"].float(), blob["edge_index"].long()
    if series.dim() != 3 or series.shape[2] != 2:
        raise ValueError(
            f"data.path {path!r}: series must be [steps, nodes, 2], got {tuple(series.shape)}"
        )
    return series, edges


def build(cfg: Config, ctx: JobContext) -> JobParts:
    """The example job's parts: the series (generated, or ``data.path``) normalised with
    the training part's statistics, its training / validation (/ test) windows, the
    forecaster, the MSE loss with MSE and MAE metrics, and ``predict`` (flows in the
    series' units).

    Raises:
        FileNotFoundError / ValueError: ``data.path`` missing or malformed, a series with
            NaN/inf, fractions that leave nothing to train on, a split shorter than a window.
    """
    data, mcfg = cfg.data, cfg.model
    if data.path is not None:
        series, edges = load_series(data.path)
        data = dataclasses.replace(data, steps=series.shape[0], nodes=series.shape[1])
    else:
        series, edges = simulate(data)
    if not torch.isfinite(series).all():
        raise ValueError("the series holds NaN/inf values; this example job does not mask them")
    if data.val_fraction + data.test_fraction >= 1:
        raise ValueError(
            f"data.val_fraction + data.test_fraction = "
            f"{data.val_fraction + data.test_fraction:g}: expected < 1 (the rest trains)"
        )
    split = round(data.steps * (1 - data.val_fraction - data.test_fraction))
    test_split = round(data.steps * (1 - data.test_fraction)) if data.test_fraction else None
    train_part = series[:split]
    mean = train_part.mean((0, 1))
    std = train_part.std((0, 1)).clamp_min(1e-6)
    series = (series - mean) / std
    river = Graph(edges, data.nodes, device=ctx.device)
    # Causal graph over (basin, variable) pairs, id = basin * 2 + variable: rain -> flow.
    basins = torch.arange(data.nodes)
    causal = Graph(torch.stack([basins * 2, basins * 2 + 1]), data.nodes * 2, device=ctx.device)
    model = RiverForecaster(river, causal, mcfg.hidden, mcfg.blocks, mcfg.kernel_size, mcfg.dropout)

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        pred = model(x)
        err = pred.float() - y.float()
        mse = err.square().mean()
        return mse, {"mse": mse.detach(), "mae": err.detach().abs().mean()}

    def predict(model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        flow_mean, flow_std = mean[1].to(y.device), std[1].to(y.device)
        return {
            "prediction": model(x).float() * flow_std + flow_mean,
            "target": y.float() * flow_std + flow_mean,
        }

    val_stop = test_split if test_split is not None else data.steps
    test_set = None
    if test_split is not None:
        test_set = RiverWindows(series, data.lookback, test_split - data.lookback, data.steps)
    return JobParts(
        model=model,
        train_set=RiverWindows(series, data.lookback, 0, split),
        val_set=RiverWindows(series, data.lookback, split - data.lookback, val_stop),
        test_set=test_set,
        loss_fn=loss_fn,
        predict=predict,
        sanity=model.sanity_report,
    )
