"""Check an installed CUDA build of fastcore, on a machine with or without a GPU.

* ``fastcore`` is imported from the installation, not from a source tree on ``sys.path``;
* ``fastcore._backend.BUILD_INFO["cuda"]`` is true (the extension was built with CUDA);
* every op that ``csrc/cuda/*.cpp`` registers in a ``TORCH_LIBRARY_IMPL(fastcore, CUDA, m)``
  block has a kernel for the CUDA dispatch key;
* the extension's device code is for the requested architectures (``cuobjdump``), when
  the toolkit's cuobjdump is at hand.

Usage: python -P scripts/check_cuda_build.py [--arch "9.0"]   (exit status 1 on a failure)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def registered_cuda_ops() -> list[str]:
    """The op names the CUDA glue registers, read from its source."""
    names = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cpp")):
        text = source.read_text()
        for block in re.findall(
            r"TORCH_LIBRARY_IMPL\(fastcore,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", text, re.S
        ):
            names += re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', block)
    return names


def cuobjdump() -> str | None:
    home = os.environ.get("CUDA_HOME")
    found = shutil.which("cuobjdump") or (home and shutil.which("cuobjdump", path=f"{home}/bin"))
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST the build used")
    args = parser.parse_args()
    failures = []

    import torch

    import fastcore
    from fastcore import _backend

    where = Path(fastcore.__file__).resolve()
    print(f"fastcore from {where}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    if (ROOT / "fastcore") in where.parents:
        failures.append(f"fastcore was imported from the source tree ({where}), not the build")
    if _backend._C is None:
        failures.append("fastcore._C did not import")
    print(f"BUILD_INFO {_backend.BUILD_INFO}")
    if not _backend.BUILD_INFO.get("cuda", False):
        failures.append(f"BUILD_INFO does not say cuda: {_backend.BUILD_INFO}")

    ops = registered_cuda_ops()
    if not ops:
        failures.append("no TORCH_LIBRARY_IMPL(fastcore, CUDA, m) registration found in csrc/cuda")
    for name in ops:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcore::{name}", "CUDA")
        print(f"  fastcore::{name}: CUDA kernel {'registered' if has else 'MISSING'}")
        if not has:
            failures.append(f"fastcore::{name} has no CUDA kernel")

    tool = cuobjdump()
    library = Path(_backend._C.__file__) if _backend._C is not None else None
    if tool and library:
        listing = subprocess.run([tool, "--list-elf", str(library)], capture_output=True, text=True)
        archs = sorted(set(re.findall(r"sm_(\d+)", listing.stdout)))
        wanted = sorted(
            {a.replace(".", "").removesuffix("+PTX") for a in re.split(r"[;\s]+", args.arch) if a}
        )
        print(f"device code for sm_{', sm_'.join(archs) or '(none)'} in {library.name}")
        missing = [a for a in wanted if a not in archs]
        if missing:
            failures.append(
                f"no device code for sm_{missing} (cuobjdump --list-elf: {listing.stdout!r})"
            )
    else:
        print("cuobjdump not found: architectures not checked")

    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    if not failures:
        print(f"CUDA build OK: {len(ops)} ops with CUDA kernels")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
