# fedmq: two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := mosquitto mosquitto-clients redis-server nats-server dataset-fashion-mnist prometheus podman runc debootstrap \
	podman-compose shellcheck qemu-user-static binfmt-support

.PHONY: demo test lint typecheck unit integration bench experiments system-deps venv clean help

help:
	@echo "make demo    create $(VENV), install fedmq and run a local federation on digits"
	@echo "make test    install what the tests need (incl. Mosquitto) and run ruff, mypy, pytest"
	@echo "make bench   run the benchmarks in bench/ (figures + JSON in bench/results/)"
	@echo "make experiments  Fashion-MNIST federations (CNN, LSTM) with PNG curves in runs/"

# A venv is created once; re-installed when pyproject.toml changes.
$(VENV)/.created:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq python3-venv && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	@$(PIP) install -q --upgrade pip
	@touch $@

$(VENV)/.demo: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e '.[demo]'
	@touch $@

$(VENV)/.dev: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e '.[dev]'
	@touch $@ $(VENV)/.demo

venv: $(VENV)/.dev

# Mosquitto (the tests run a real broker), the Fashion-MNIST files and Prometheus +
# promtool (the monitoring tests), from Debian.
system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

demo: $(VENV)/.demo
	$(VENV)/bin/fedmq demo $(DEMO_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

unit: $(VENV)/.dev
	$(PY) -m pytest -q tests/unit

integration: $(VENV)/.dev system-deps
	$(PY) -m pytest -q tests/integration

test: system-deps $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

bench: $(VENV)/.dev system-deps
	$(PY) bench/bench_codecs_fold.py
	$(PY) bench/bench_training.py
	$(PY) bench/bench_compression.py

# The issue-3 federations: 10 agents on Fashion-MNIST, 20 rounds, curve in runs/*.png.
experiments: $(VENV)/.dev system-deps
	$(VENV)/bin/fedmq experiment fmnist-cnn
	$(VENV)/bin/fedmq experiment fmnist-lstm

clean:
	rm -rf $(VENV) .venv-edge* .mypy_cache .hypothesis .ruff_cache .pytest_cache build *.egg-info
