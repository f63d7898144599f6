# The verbs a person types. Everything runs from a project-local virtualenv (.venv) that
# `make setup` creates; torch is pinned through constraints.txt (a CPU wheel here).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_FLAGS ?= --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: setup model demo test test-fast lint format bench bench-quality bench-latency bench-spot-checks bench-nat validate-sim image clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt "torch==2.13.0"
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[dev]"
	@touch $@

model: setup
	$(VENV)/bin/peerd model fetch

demo: model
	$(VENV)/bin/peerd demo

lint: setup
	$(VENV)/bin/ruff check peerd protocols tests tools
	$(VENV)/bin/ruff format --check peerd protocols tests tools
	$(VENV)/bin/mypy peerd protocols
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format peerd protocols tests tools
	$(VENV)/bin/ruff check --fix peerd protocols tests tools

# Slow tests (real model, chaos) are opt-in locally: PEERD_RUN_SLOW=1 make test; CI sets CI=true.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -x -q $(PYTEST_ARGS)

bench: model
	$(PY) -m peerd.cli.bench

# perplexity and logit difference of --quant none / int8 / nf4 peers on the shipped text, through a swarm
bench-quality: model
	$(PY) -m peerd.cli.bench_quality

# Generation over links with 0/20/50/100 ms emulated RTT (a TCP delay shim per peer): plain vs speculative
bench-latency: model
	$(PY) tools/bench_latency.py

# What default spot checks cost: tokens/s with checks at their defaults vs off, side by side
bench-spot-checks: model
	$(PY) tools/bench_spot_checks.py

# NAT and weak links on an emulated internet of network namespaces (needs root and nftables)
bench-nat: setup
	$(PY) tools/bench_nat.py

# The simulator against a real 12-peer swarm in network namespaces (needs root): docs/scale.md
validate-sim: setup
	$(PY) tools/validate_sim.py

# The container image (Dockerfile); needs a Docker engine and network access to PyPI and the
# PyTorch CPU wheel index. `docker compose -f deploy/docker-compose.yml up` runs a whole swarm.
image:
	docker build -t peerd:latest .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
