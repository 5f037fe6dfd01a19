# CloudTask developer commands. `make up` runs CloudTask on this machine; `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= .cloudtask
ARGS ?=

.PHONY: up admin test chaos compare lint format deps zookeeper browser ldap oidc-provider clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Installs the package in editable mode with its test and embedded extras; re-runs when setup.cfg changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,embedded]'
	touch $@

deps: $(VENV)/.installed zookeeper

zookeeper:
	@sh scripts/ensure-zookeeper.sh

# Debian's chromium for the browser tests (Playwright drives the system browser; it never
# downloads one)
browser:
	@sh scripts/ensure-chromium.sh

# Debian's slapd and ldap-utils for the LDAP login tests (they start their own slapd)
ldap:
	@sh scripts/ensure-ldap.sh

# the OpenID Connect provider of the login tests: Node.js, and oidc-provider from the npm
# registry installed into tests/oidc/node_modules (npm ci, pinned by its package-lock.json)
oidc-provider:
	@sh scripts/ensure-oidc-provider.sh

up: deps
	$(BIN)/cloudtask up --data-dir $(DATA_DIR) $(ARGS)

# The first admin of the cluster `make up` runs (in another shell, while it runs): asks for the
# name (or NAME=...) and the password. The address comes from $(DATA_DIR)/running.json.
NAME ?=
admin: $(VENV)/.installed
	@name='$(NAME)'; \
	if [ -z "$$name" ]; then printf 'name of the admin [admin]: '; read -r name || exit 1; fi; \
	CLOUDTASK_DATA_DIR='$(DATA_DIR)' $(BIN)/cloudtask user add "$${name:-admin}" --role admin

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: deps browser ldap oidc-provider lint
	$(BIN)/python -m pytest $(ARGS)

# The long chaos run: a whole cluster under 1,000 random faults, judged by the tasks' own
# execution records (bench/chaos.py; about an hour). CHAOS_ARGS="--seed 7 --faults agent_kill=1"
CHAOS_ARGS ?= --cycles 1000
chaos: deps
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS)

# CloudTask against APScheduler 3 on the same workloads, side by side (bench/compare.py; about
# 11 minutes)
compare: deps
	$(BIN)/pip install --quiet -e '.[bench,embedded]'
	$(BIN)/python bench/compare.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info $(DATA_DIR)
