# Two targets do all the set-up on a fresh machine:
#   make demo      create .venv, install tc, run the whole method end to end on a model that needs no download
#   make test      create .venv, install tc with test extras, lint, build the docs, run the quick tests (<= 5 min)
#   make test-all  the same, then every test: real processes, signals, terminals, figures, torchrun (CI)
#   make docs      build the docs site into site/ (mkdocs build --strict)
#   make figures   regenerate every figure the README and docs quote from a run (scripts/readme_figures.py)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TC      = $(VENV)/bin/tc
# torch 2.13.0 has a CPU wheel on disk here; any other request downloads gigabytes of CUDA packages,
# so it is installed first, and only when no torch is importable.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all lint docs completions figures clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"  # tests, ruff, notebooks + the plot and fast-score extras
	touch $@

install: $(VENV)/.installed

demo: install
	bash scripts/install_graphviz.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The contributor's tier: unit tests, in-process CLI tests, the battery's flag-level cases (docs/development.md).
test: lint docs
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not process" tests

# Everything: also the tests marked process (signals, terminals, sandboxes, concurrent runs) and slow.
test-all: lint docs
	$(PY) -m pytest -q -n 2 --dist loadfile tests

completions: install
	$(PY) -m tccli.cli.completions completions

figures: install
	$(PY) scripts/readme_figures.py update

clean:
	rm -rf $(VENV) demo-out site
