# fastcore's commands. Each sets itself up on a fresh machine: a virtual environment in
# $(VENV), a pinned CPU torch (override TORCH_SPEC on other machines), the package built
# in place with its C++ extension, then the job.
#
#   make train   the basin job on the Rhine network: the graph-free GRU baseline, the
#                hierarchical model, then the report (runs/basin/report.md)
#   make test    the whole test suite (Triton kernels under TRITON_INTERPRET=1 without a GPU,
#                and a compile-only check of every CUDA source where nvcc is installed)
#   make bench   the benchmarks, a ratio table and bench/results/<device>-<date>.json
#   make lint    ruff
#   make cuda-build  the whole extension with its CUDA kernels (sm_90), in .venv-cuda with
#                the GPU machines' torch 2.11 + CUDA 13.0 and Triton 3.6; no GPU needed
#   make cuda-test   the CPU suite under that torch, Triton and extension
#   make triton-aot  every Triton kernel compiled for sm_90 at the bench shapes, all dtypes
#   make gpu-check   the one prepared GPU run (scripts/gpu_check.sh; GPU_CHECK_ARGS=--dry-run
#                on a CPU machine, --long for the longer set)
#   make clean   remove build outputs (the virtual environment stays)

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PYTEST_ARGS ?=
# Benchmarks run with glibc keeping freed memory mapped (as jemalloc/tcmalloc do): without
# it every output over 32 MB is a fresh mmap whose page faults cost more than most
# kernels. The same setting applies to every provider of a run; compare.py records it.
BENCH_ENV   ?= MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736

PY       := $(VENV)/bin/python
DEPS     := $(VENV)/.deps-installed
BUILT    := $(VENV)/.fastcore-built
SOURCES  := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

TRAIN_CONFIG ?= configs/basin.yaml
TRAIN_RUNS   ?= runs/basin
TRAIN_ARGS   ?=

.PHONY: train test bench lint clean cuda-build cuda-test triton-aot gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)" "setuptools>=77" wheel ninja
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

# Each make train starts its two runs afresh (their old run directories are removed).
train: $(BUILT)
	rm -rf $(TRAIN_RUNS)/gru $(TRAIN_RUNS)/hierarchical
	$(PY) -m fastcore.train --config $(TRAIN_CONFIG) model.arch=gru run_dir=$(TRAIN_RUNS)/gru $(TRAIN_ARGS)
	$(PY) -m fastcore.train --config $(TRAIN_CONFIG) run_dir=$(TRAIN_RUNS)/hierarchical $(TRAIN_ARGS)
	$(PY) -m fastcore.train.basin_report --runs $(TRAIN_RUNS)

test: $(BUILT)
	$(PY) -m pytest tests $(PYTEST_ARGS)

BENCH_FILES ?= $(filter-out bench/test_bench_copy.py,$(wildcard bench/test_bench_*.py))

# One process per bench file, each with its own copy-bandwidth measurement.
bench: $(BUILT)
	rm -rf bench/.runs && mkdir -p bench/.runs
	for f in $(BENCH_FILES); do \
		$(BENCH_ENV) $(PY) -m pytest bench/test_bench_copy.py $$f -q -p no:cacheprovider \
			--benchmark-max-time=0.5 --benchmark-min-rounds=5 \
			--benchmark-json=bench/.runs/$$(basename $$f .py).json $(PYTEST_ARGS) || exit 1; \
	done
	$(BENCH_ENV) $(PY) bench/compare.py bench/.runs/*.json

cuda-build:
	PYTHON=$(PYTHON) scripts/cuda_build.sh

cuda-test:
	scripts/cuda_build.sh test $(PYTEST_ARGS)

triton-aot: $(BUILT)
	$(PY) scripts/triton_aot.py

# On the GPU machine: its own python and torch (no venv, no network).
GPU_CHECK_ARGS ?=
gpu-check: $(if $(filter --dry-run,$(GPU_CHECK_ARGS)),$(BUILT))
	PY=$(if $(filter --dry-run,$(GPU_CHECK_ARGS)),$(PY),python) scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: $(BUILT)
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check .

clean:
	rm -rf build fastcore/_C*.so fastcore.egg-info bench/.runs $(BUILT)
