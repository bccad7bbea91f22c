# The one list of commands: the README, CI and developers call these targets.
# Needs only Python 3.11+, make and git.

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
SUPERVISORCTL := $(BIN)/supervisorctl -c $(CURDIR)/$(VENV)/etc/supervisord.conf
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv run stop status logs test producer consumer migrate drop explain version \
        proto_gen lint format db_url psql clean

help: ## list the targets
	@grep -E '^[a-z_]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed; set PYTHON=python3.11 (or newer)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv and install the project with its dev tools

# Scale out on one host: make run CONSUMERS=3 PRODUCERS=2 (make stop first to change).
CONSUMERS ?= 1
PRODUCERS ?= 1

run: $(STAMP) ## start the bundle under supervisord (CONSUMERS=n PRODUCERS=m to scale out)
	@mkdir -p var/log var/run profiles
	@$(BIN)/python -m daemons.bundle write-conf --consumers $(CONSUMERS) --producers $(PRODUCERS) >/dev/null
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		$(SUPERVISORCTL) update >/dev/null; $(SUPERVISORCTL) start all; \
	else \
		EXTRA_CONSUMERS=$$(($(CONSUMERS) - 1)) EXTRA_PRODUCERS=$$(($(PRODUCERS) - 1)) \
		PRODUCER_CONSUMER_TARGET=$${PRODUCER_CONSUMER_TARGET:-$$($(BIN)/python -m daemons.bundle consumer-target $(CONSUMERS))} \
		$(BIN)/supervisord -c $(CURDIR)/$(VENV)/etc/supervisord.conf; \
	fi
	@$(BIN)/python -m daemons.bundle wait-flowing --tasks 10 --timeout 150
	@$(SUPERVISORCTL) status || true
	@echo
	@echo "The bundle is running. Next:"
	@echo "  . $(VENV)/bin/activate && supervisorctl status    programs (start/stop/restart/tail)"
	@echo "  make logs                    follow the producer and consumer logs (var/log/)"
	@echo "  make psql                    SQL shell: select state, count(*) from tasks group by 1;"
	@echo "  curl -s 127.0.0.1:9102/metrics | grep ^tasks_    consumer metrics (producer: 9101)"
	@echo "  make stop                    stop everything"

# shutdown, not `stop all` (which signals every program at once, PostgreSQL too):
# supervisord stops the programs in reverse priority, each once the one before has
# stopped, so the daemons drain while the database still takes their writes.
stop: ## stop the bundle gracefully (drain), then supervisord itself
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		$(SUPERVISORCTL) shutdown >/dev/null; \
		for i in $$(seq 1 600); do test -e var/run/supervisord.pid || break; sleep 0.2; done; \
		echo "bundle stopped"; \
	else echo "bundle not running"; fi

status: ## supervisorctl status
	@$(SUPERVISORCTL) status || true

logs: ## follow the producer and consumer logs
	tail -F var/log/producer.log var/log/consumer.log

test: $(STAMP) ## run every test (unit, integration, system); CI=true turns skips into failures
	$(BIN)/python -m pytest $(PYTEST_ARGS)

producer: $(STAMP) ## run the producer in the foreground (the database must be up: make run)
	$(BIN)/producer

consumer: $(STAMP) ## run the consumer in the foreground (the database must be up: make run)
	$(BIN)/consumer

migrate: $(STAMP) ## apply the next migration (one step up)
	$(BIN)/migrator up --one

# Rolling back 0001 drops the tasks table: the migrator refuses, says how many tasks it
# would delete, and goes ahead only with FORCE=1 (its --drop-tasks).
FORCE ?=
drop: $(STAMP) ## roll back the latest migration (one step down; 0001, which drops every task, needs FORCE=1)
	$(BIN)/migrator down $(if $(filter 1 yes true,$(FORCE)),--drop-tasks) $(ARGS)

explain: $(STAMP) ## print every setting of both daemons with value, source and meaning
	@$(BIN)/producer --explain
	@echo
	@$(BIN)/consumer --explain

version: $(STAMP) ## print the daemons' version and commit
	@$(BIN)/producer --version
	@$(BIN)/consumer --version

proto_gen: $(STAMP) ## regenerate the gRPC stubs in daemons/rpc from proto/
	$(BIN)/python -m daemons.protogen

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check daemons tests loadtest
	$(BIN)/ruff format --check daemons tests loadtest
	$(BIN)/mypy daemons

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix daemons tests loadtest
	$(BIN)/ruff format daemons tests loadtest

db_url: $(STAMP) ## print the URL of the database the bundle uses
	@$(BIN)/python -m daemons.bundle db-url

psql: $(STAMP) ## open psql on the bundle's database
	$$($(BIN)/python -c 'from daemons.localdb import bin_dir; print(bin_dir())')/psql "$$($(BIN)/python -m daemons.bundle db-url)"

