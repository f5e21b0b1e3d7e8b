# ocifit — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv

.PHONY: help demo test
.DEFAULT_GOAL := help

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## serve ocifit on the example nodes and post the example reviews to it (no cluster needed)
	bash example/demo.sh

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed ## install the test needs (in .venv) and run the tests
	$(VENV)/bin/python -m pytest -q test_ocifit.py
