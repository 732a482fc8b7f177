# The README's two commands. Both create .venv if missing and install (idempotent: the install
# step is skipped while pyproject.toml is unchanged since the last install).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch pinned in the same command: an unpinned resolve pulls the CUDA build.
	# (grep drops pip's notes about local mirror folders that some machines lack.)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]" 2>&1 \
		| { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m demo

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q
