"""Every Triton kernel compiles for the GPU (sm_90), not only under the interpreter.

scripts/triton_aot.py drives the public ops through their Triton backend at the bench
shapes in every dtype they accept (launches intercepted, nothing runs) and compiles each
launch's specialisation with triton.compile for ``GPUTarget("cuda", 90, 32)``. ``--quick``
keeps one shape per op; ``make triton-aot`` runs every bench shape.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: no Triton kernels to compile", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "triton_aot.py"
FLOATS = {"torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"}


def entry_points() -> set[str]:
    """``module.name`` of every ``@triton.jit`` ``*_kernel`` in fastcore/kernels/, read from source."""
    found = set()
    for path in sorted((ROOT / "fastcore" / "kernels").glob("*.py")):
        text = path.read_text()
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", text):
            found.add(f"fastcore.kernels.{path.stem}.{name}")
    return found


@pytest.fixture(scope="module")
def aot_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("TRITON_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1800,
    )
    return done


def test_every_kernel_compiles_for_sm90(aot_run):
    assert aot_run.returncode == 0, aot_run.stdout[-4000:] + aot_run.stderr[-8000:]
    summary = re.search(r"compiled (\d+)/(\d+) in", aot_run.stdout)
    assert summary, aot_run.stdout[-2000:]
    assert summary.group(1) == summary.group(2)
    assert int(summary.group(1)) > 0


def test_every_entry_point_in_every_dtype(aot_run):
    assert aot_run.returncode == 0, aot_run.stderr[-8000:]
    lines = dict(
        re.findall(
            r"^  (fastcore\.kernels\.\S+): \d+ specialisations, dtypes (.*)$", aot_run.stdout, re.M
        )
    )
    kernels = entry_points()
    assert kernels, "no *_kernel found in fastcore/kernels/"
    assert set(lines) == kernels
    for name, dtypes in lines.items():
        assert set(dtypes.split(", ")) >= FLOATS, f"{name} compiled only for {dtypes}"
