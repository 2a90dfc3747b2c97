# Two entry points (see README): `make federation` and `make test`. Both create .venv on first use and
# reuse it afterwards; it is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
ARGS   ?=
# The pages' browser tests drive Debian's headless Chromium and its chromedriver; installed once where missing.
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# pytest-xdist workers; whole test files go to one worker, so a module's shared federation starts once, in the order
# tests/conftest.py collects them (the files with the most end-to-end tests first).
TEST_WORKERS ?= 2

.PHONY: federation test env clean
federation: $(STAMP)
	$(VENV)/bin/maxfl federate $(ARGS)

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first and pinned: anything else pulls the multi-GB CUDA build.
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[server,client,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

clean:
	rm -rf $(VENV) .maxfl .maxfl-bench .pytest_cache
