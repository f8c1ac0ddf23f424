"""Builds fastcore._C from csrc/: OpenMP CPU kernels always, CUDA kernels when usable.

Environment overrides (read at build time):
  FORCE_CUDA=1          build the CUDA kernels even when no GPU is visible (needs a CUDA torch
                        and a CUDA toolkit, e.g. on a build node without a GPU)
  FASTCORE_CPU_ONLY=1   never build the CUDA kernels
  FASTCORE_DEBUG=1      -O0 -g instead of -O3
  TORCH_CUDA_ARCH_LIST  the usual torch list of GPU architectures to compile for
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if flag("FASTCORE_CPU_ONLY"):
        return False
    forced = flag("FORCE_CUDA")
    if forced and torch.version.cuda is None:
        sys.exit(
            "FORCE_CUDA=1 needs a CUDA build of torch, but torch.version.cuda is None "
            f"(torch {torch.__version__})"
        )
    if forced and CUDA_HOME is None:
        sys.exit("FORCE_CUDA=1 needs a CUDA toolkit, but none was found (set CUDA_HOME)")
    return forced or (
        torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()
    )


def sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    with_cuda = want_cuda()
    debug = flag("FASTCORE_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno: sqrt never sets errno, so the compiler may vectorise it (the kernels
    # never read errno; the values are the same, sqrt being correctly rounded either way).
    cxx = [
        *opt,
        "-fopenmp",
        "-std=c++20",
        "-ffp-contract=fast",
        "-fno-math-errno",
        "-Wall",
        "-Wno-unknown-pragmas",
    ]
    files = [*sources("csrc/*.cpp"), *sources("csrc/cpu/*.cpp")]
    macros = []
    kwargs = {"extra_link_args": ["-fopenmp"]}
    if with_cuda:
        files += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
        macros.append(("FASTCORE_WITH_CUDA", None))
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": [*opt, "-std=c++17", "--expt-relaxed-constexpr"],
        }
        return CUDAExtension("fastcore._C", files, define_macros=macros, **kwargs)
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return CppExtension("fastcore._C", files, define_macros=macros, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
