# ft-appliance developer targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
IMAGE ?= ft-appliance
DATA ?= $(CURDIR)/data
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: docker/lock/common.txt docker/lock/cpu.txt docker/lock/test.txt pyproject.toml docker/install-stack.sh
	$(PYTHON) -m venv $(VENV)
	. $(VENV)/bin/activate && docker/install-stack.sh cpu && \
	  python -m pip install --disable-pip-version-check --no-deps -r docker/lock/test.txt && \
	  python -m pip install --disable-pip-version-check --no-deps -e .
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create or reuse .venv with the pinned CPU stack

.PHONY: demo
demo: venv ## Build the tiny model and run the CPU demo (2 processes) in ./ft-demo
	$(VENV)/bin/ft-appliance demo ft-demo

.PHONY: test
test: venv ## Run the test suite (real LlamaFactory on CPU; container tests need Docker)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## ruff check and format check
	$(VENV)/bin/ruff check entrypoint tests benchmarks
	$(VENV)/bin/ruff format --check entrypoint tests benchmarks

.PHONY: soak
soak: venv ## Crash-resume soak on the demo: random SIGKILLs and SIGTERMs vs an uninterrupted run
	$(VENV)/bin/ft-appliance soak --kills 6 --terms 2 --seed 1 ft-soak

.PHONY: bench
bench: ## GPU benchmark of the seed config (run on a GPU machine; see docs/benchmarks.md)
	PYTHONPATH=entrypoint $(PYTHON) benchmarks/bench.py --workdir /tmp/ft-bench --steps 25

.PHONY: bench-cpu
bench-cpu: venv ## CPU overhead and resume-time benchmark on the tiny model
	FT_NPROC=2 PYTHONPATH=entrypoint $(PY) benchmarks/bench.py --tiny --workdir /tmp/ft-bench-cpu \
	  --steps 60 --set save_steps=10 --kill-at 25 profile

.PHONY: build
build: ## Build the GPU image ($(IMAGE))
	docker build -t $(IMAGE) .

.PHONY: test-image
test-image: ## Build the CPU test image (ft-appliance:test) on a local base and wheelhouse, offline
	docker/build-test-image.sh ft-appliance:test

.PHONY: run
run: ## Run the image on every GPU with $(DATA) as /data
	docker run --rm --gpus all --ipc host -v $(DATA):/data $(IMAGE)

.PHONY: clean
clean: ## Remove the venv, the demo and caches (never touches $(DATA))
	rm -rf $(VENV) ft-demo ft-soak .pytest_cache .ruff_cache
