# Two entry points (see README): `make federation` and `make test`. Both create .venv on first use and
# reuse it afterwards; it is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
ARGS   ?=
# pytest-xdist workers; whole test files go to one worker, so a module's shared federation starts once.
TEST_WORKERS ?= 2

.PHONY: federation test env clean
federation: $(STAMP)
	$(VENV)/bin/maxfl federate $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first and pinned: anything else pulls the multi-GB CUDA build.
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[server,client,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .maxfl .maxfl-bench .pytest_cache
