# fusedbn: `make demo` runs the main job, `make test` the test suite; each sets up what it needs.
#
#   make demo                     .venv with torch==2.13.0 (CPU build from PyPI), build, python -m fusedbn
#   make test                     same set-up, then pytest; then test-newest
#   make test-newest              .venv-newest with the newest supported torch (2.14.1, a CUDA build that runs on the
#                                 CPU) and the model libraries torchvision and timm; its own build; pytest
#   make demo TORCH=torch==2.11.0 another torch (supported: 2.11 to 2.14, setup.py)
#   make test TORCH=              no venv, no installs: use $(PYTHON) and the torch it already has (no test-newest)
#   make bench                    CPU benchmark (bench/bench_cpu.py), writes bench/RESULTS.md
#   make cuda-compile-check       nvcc -c of every csrc/**/*.cu against the installed torch's headers

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
DEPS = ninja numpy pybind11 setuptools wheel pytest hypothesis expecttest
# torchvision's wheels need a CUDA build of torch, so the model libraries are tested beside the newest torch only.
NEWEST ?= torch==2.14.1 torchvision==0.29.1 timm==1.0.31
NEWEST_VENV ?= .venv-newest
NEWEST_BUILD := build-newest
NVCC ?= $(or $(wildcard $(CUDA_HOME)/bin/nvcc),$(wildcard /usr/local/cuda/bin/nvcc),nvcc)

ifeq ($(strip $(TORCH)),)
PY := $(PYTHON)
SETUP := 
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.deps
endif

.PHONY: demo test test-newest build bench cuda-compile-check clean

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
ifneq ($(strip $(TORCH)),)
	$(MAKE) test-newest
endif

$(NEWEST_VENV)/.deps:
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q $(NEWEST) $(DEPS)
	touch $@

# A build of its own (build-newest/), imported through PYTHONPATH from tests/ so that the in-place build of the
# pinned torch is not picked up.
test-newest: $(NEWEST_VENV)/.deps
	$(NEWEST_VENV)/bin/python setup.py -q build --build-base $(NEWEST_BUILD) --build-lib $(NEWEST_BUILD)/lib
	cd tests && PYTHONPATH=$(CURDIR)/$(NEWEST_BUILD)/lib $(CURDIR)/$(NEWEST_VENV)/bin/python -m pytest -q -ra \
		-p no:cacheprovider .

bench: build
	$(PY) -m pip install -q matplotlib tqdm
	$(PY) bench/bench_cpu.py

cuda-compile-check: $(SETUP)
	$(PY) .ci/nvcc_check.py --nvcc "$(NVCC)"

clean:
	rm -rf build $(NEWEST_BUILD) fusedbn/*.so
