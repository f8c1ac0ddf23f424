"""Test-suite conventions.

* Without a GPU, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set
  here before fastcore is imported), so CI tests them on the CPU (float32/float64 only).
* ``gpu``-marked tests skip cleanly without CUDA.
* Op tests (tests/ops) run with deterministic algorithms on, which makes every
  ``torch.empty``/``at::empty`` come back filled with NaN: an output element a kernel
  forgets to write fails the comparison instead of passing by luck.
* Inputs are fresh seeded random tensors (``fastcore.testing.randn``), never zeros/ones.
* ``FASTCORE_TEST_TIMEOUT=<seconds>`` fails a test that runs longer (``make gpu-check``
  sets it: a hung kernel must not eat a short GPU lease).
"""

import os
import signal

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


_TIMEOUT = float(os.environ.get("FASTCORE_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TIMEOUT <= 0:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran over FASTCORE_TEST_TIMEOUT={_TIMEOUT:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, _TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
