# One virtual environment for everything. torch: the CPU build 2.13.0 is installed when the venv
# has no torch (never let pip resolve a bare `torch`, which pulls the CUDA build). To use your own
# torch (e.g. CUDA), create the venv with it first, or point VENV at one that has it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ppap-installed

.PHONY: install demo test lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,bench,lint,ui]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ppap demo

# one test process per core (pytest-xdist), a file's tests in one process (their module fixtures
# are built once)
test: $(STAMP)
	$(PY) -m pytest -q --timeout 600 -n auto --dist loadfile

# ruff (rules in pyproject.toml) and mypy on the public API's modules; CI runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

# the paper's comparison and the dense-guidance bench (times on 2 CPU cores: docs/reproducing.md);
# both keep every finished stage under runs/ and resume when re-run
bench: $(STAMP)
	$(VENV)/bin/ppap bench classifier
	$(VENV)/bin/ppap bench dense

# on a machine with CUDA: the device and dtype tests on the GPU, `ppap bench scale` in float32 /
# float16 / bfloat16 at batch 1, 16, 64, and the zoo's sampling throughput (docs/SCALE.md); figures
# in docs/gpu-check.json. Without CUDA it stops with one line.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out docs/gpu-check.json

clean:
	rm -rf demo_out .pytest_cache
