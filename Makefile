# The local stack without Docker: PostgreSQL from Debian's packages, Kafka from Maven Central jars,
# the services as background processes. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
LOCAL := deploy/local
export KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:9092
export BILLING_PG_ADMIN_DSN ?= postgresql://billing_admin:billing_admin@127.0.0.1:5433/billing
PYTEST_ARGS ?=
# The local stack replays a past month (the demo), which it closes itself once everything is posted.
export LEDGER_AUTO_CLOSE_MONTHS ?= false
# The simulator's world: the demo scenario's (cli/scenario.py, DEMO); `billing demo` checks they agree.
export SIM_ARGS ?= --seed 42 --orgs 12 --spaces-per-org 3 --apps 660 --services 240 --plans 6 --start 2026-10-01T04:00:00Z

.PHONY: help install lint infra-up infra-down up down status logs test demo bench chaos load clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements.lock requirements-dev.lock
	@command -v curl >/dev/null || { source $(LOCAL)/common.sh && apt_install curl; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock -r requirements-dev.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(VENV)/.installed ## install what is missing: Python packages, PostgreSQL, Kafka's jars, Chromium (browser tests), kustomize
	@$(LOCAL)/pg.sh install
	@$(LOCAL)/kafka.sh install
	@$(LOCAL)/browser.sh install
	@deploy/k8s/kustomize.sh install

LINT_PATHS ?= shared services cli simulator tests bench examples
lint: $(VENV)/.installed ## ruff and mypy over the code
	@rc=0; $(VENV)/bin/ruff check $(LINT_PATHS) || rc=1; $(VENV)/bin/mypy || rc=1; exit $$rc

infra-up: install ## start PostgreSQL and Kafka (idempotent)
	@$(LOCAL)/pg.sh start
	@$(LOCAL)/kafka.sh start

infra-down: ## stop Kafka and PostgreSQL
	@$(LOCAL)/kafka.sh stop
	@$(LOCAL)/pg.sh stop

up: infra-up ## start everything in the background and wait until it is ready
	@$(LOCAL)/services.sh start
	@$(LOCAL)/services.sh status

down: ## stop the services, Kafka and PostgreSQL
	@$(LOCAL)/services.sh stop
	@$(MAKE) --no-print-directory infra-down

status: ## what is running
	@$(LOCAL)/services.sh status; $(LOCAL)/kafka.sh status || true; $(LOCAL)/pg.sh status || true

logs: ## follow the services' logs
	@tail -n 20 -F .local/logs/*.log

test: infra-up ## run the tests against the real Kafka and PostgreSQL
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: up ## the main job: a month of a seeded foundation through the whole pipeline, checked to the microcredit
	@for p in 8080 8081 8082 8083; do printf 'http://127.0.0.1:%s/healthz ' $$p; curl -fsS http://127.0.0.1:$$p/healthz; echo; done
	$(VENV)/bin/billing demo
	@echo "The stack stays up: api http://127.0.0.1:8080 (openapi.json), simulator http://127.0.0.1:8090; 'make down' stops it."

CHAOS_PLAN ?= full
chaos: infra-up ## kill services, restart Kafka and PostgreSQL, scale, fail CF; then check the books (CHAOS_PLAN=small|full)
	$(VENV)/bin/billing chaos --plan $(CHAOS_PLAN)

BENCH_SCALE ?= small
bench: infra-up ## measure throughput and latency (BENCH_SCALE=small|full|soak); writes bench/results.{json,md} and chart.png
	BENCH_SCALE=$(BENCH_SCALE) $(VENV)/bin/python -m bench.run

# LOAD_QUICK=1: a quick check (ingest 1 minute, api 15 s on a smaller read model), not kept in results.json.
LOAD_MINUTES ?= $(if $(LOAD_QUICK),1,10)
LOAD_API_ARGS ?= $(if $(LOAD_QUICK),--seconds 15 --resources 1000 --no-record)
load: infra-up ## the api under 50 clients for 60 s, then the ingest path at twice the e2e steady load for LOAD_MINUTES (10)
	@rc=0; $(VENV)/bin/python -m bench.load_api $(LOAD_API_ARGS) || rc=1; \
	  $(VENV)/bin/python -m bench.load_ingest --minutes $(LOAD_MINUTES) $(if $(LOAD_QUICK),--no-record) || rc=1; exit $$rc

clean: ## stop everything and delete all local data (databases, topics, logs)
	-@$(LOCAL)/services.sh stop
	-@$(LOCAL)/kafka.sh clean
	-@$(LOCAL)/pg.sh clean
	rm -rf .local