clean: ## remove the venv and var/ (the local database too); the bundle must be stopped
	rm -rf $(VENV) var

# --- benchmark -------------------------------------------------------------------------
# A private bundle (own PostgreSQL in a temp dir, own ports), both workloads, the psycopg
# ceiling and the single-task RPC figure; a table, one JSON line, charts in profiles/.
# e.g. make bench BENCH_ARGS="--seconds 10 --workloads zero --py-spy"
BENCH_ARGS ?=
.PHONY: bench

bench: $(STAMP) ## benchmark a private bundle: tasks/s, latency, CPU/1k, ceiling (CONSUMERS= BENCH_ARGS=)
	@mkdir -p profiles
	$(BIN)/python -m daemons.bench --consumers $(CONSUMERS) --producers $(PRODUCERS) $(BENCH_ARGS)

# Not in CI: SOAK_MINUTES at about half the max rate, with retention short enough to run
# many times; a row per minute as it ends, then first-5 vs last-5-minute ratios.
SOAK_RATE ?= 35000
SOAK_MINUTES ?= 10
SOAK_RETENTION ?= 3m
.PHONY: soak
soak: $(STAMP) ## soak at ~half the max rate, a row per minute (SOAK_MINUTES, SOAK_RATE, SOAK_RETENTION)
	@mkdir -p profiles
	$(BIN)/python -m daemons.bench --workloads default --seconds $$(( $(SOAK_MINUTES) * 60 )) \
		--warmup 30 --rpc-seconds 0 --ceiling-seconds 0 --minute-rows \
		--set PRODUCER_RATE=$(SOAK_RATE) --set TASKS_RETENTION=$(SOAK_RETENTION) $(BENCH_ARGS)

# --- observability: Prometheus and Grafana ---------------------------------------------
.PHONY: prometheus

prometheus: $(STAMP) ## the URL of the Prometheus `make run` runs, its rules loaded, alerts firing
	@$(BIN)/python -m daemons.bundle prometheus

# --- load and profile -----------------------------------------------------------------
# Locust against the running consumer; live profiles of a running daemon by pid (from
# supervisorctl unless PID= is given), written into OUT= (profiles/) with a timestamped
# name and a stable *-latest name. loadtest/profile.sh does the profiling for all of them.

USERS ?= 20
SPAWN_RATE ?= 20
DURATION ?= 15s
LOCUST_HOST ?=
MAX_ERROR_RATIO ?= 0.01
SECONDS ?= 10
PID ?=
OUT ?= profiles
PROFILING_PORT ?=
PROFILE_SH = SUPERVISORCTL="$(SUPERVISORCTL)" $(CURDIR)/loadtest/profile.sh -o $(OUT) -s $(SECONDS) \
	$(if $(PID),-p $(PID)) $(if $(PROFILING_PORT),-P $(PROFILING_PORT))
PROFILE_TARGETS := $(foreach d,consumer producer,$(d)_cpu $(d)_heap $(d)_stacks)
.PHONY: loadtest profiles consumer_profiles producer_profiles consumer_goroutine \
        producer_goroutine $(PROFILE_TARGETS)

loadtest: $(STAMP) ## Locust on the consumer (USERS=20 SPAWN_RATE=20 DURATION=15s): profiles/locust*
	@mkdir -p profiles
	$(BIN)/locust -f loadtest --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
		$(if $(LOCUST_HOST),--host $(LOCUST_HOST)) --max-error-ratio $(MAX_ERROR_RATIO) \
		--csv profiles/locust --html profiles/locust-report.html --only-summary

consumer_cpu: ## CPU flame graph (SVG, speedscope) of the live consumer, SECONDS=10; producer_cpu too
consumer_heap: ## heap flame graph + stats (memray attach), SECONDS=10; producer_heap too
consumer_stacks: ## threads + asyncio tasks dump (alias consumer_goroutine); producer_stacks too
consumer_profiles: ## cpu, heap and stacks of the consumer; producer_profiles too
profiles: consumer_profiles producer_profiles ## every profile of both daemons

$(PROFILE_TARGETS):
	@$(PROFILE_SH) $(lastword $(subst _, ,$@)) $(firstword $(subst _, ,$@))

consumer_profiles producer_profiles:
	@$(PROFILE_SH) all $(firstword $(subst _, ,$@))

consumer_goroutine: consumer_stacks
producer_goroutine: producer_stacks

# --- full stack in a VM ---------------------------------------------------------------
# `vagrant up` itself needs VirtualBox or libvirt; these checks need neither.

.PHONY: vm_check

vm_check: $(STAMP) ## check the VM without booting it: vagrant validate, shellcheck, rendered configs
	$(BIN)/python -m pytest tests/unit/test_vagrant.py tests/system/test_vm_provisioning.py $(PYTEST_ARGS)
