"""Every CUDA source compiles: the .cu kernels with nvcc, the glue against torch's CUDA
headers. Runs wherever nvcc is installed, GPU or not (skips cleanly without nvcc)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.c[up]*"))


def test_there_are_cuda_sources():
    assert any(s.suffix == ".cu" for s in SOURCES) and any(s.suffix == ".cpp" for s in SOURCES)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles(source):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_cuda_sources.py"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
