# featup_adapters: `make install` sets up .venv (idempotent, fast when nothing changed),
# `make test` runs the whole suite, `make demo` runs the main job, `make bench` the benchmarks.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
CSRC := $(shell find featup_adapters/csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))
# CUDA code is compiled whenever a toolchain is present, even without a GPU: setup.py finds it
# (CUDA_HOME, nvcc on PATH, /usr/local/cuda) and says which it uses.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

.PHONY: install install-detectron2 test test-fast demo bench clean

$(PY):
	@echo ">> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(PY)
	@echo ">> installing $(TORCH_SPEC) and build tools into $(VENV)"
	$(PIP) install -q $(TORCH_SPEC) "setuptools>=64,<81" wheel ninja
	touch $@

$(VENV)/.deps-installed: $(VENV)/.torch-installed setup.cfg pyproject.toml
	@echo ">> installing featup_adapters (editable) with extras [dev,all]"
	FEATUP_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e '.[dev,all]'
	touch $@

$(VENV)/.ext-built: $(VENV)/.deps-installed setup.py $(CSRC)
	@echo ">> compiling the featup_adapters._C extension (CPU kernel, and the CUDA kernel if a CUDA toolchain is found)"
	FEATUP_REQUIRE_EXT=1 $(PY) setup.py -q build_ext --inplace
	touch $@

# detectron2 from the hash-checked PyPI wheel (no network to its git repository here);
# idempotent, see scripts/install_detectron2.sh.
$(VENV)/.detectron2-installed: $(VENV)/.deps-installed scripts/install_detectron2.sh
	bash scripts/install_detectron2.sh $(PY)
	touch $@

install-detectron2: $(VENV)/.detectron2-installed

install: $(VENV)/.ext-built $(VENV)/.detectron2-installed

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) -m featup_adapters bench

# The main job: one picture (image, low-res features, bilinear, JBU), offline.
demo: install
	mkdir -p outputs
	$(PY) -m featup_adapters demo --out outputs/demo.png

clean:
	rm -rf build $(VENV) featup_adapters/_C*.so *.egg-info
