# Two commands: `make quickstart` and `make test`. Each creates/refreshes .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first: the CPU build by default (the 2.13.0 wheel); pick a CUDA build with e.g.
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cu124" quickstart
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
# Local data mirror (read before any download): ../shared/data when it exists, unless already set.
ifneq ($(wildcard $(SHARED_DATA)),)
export BYOLLM_DATA_MIRROR ?= $(SHARED_DATA)
endif
export PYTHONHASHSEED ?= 0
# Spinning OpenMP threads collapse throughput when another process shares the cores (measured 10-30x).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: quickstart test lint setup setup-dev clean help requirements constraints package-check capstone
help:
	@echo "make quickstart  set up .venv and train + sample a small model on Tiny Shakespeare (CPU, minutes)"
	@echo "make test        set up .venv with dev extras, run ruff and the test suite"
	@echo "make docs        build the guide as a website into site/ (mkdocs --strict)"
	@echo "make sections    run every section's project in order (QUICK=1: the small configurations)"
	@echo "make capstone    data to a served, evaluated chat assistant with RAG over this guide (SIZE=tiny|cpu|gpu)"

# setuptools' editable build warns on every install that a folder named like the package may shadow it (ours is
# the package itself); the warning is a UserWarning, silenced for those installs only. Errors still show.
EDITABLE := PYTHONWARNINGS=ignore::UserWarning
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run the install when pyproject.toml or constraints.txt changes. constraints.txt pins every package to
# the version CI tested (`make constraints` rewrites it from a passing .venv; torch is pinned by TORCH instead).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(EDITABLE) $(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(EDITABLE) $(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(VENV)/.installed $@

setup: $(VENV)/.installed
requirements: | $(BIN)/python  # requirements.txt from pyproject.toml (a test checks they agree)
	$(BIN)/python scripts/sync_requirements.py
setup-dev: $(VENV)/.installed-dev
constraints: setup-dev  # constraints.txt from the .venv (after `make test` passed; a test checks pyproject agrees)
	$(BIN)/python scripts/sync_constraints.py --python $(BIN)/python
package-check: setup-dev  # build the wheel and sdist, install the wheel into a clean venv, run `byollm --help`
	$(BIN)/python scripts/package_check.py

# The guide as a website in site/ (gitignored): a broken link or anchor, a missing figure, a page not in mkdocs.yml's
# nav fails it. `$(BIN)/mkdocs serve` shows it while you edit.
.PHONY: docs sections
docs: setup-dev
	$(BIN)/mkdocs build --strict --site-dir site

# Every section's project in order, each feeding the next (docs/how_the_sections_chain.md): ~70 min on 2 cores;
# QUICK=1 (or SMALL=1) runs their small --quick configurations instead, in minutes.
QUICK ?= $(SMALL)
sections: setup-dev
	$(BIN)/python scripts/run_sections.py $(if $(QUICK),--quick)

quickstart: setup
	$(BIN)/byollm quickstart

# The capstone (guide section 8): data -> ... -> a served, evaluated chat assistant with RAG over docs/, cached
# stages and a report in runs/capstone/scratch/ (SIZE=tiny: seconds; SERVE=1: then serve it with the chat page).
$(VENV)/.installed-capstone: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(EDITABLE) $(BIN)/pip install --quiet -c constraints.txt -e ".[capstone]"
	touch $(VENV)/.installed $@
SIZE ?= cpu
capstone: $(VENV)/.installed-capstone
	$(BIN)/byollm capstone --size $(SIZE) $(if $(SERVE),--serve true)

lint: setup-dev
	$(BIN)/ruff check .

test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
