"""Training throughput of the basin model: fastcore layers vs the reference (loop) layers.

One optimizer step (forward, backward, the trainer's AdamW) of :class:`HierarchicalBasinModel` on a batch
of Rhine windows, built as the basin job builds it (``configs/basin.yaml``: 215 / 33 / 9
basins, 5 inputs, lookback 21, horizon 5), once with fastcore's layers and once as
:class:`fastcore.testing.LoopLayersBasinModel`: the same parameters on the per-time-step loop
of the original code (the baseline). Samples per second = batch / median step time; ``bench/compare.py`` reports
the ratio.
"""

from __future__ import annotations

import pytest
import torch

from fastcore.testing import LoopLayersBasinModel
from fastcore.train.basin import build
from fastcore.train.cli import resolve_config
from fastcore.train.jobs import JobContext
from fastcore.train.trainer import adamw

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCHES = [16, 64] if CUDA else [16]
PROVIDERS = ["fastcore", "reference (loop layers)"]


def make_step(loop_layers: bool, batch: int):
    cfg = resolve_config("configs/basin.yaml", ["data.cache_dir=runs/cache"])
    torch.manual_seed(0)
    parts = build(cfg, JobContext(DEVICE, 0, 0, 1, None, "fp32"))
    model = parts.model.to(DEVICE)
    if loop_layers:
        model = LoopLayersBasinModel.sharing(model)
    items = [parts.train_set[i] for i in range(batch)]
    x, future, y = (torch.stack([it[k] for it in items]).to(DEVICE) for k in range(3))
    opt = adamw(model.parameters(), lr=1e-4)  # the trainer's optimizer

    def step():
        loss, _ = parts.loss_fn(model, (x, future, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_basin_training_step(run, provider, batch):
    step = make_step(provider != "fastcore", batch)
    step()  # warm-up (first-call allocations)
    run(
        step,
        str(DEVICE),
        op="basin_model_train_step",
        direction="fwd+bwd",
        provider=provider,
        shape=f"rhine-B{batch}xT21xN215xF5xH8",
        samples=batch,
        baseline=provider != "fastcore",
    )
