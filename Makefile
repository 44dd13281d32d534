# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml examples/sharing/pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint typecheck pytest soak demo bench bench-full bench-soak chaos reach bench-reach clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml examples/sharing/pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet -e examples/sharing --no-deps
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The member's daemon, creating the identity on first run, with the documented defaults
# (docs/operator.md): peer port 7470 on every interface, local API on loopback, mDNS off.
# Other settings as flags, e.g. make run RUN_ARGS="--mdns --log-level debug".
RUN_ARGS ?=
run: $(STAMP)
	$(VENV)/bin/valuemesh daemon --init-if-missing $(RUN_ARGS)

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check protocol node cli plugin tests bench scripts examples chaos

# mypy strict over every package and the example plugin. mypy cannot follow the editable
# install's folder-to-namespace mapping, so namespace/valuemesh/* are symlinks to the folders
# (pyproject's [tool.mypy] mypy_path), the same mapping package-dir gives setuptools.
typecheck: $(STAMP)
	$(VENV)/bin/mypy -p valuemesh.protocol -p valuemesh.node -p valuemesh.cli -p valuemesh.plugin -p valuemesh_sharing
	$(VENV)/bin/mypy -p chaos

pytest: $(STAMP)
	$(VENV)/bin/pytest -m "not reach" tests examples/sharing/tests

test: lint typecheck pytest

# One process, n = 4, every fault kind: about 27 ms of CPU per seed, so SEEDS=100000 takes
# about 45 minutes (docs/consensus.md §9). bench-soak spreads 10^5 schedules over n = 4, 7, 10, 16.
soak: $(STAMP)
	$(PY) -m valuemesh.protocol.sim --nodes 4 --seeds $${SEEDS:-5000} --faults crash,restart,partition,delay,drop,reorder,duplicate,equivocate,reconfigure,rotate

# Real faults on real daemons (docs/reliability.md): 4 daemons in network namespaces, kill -9
# under load plus one of each other fault, then the history check. Needs root (else it prints
# SKIPPED and exits 0). The long run: make chaos CHAOS_KILLS=1000.
CHAOS_KILLS ?= 20
CHAOS_SEED ?= 1
CHAOS_ARGS ?=
chaos: $(STAMP)
	$(PY) -m chaos.run --seed $(CHAOS_SEED) --kills $(CHAOS_KILLS) $(CHAOS_ARGS)

# Issue #17's scenarios on the namespace internet (docs/testbed.md, tests/test_reach_scenarios.py):
# 7 real daemons behind real NATs driven through the CLI; about 2-4 minutes on 2 cores, so
# outside `make test`. Needs root (installs nftables and miniupnpd-nftables; else skipped
# with the reason, which -rs prints).
reach: $(STAMP)
	$(VENV)/bin/pytest -m reach -s -rs tests/test_reach_scenarios.py

# Benchmarks (pysyncobj is a bench-only extra): quick < 5 min, full as the issue sizes them.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py

# Issue #17's figures on the namespace internet beside their targets (root; ~3 min a repeat).
bench-reach: $(STAMP)
	$(PY) bench/reach.py --repeats $${REPEATS:-3}

bench-soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

bench-full: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py --full

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
