"""Test-suite conventions.

* Without a GPU, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set
  here before fastcore is imported), so CI tests them on the CPU (float32/float64 only).
* ``gpu``-marked tests skip cleanly without CUDA.
* Op tests (tests/ops) run with deterministic algorithms on, which makes every
  ``torch.empty``/``at::empty`` come back filled with NaN: an output element a kernel
  forgets to write fails the comparison instead of passing by luck.
* Inputs are fresh seeded random tensors (``fastcore.testing.randn``), never zeros/ones.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
