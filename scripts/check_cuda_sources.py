"""Compile-only check of the CUDA sources, for machines with nvcc but without a CUDA torch.

* every ``csrc/cuda/*.cu`` (torch-free kernels) with ``nvcc -c`` against torch's headers;
* every ``csrc/cuda/*.cpp`` (the torch glue) with ``c++ -fsyntax-only`` against torch's and
  the CUDA toolkit's headers. A CPU build of torch lacks one generated header
  (``c10/cuda/impl/cuda_cmake_macros.h``); an empty stand-in is written to a temporary
  include directory for this check only.

Usage: python scripts/check_cuda_sources.py [FILE ...]   (exit status 1 on any failure)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent


def cuda_includes() -> list[str]:
    """The CUDA toolkit's include directories as ``-I`` flags, as nvcc itself reports them."""
    if shutil.which("nvcc") is None:
        sys.exit("nvcc not found")
    dry = subprocess.run(
        ["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True
    ).stderr
    dirs = []
    for line in dry.splitlines():
        for key in ("INCLUDES=", "SYSTEM_INCLUDES="):
            if key in line:
                words = line.split(key, 1)[1].replace('"', " ").split()
                dirs += [w.removeprefix("-I") for w in words if w != "-isystem"]
    return [f"-I{d}" for d in dict.fromkeys(dirs)]


def commands(source: Path, shim: Path, out: Path) -> list[str]:
    torch_includes = [f"-I{p}" for p in include_paths()]
    if source.suffix == ".cu":
        return [
            "nvcc",
            "-std=c++17",
            "-O3",
            "-arch=sm_80",
            "--expt-relaxed-constexpr",
            "-Xcompiler",
            "-Wall",
            *torch_includes,
            "-c",
            str(source),
            "-o",
            str(out),
        ]
    return [
        os.environ.get("CXX", "c++"),
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-DFASTCORE_WITH_CUDA",
        *torch_includes,
        *cuda_includes(),
        f"-I{shim}",
        str(source),
    ]


def main(argv: list[str]) -> int:
    sources = [Path(a) for a in argv] or sorted((ROOT / "csrc" / "cuda").glob("*.c[up]*"))
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "shim"
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
        for source in sources:
            cmd = commands(source, shim, Path(tmp) / (source.name + ".o"))
            result = subprocess.run(cmd, capture_output=True, text=True)
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"{status:6s} {source.relative_to(ROOT) if source.is_absolute() else source}")
            if result.returncode:
                failed += 1
                print(result.stdout + result.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
