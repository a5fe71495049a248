# fusedbn: `make demo` runs the main job, `make test` the test suite; each sets up what it needs.
#
#   make demo                     .venv with torch==2.13.0 (CPU build from PyPI), build, python -m fusedbn
#   make test                     same set-up, then pytest
#   make demo TORCH=torch==2.11.0 another torch
#   make test TORCH=              no venv, no installs: use $(PYTHON) and the torch it already has
#   make bench                    CPU benchmark (bench/bench_cpu.py), writes bench/RESULTS.md
#   make cuda-compile-check       nvcc -c of every csrc/**/*.cu against the installed torch's headers

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
DEPS = ninja numpy pybind11 setuptools wheel pytest hypothesis
NVCC ?= $(or $(wildcard $(CUDA_HOME)/bin/nvcc),$(wildcard /usr/local/cuda/bin/nvcc),nvcc)

ifeq ($(strip $(TORCH)),)
PY := $(PYTHON)
SETUP := 
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.deps
endif

.PHONY: demo test build bench cuda-compile-check clean

$(VENV)/.deps:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)" $(DEPS)
	touch $@

build: $(SETUP)
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m fusedbn

test: build
	$(PY) -m pytest -q -ra tests

bench: build
	$(PY) -m pip install -q matplotlib tqdm
	$(PY) bench/bench_cpu.py

cuda-compile-check: $(SETUP)
	$(PY) .ci/nvcc_check.py --nvcc "$(NVCC)"

clean:
	rm -rf build fusedbn/*.so
