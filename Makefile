# Sendtime developer commands. `make run` and `make test` are the two that matter; each
# creates .venv and installs the pinned dependencies first.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PY := $(BIN)/python

export PYTHONPATH := $(CURDIR)/gen/python:$(CURDIR)/libs:$(CURDIR)/services:$(CURDIR)/scripts
export PATH := $(BIN):$(PATH)

.PHONY: help install up down run demo test deploy-check kubectl test-fast fuzz lint gen gen-check breaking clean bench bench-ingest bench-profile bench-render bench-http bench-triggers bench-sync bench-scale

help:
	@echo "make run        start Postgres/Redis/NATS if needed, the four services, a demo; Ctrl-C stops"
	@echo "make demo       the same, but exit after the demo (0 when it worked)"
	@echo "make test       install what is needed and run the whole test suite"
	@echo "make fuzz       the fuzz tests (tests/fuzz) with many examples each; make test runs a small slice"
	@echo "make lint       buf lint, ruff, mypy"
	@echo "make deploy-check  build deploy/'s overlays, check schemas (Kubernetes 1.32) and policies"
	@echo "make gen        regenerate gen/python and openapi/ from protos/, the Grafana dashboards;  make gen-check: fail when stale"
	@echo "make breaking   buf breaking against main"
	@echo "make up / down  start / stop the local dependencies this checkout started"
	@echo "                NATS_CLUSTER_NODES=3 (with up, run or demo): NATS as a 3-server JetStream cluster, streams R3"
	@echo "                NATS_EVENT_PARTITIONS=4 (with up, run or demo): the event stream in 4 partitions, one merger each"
	@echo "make bench      every benchmark (docs/benchmarks.md); or one: bench-ingest, bench-profile, bench-render,"
	@echo "                bench-http, bench-triggers, bench-sync, bench-scale"
	@echo "                options go in BENCH_ARGS, e.g. make bench-ingest BENCH_ARGS='--events 5000'"
	@echo "make soak       30 min of mixed load at half the maximum rate: memory, files, tasks, pools flat? p99 stable?"
	@echo "                (docs/reliability.md); options in SOAK_ARGS, e.g. make soak SOAK_ARGS='--duration-s 300'"
	@echo "make chaos      the fault matrix under load: kills, restarts, slow and cut-off dependencies; lost?"
	@echo "                duplicated? late renders? recovery? (docs/reliability.md); e.g. CHAOS_ARGS='--runs 1'"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

up: install
	$(PY) scripts/devstack.py up

down: install
	$(PY) scripts/devstack.py down

run: install
	$(PY) scripts/suite.py run

demo: install
	$(PY) scripts/suite.py demo

# The suite must stay under 10 minutes. First the few tests marked `alone`, whose goals depend
# on spare capacity, with the machine to themselves (run after the rest, the chaos matrix took 76
# and 137 s where it takes 40, and once missed a recovery goal). Then the rest in
# TEST_WORKERS processes (pytest-xdist; those sharing a cluster-wide resource, such as
# PostgreSQL's roles, in one: their xdist_group). Each part lists its slowest tests; a failure in
# the first still runs the second.
# Three on two cores: the third runs while the others wait (the parallel part took 445 s with
# two, 362 s with three).
TEST_WORKERS ?= 3
test: install kubectl
	$(PY) scripts/devstack.py ensure
	status=0; \
	$(PY) -m pytest -m alone --durations=5 || status=$$?; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not alone" --durations=25 || { rest=$$?; [ $$status -ne 0 ] || status=$$rest; }; \
	exit $$status

# deploy/: the overlays built by `kubectl kustomize`, checked against Kubernetes 1.32's schemas
# and the policy (tests/deploy, tests/test_deploy.py); no cluster needed.
deploy-check: install kubectl
	$(PY) -m pytest tests/deploy tests/test_deploy.py

kubectl:
	@command -v kubectl >/dev/null || { echo "kubectl not found: the deploy tests build the overlays with" \
		"'kubectl kustomize'; install kubectl 1.32 (the Kubernetes apt repository's kubectl package)" >&2; exit 1; }

# Long: 20,000 examples a test, random each run; failures are kept in .hypothesis/ and replayed
# first next time. `make test` runs the same tests as a derandomized slice of seconds.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/fuzz --timeout=0

lint: install
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# gen/python first: the OpenAPI document is built from the generated descriptors. The Grafana
# dashboards (deploy/components/prometheus/dashboards/) come from scripts/gen_dashboards.py.
gen: install
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_openapi.py
	$(PY) scripts/gen_dashboards.py

DASHBOARDS := deploy/components/prometheus/dashboards/

gen-check: gen
	@git diff --exit-code --stat -- gen/ openapi/ $(DASHBOARDS) && test -z "$$(git status --porcelain -- gen/ openapi/ $(DASHBOARDS))" \
		|| (echo "gen/python, openapi/ or the dashboards are stale: run 'make gen' and commit them" >&2; exit 1)

# Benchmarks start their own NATS, Redis, database and services; only PostgreSQL must be reachable.
bench: bench-ingest bench-profile bench-render bench-http bench-triggers bench-sync bench-scale

bench-ingest: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_ingest.py $(BENCH_ARGS)

bench-profile: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_profile.py $(BENCH_ARGS)

bench-render: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_render.py $(BENCH_ARGS)

bench-http: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_http.py $(BENCH_ARGS)

bench-triggers: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_triggers.py $(BENCH_ARGS)

bench-sync: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_sync.py $(BENCH_ARGS)

bench-scale: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/bench_scale.py $(BENCH_ARGS)

# The soak (docs/reliability.md) starts its own stack, as the benchmarks do; exits 3 when a verdict fails.
.PHONY: soak
soak: install
	$(PY) scripts/devstack.py ensure
	$(PY) scripts/soak.py $(SOAK_ARGS)

breaking: install
	$(BIN)/buf breaking --against '.git#branch=main'

# The fault matrix (docs/reliability.md): a stack of its own, PostgreSQL cluster included, under a
# mixed load; one fault at a time, then a reconciliation. Exits 3 when an invariant broke.
.PHONY: chaos
chaos: install
	$(PY) scripts/chaos.py $(CHAOS_ARGS)

# devstack's clean: down, and the PostgreSQL cluster it may keep outside .run (scripts/devstack.py).
clean: install
	$(PY) scripts/devstack.py clean
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
