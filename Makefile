# The commands a newcomer needs: `make run` and `make test`. Everything installs into .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# GPU users: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see README)
TORCH_INDEX ?=
NPROC ?= 2
ARGS ?=

.PHONY: setup run test test-fsdp test-compile test-slurm test-s3 test-docker test-torchx lint format chaos bench clean

# The stamp names the torch build, so `make setup TORCH_INDEX=...` after a CPU setup reinstalls.
STAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)$(if $(TORCH_INDEX),-$(notdir $(TORCH_INDEX)))

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--force-reinstall --index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-torch-*
	touch $@

run: setup
	$(VENV)/bin/ftjob --nproc-per-node=$(NPROC) -- $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests/unit tests/dist tests/e2e

# Sharded training (FSDP2 / HSDP over gloo) killed, restarted and resharded by real torchrun runs.
test-fsdp: setup
	$(PY) -m pytest -q -n 2 --dist load --durations=10 tests/fsdp

# torch.compile'd runs (inductor compiles on 2 cores: minutes) resume bit-exact, to and from plain ones.
test-compile: setup
	$(PY) -m pytest -q --durations=5 tests/compile

# A real two-node SLURM cluster on loopback (root: installs Debian's Slurm, tests/slurm/cluster.sh).
test-slurm: setup
	$(PY) -m pytest -q tests/slurm

# Durable checkpoints in object storage, against a real S3 server on loopback (tests/s3_local.py).
test-s3: setup
	$(PY) -m pytest -q tests/s3

# The image built and run for real (root: installs Debian's docker.io and debootstrap, starts dockerd,
# makes a local Debian base; tests/docker/engine.sh).
test-docker: setup
	$(PY) -m pytest -q tests/docker

# TorchX's local scheduler running launch/torchx_component.py. TorchX lives in a venv of its own
# (it pins urllib3 below what the S3 client wants), as on a submitting machine without the job.
TORCHX_VENV := .venv-torchx
$(TORCHX_VENV)/bin/torchx:
	$(PYTHON) -m venv $(TORCHX_VENV)
	$(TORCHX_VENV)/bin/pip install -q torchx==0.7.0

test-torchx: setup $(TORCHX_VENV)/bin/torchx
	TORCHX=$(TORCHX_VENV)/bin/torchx $(PY) -m pytest -q tests/torchx

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

chaos: setup
	$(PY) tests/chaos/run.py

bench: setup
	$(PY) tests/bench/run.py

clean:
	rm -rf $(VENV) $(TORCHX_VENV) runs .pytest_cache .ruff_cache
