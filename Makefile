# Two entry points for newcomers: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedmerge-installed

# the offline data folder beside a clone (CI layout), if present; FEDMERGE_DATA in the environment wins
FEDMERGE_DATA ?= $(wildcard $(abspath ../shared/data))
export FEDMERGE_DATA

.PHONY: demo test bench install clean compose compose-tls

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first and pinned: pip takes them from the local wheel cache where one exists
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q "torch<=2.14.1" "torchvision<=0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fedmerge.cli demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS)

# docker/compose.yaml run for real, one CCA round with NUM_SUPERNODES (default 3) SuperNodes, checked and torn down:
# Docker where an engine answers, else Podman (installed with apt-get when missing); see docker/README.md
compose:
	bash scripts/compose_local.sh $(COMPOSE_ARGS)

compose-tls:
	bash scripts/compose_local.sh --tls $(COMPOSE_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks --scale cpu --out results/cpu

clean:
	rm -rf $(VENV) runs results .pytest_cache
