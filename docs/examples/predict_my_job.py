"""Classify new points with the best model of runs/my_job (docs/own-job.md)."""

import torch

from fastcore.train import load_run

run = load_run("runs/my_job")  # the run's config, and its model with best.pt's weights
print(f"{run.checkpoint}: step {run.state['step']}, {run.state['metrics']}")

points = torch.tensor([[0.0, 0.0], [2.0, -3.0], [-5.0, 4.0]])  # raw points, as in the data
with torch.no_grad():
    probability = run.model(points).softmax(-1)[:, 1]  # of label 1
for (x, y), p in zip(points.tolist(), probability.tolist(), strict=True):
    print(f"({x:+.1f}, {y:+.1f}): label 1 with probability {p:.3f}")

# what 'evaluate --split test' wrote: the same model on the test points
test = torch.load("runs/my_job/eval/test-best.pt", weights_only=True)
points, labels = run.parts.test_set.tensors
with torch.no_grad():
    again = run.model(points).softmax(-1)[:, 1]
assert torch.equal(test["label"], labels[test["index"]])
assert torch.allclose(test["probability"], again[test["index"]])
correct = (test["probability"] > 0.5).long() == test["label"]
print(f"test accuracy {float(correct.float().mean()):.3f}")
