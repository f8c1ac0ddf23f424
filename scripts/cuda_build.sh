#!/usr/bin/env bash
# make cuda-build: the whole extension, CUDA kernels included, built and imported on a
# machine without a GPU, in its own virtual environment with the GPU machines' versions.
#
#   1. $CUDA_VENV (default .venv-cuda): a CUDA build of torch ($CUDA_TORCH_SPEC, default
#      torch==2.11.0, CUDA 13.0) and $CUDA_TRITON_SPEC (triton==3.6.0), the test extras;
#   2. the toolkit: $CUDA_HOME, else the one whose nvcc is on PATH; cuSPARSE and the other
#      library headers torch's CUDA headers include come from torch's nvidia-* wheels;
#   3. a copy of the working tree (tracked and unignored files) in build/cuda/src, built
#      there with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (default 9.0) and
#      installed into the venv (not in place: the CPU build in fastcore/ stays as it is);
#      ninja rebuilds only what changed since the last run;
#   4. scripts/check_cuda_build.py, from outside the tree: the installed fastcore._C says
#      cuda, every op the CUDA glue registers has a CUDA kernel, the cubins are sm_XX.
#
# `make cuda-test` then runs the CPU suite with this interpreter (torch 2.11, Triton 3.6,
# the CUDA-built extension): scripts/cuda_build.sh test [pytest args].
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.11.0}
TRITON_SPEC=${CUDA_TRITON_SPEC:-triton==3.6.0}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
PYTHON=${PYTHON:-python3}
PY=$VENV/bin/python
SRC=build/cuda/src

if [[ ${1:-} == test ]]; then
    shift
    [[ -f $VENV/.fastcore-cuda-built ]] || { echo "run make cuda-build first" >&2; exit 2; }
    # PYTHONSAFEPATH: neither pytest nor the subprocesses the tests start put the source
    # tree on sys.path, so `import fastcore` is the CUDA build installed in the venv.
    export PYTHONSAFEPATH=1
    "$PY" -c 'import fastcore, torch, triton; print("fastcore", fastcore.__file__, "torch", torch.__version__, "triton", triton.__version__)'
    exec "$PY" -m pytest tests "$@"
fi

start=$(date +%s)
if [[ ! -x $PY ]]; then
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
fi
# Quick when already satisfied. setuptools: 77 reads the SPDX license string (a Python 3.11
# venv starts with 65); torch 2.11 asks for <82.
# numpy<2.4: Triton 3.6's interpreter converts one-element arrays with int(), which NumPy
# 2.4 rejects (every interpreted kernel fails); Triton 3.9 does not.
"$PY" -m pip install --quiet "$TORCH_SPEC" "$TRITON_SPEC" "setuptools>=77" "numpy<2.4" wheel ninja
echo "[cuda-build] venv ready after $(($(date +%s) - start)) s: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

if [[ -z ${CUDA_HOME:-} ]]; then
    if ! command -v nvcc > /dev/null; then
        echo "[cuda-build] no nvcc on PATH and no CUDA_HOME: install a CUDA toolkit (13.0) or set CUDA_HOME" >&2
        exit 1
    fi
    # nvcc may be a wrapper script; its own dry run names the toolkit root.
    top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    CUDA_HOME=$(cd "${top:-$(dirname "$(command -v nvcc)")/..}" && pwd)
fi
export CUDA_HOME
echo "[cuda-build] toolkit $CUDA_HOME: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for d in "$site"/nvidia/*/include "$site"/nvidia/*/*/include; do
    [[ -d $d ]] && CPATH="$d${CPATH:+:$CPATH}"
done
export CPATH

mkdir -p "$SRC"
# Tracked and unignored files, with their mtimes, so that ninja recompiles only what changed.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$SRC"

build_start=$(date +%s)
(
    cd "$SRC"
    # The test extras come along (torch is already satisfied, so it stays).
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$ROOT/$PY" -m pip install --no-build-isolation --quiet ".[test]"
)
echo "[cuda-build] built and installed in $(($(date +%s) - build_start)) s"
touch "$VENV/.fastcore-cuda-built"
PYTHONSAFEPATH=1 "$PY" scripts/check_cuda_build.py --arch "$ARCH"
echo "[cuda-build] done in $(($(date +%s) - start)) s"
