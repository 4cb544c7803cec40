# ternrec — every target installs what it needs on a fresh machine (see README).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Two install levels: the core (serving: `pip install -e .`, no torch) and everything (`.[train,dev]`).
CORE_STAMP := $(VENV)/.installed-core
FULL_STAMP := $(VENV)/.installed-full
PACKAGE_SOURCES := pyproject.toml $(wildcard setup.py) $(wildcard encoder/kernel/*.c encoder/kernel/*.h)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test stack bench compose-check lint install install-core system-deps kafka-jars browser-deps bench-deps docker-deps clean

demo: install-core
	$(BIN)/python -m recommender.demo

test: install system-deps kafka-jars browser-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q -rs

stack: install-core system-deps kafka-jars
	$(BIN)/python -m recommender.stack

bench: install system-deps kafka-jars bench-deps
	$(BIN)/python -m bench.run

# docker-compose.yml built and run for real: a private dockerd, loopback only (deploy/compose_check.py).
compose-check: install kafka-jars docker-deps
	$(BIN)/python -m deploy.compose_check

lint: install
	$(BIN)/ruff check .

install: $(FULL_STAMP)

install-core: $(CORE_STAMP)

# Each level re-installs when the package definition or the native kernel sources change. The full install
# also satisfies the core (its stamp is touched too); a core install never removes the extras.
$(CORE_STAMP): $(PACKAGE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(FULL_STAMP): $(PACKAGE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $@ $(CORE_STAMP)

# redis-server and a Java 17 runtime from Debian, only when missing.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Apache Kafka broker jars from Maven Central into ~/.cache/ternrec (reused when present).
kafka-jars: install-core system-deps
	$(BIN)/python -m ingest.services fetch-kafka

# Debian's Chromium and its driver for the browser test, only when missing.
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

# wrk, the HTTP load generator of the pipeline benchmark, only when missing.
bench-deps:
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)

# Debian's Docker engine and Compose, debootstrap (local base images) and iproute2, only when missing.
docker-deps:
	@missing=""; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
