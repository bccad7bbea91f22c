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
	@grep -E '^[a-z_]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed; set PYTHON=python3.11 (or newer)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv and install the project with its dev tools

run: $(STAMP) ## start the bundle (database, migrations, consumer, producer) under supervisord
	@mkdir -p var/log var/run profiles
	@$(BIN)/python -m daemons.bundle write-conf >/dev/null
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		$(SUPERVISORCTL) update >/dev/null; $(SUPERVISORCTL) start all; \
	else \
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

stop: ## stop the bundle gracefully (drain), then supervisord itself
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		$(SUPERVISORCTL) stop all; \
		$(SUPERVISORCTL) shutdown >/dev/null; \
		for i in $$(seq 1 100); do test -e var/run/supervisord.pid || break; sleep 0.2; done; \
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

drop: $(STAMP) ## roll back the latest migration (one step down)
	$(BIN)/migrator down

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

# --- observability: Prometheus and Grafana ---------------------------------------------

# --- load and profile -----------------------------------------------------------------

# --- full stack in a VM ---------------------------------------------------------------
