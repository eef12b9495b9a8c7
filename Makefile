# Two targets do all the set-up on a fresh machine:
#   make demo   create .venv, install tc, run the whole method end to end on a model that needs no download
#   make test   create .venv, install tc with test extras, lint (ruff check, ruff format --check), run the test suite
#   make figures  regenerate every README figure that comes from a run (scripts/readme_figures.py)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TC      = $(VENV)/bin/tc
# torch 2.13.0 has a CPU wheel on disk here; any other request downloads gigabytes of CUDA packages,
# so it is installed first, and only when no torch is importable.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test completions figures clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"  # tests, ruff, notebooks + the plot and fast-score extras
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

completions: install
	$(PY) -m tccli.cli.completions completions

figures: install
	$(PY) scripts/readme_figures.py update

clean:
	rm -rf $(VENV) demo-out
