"""my_job: a job of your own for ``python -m fastcore.train`` (docs/own-job.md).

Classify 2-D points into two interleaved spirals with a small MLP. The points come from a
CSV file of yours (``data.path``: a header line, then ``x,y,label`` rows with labels 0 and
1) or are generated from ``data.seed``. They are shuffled once (by ``data.seed``) and split
into training, validation and test points. The model standardises its input with the
training points' mean and std, which it keeps as buffers: they are saved in every
checkpoint, and the trained model takes raw points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from fastcore.nn import SampleDropout
from fastcore.train import Config, JobContext, JobParts, option


@dataclass
class DataConfig:
    """The points and their splits."""

    path: str | None = option(
        None, "a CSV file (header line, then x,y,label rows) to use instead of generated points"
    )
    points: int = option(1000, "points to generate (without data.path)", ge=10)
    noise: float = option(0.3, "std of the noise added to each generated point", ge=0)
    val_fraction: float = option(0.2, "fraction of the points that validates", gt=0, lt=1)
    test_fraction: float = option(0.2, "fraction held out for 'evaluate --split test'", gt=0, lt=1)
    seed: int = option(0, "seed of the generated points and of the split", ge=0, le=2**32 - 1)


@dataclass
class ModelConfig:
    """The classifier."""

    hidden: int = option(64, "width of each hidden layer", ge=1)
    layers: int = option(3, "hidden layers", ge=1)
    dropout: float = option(0.1, "dropout after each hidden layer (training only)", ge=0, lt=1)


def spirals(points: int, noise: float, generator: torch.Generator):
    """``(xy [points, 2], label [points])``: two interleaved spirals, labels 0 and 1."""
    label = torch.arange(points) % 2
    angle = torch.rand(points, generator=generator) * 3 * math.pi
    turn = angle + math.pi * label
    xy = torch.stack([angle * turn.cos(), angle * turn.sin()], 1)
    return xy + noise * torch.randn(points, 2, generator=generator), label


def read_csv(path: str):
    """``(xy [n, 2], label [n])`` from a CSV file of ``x,y,label`` rows."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.path {path!r} does not exist")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    if table.shape[1] != 3 or not np.isin(table[:, 2], (0, 1)).all():
        raise ValueError(f"data.path {path!r}: expected x,y,label rows with labels 0 or 1")
    return torch.tensor(table[:, :2], dtype=torch.float32), torch.tensor(table[:, 2]).long()


class SpiralClassifier(nn.Module):
    """Raw points ``xy (B, 2)`` -> class logits ``(B, 2)``."""

    def __init__(
        self, hidden: int, layers: int, dropout: float, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        body: list[nn.Module] = []
        width = 2
        for _ in range(layers):
            # SampleDropout, not nn.Dropout: its masks are keyed by sample, so a run under
            # torchrun trains the weights one process trains (docs/training.md)
            body += [nn.Linear(width, hidden), nn.GELU(), SampleDropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(width, 2)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((xy - self.mean) / self.std))


def build(cfg: Config, ctx: JobContext) -> JobParts:
    data, mcfg = cfg.data, cfg.model
    if data.path is not None:
        xy, label = read_csv(data.path)
    else:
        xy, label = spirals(data.points, data.noise, torch.Generator().manual_seed(data.seed))
    n = len(label)
    n_val, n_test = round(n * data.val_fraction), round(n * data.test_fraction)
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(
            f"{n} points with data.val_fraction {data.val_fraction} and data.test_fraction "
            f"{data.test_fraction}: expected at least one point in each split"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data.seed))
    train, val, test = order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]
    splits = {
        name: TensorDataset(xy[i], label[i])
        for name, i in (("train", train), ("val", val), ("test", test))
    }
    mean, std = xy[train].mean(0), xy[train].std(0).clamp_min(1e-6)
    model = SpiralClassifier(mcfg.hidden, mcfg.layers, mcfg.dropout, mean, std)

    def loss_fn(model: nn.Module, batch):
        points, target = batch
        logits = model(points).float()
        accuracy = (logits.argmax(-1) == target).float().mean()
        return F.cross_entropy(logits, target), {"accuracy": accuracy.detach()}

    def evaluate(model: nn.Module, split: str = "val") -> dict[str, float]:
        # a metric of the whole split, which batch means cannot give: the mean of the
        # per-class recalls
        points, target = splits[split].tensors
        predicted = model(points.to(ctx.device)).argmax(-1).cpu()
        recall = [(predicted[target == c] == c).float().mean() for c in (0, 1)]
        return {"balanced_accuracy": float(sum(recall) / 2)}

    def predict(model: nn.Module, batch) -> dict[str, torch.Tensor]:
        points, target = batch
        return {"probability": model(points).float().softmax(-1)[:, 1], "label": target}

    return JobParts(
        model=model,
        train_set=splits["train"],
        val_set=splits["val"],
        test_set=splits["test"],
        loss_fn=loss_fn,
        evaluate=evaluate,
        evaluate_metrics=("balanced_accuracy",),
        evaluate_splits=("val", "test"),
        predict=predict,
        sanity=lambda: f"points: {len(train)} train, {n_val} val, {n_test} test",
    )
