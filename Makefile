# hl7bridge: `make serve` runs the engine, `make test` runs every test. Both create .venv and
# install what they need. `make serve` reads ./hl7bridge.yaml when there is one (cp
# examples/hl7bridge.yaml . for every option, the dashboard on); `make serve CONFIG=DIR` reads
# DIR's instead, with DIR's routes/ and mappings/ (or the shipped ones when it has none).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test bench clean docs readme browser servers

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

CONFIG ?= .

serve: $(STAMP)
	$(BIN)/hl7bridge serve --config $(CONFIG)

FHIR_SERVER := tests/fhir_server

# The test FHIR server (Medplum's router on Node): npm packages pinned in its package-lock.json.
$(FHIR_SERVER)/node_modules/.installed: $(FHIR_SERVER)/package-lock.json
	cd $(FHIR_SERVER) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The dashboard test drives Debian's Chromium; installed when missing and we may (root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	    else echo "chromium/chromedriver missing: the dashboard browser test will skip (apt-get install chromium chromium-driver)"; fi; }

# The PostgreSQL and cluster tests start Debian's PostgreSQL server and HAProxy (tests/pgserver.py,
# tests/haproxy.py); installed when missing and we may (root).
PG_BINDIR = $(firstword $(shell ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r))
servers:
	@missing=""; \
	  [ -x "$(PG_BINDIR)/initdb" ] || missing="$$missing postgresql"; \
	  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	    else echo "missing:$$missing: the PostgreSQL/HAProxy tests will skip (apt-get install$$missing)"; fi; \
	  fi

test: $(STAMP) $(FHIR_SERVER)/node_modules/.installed browser servers
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache

docs: $(STAMP)
	$(BIN)/python -m engine.cli.clidoc > docs/cli.md

# The README's session blocks, rewritten from a real run (tests/e2e/test_readme.py checks them).
readme: $(STAMP)
	$(BIN)/python tests/readme_session.py --update
