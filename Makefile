# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, train the demo LM on 8 simulated CPU devices, eval, generate.
#   make test   - create .venv, install with the dev extra, run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m launch.demo --config configs/demo.py --workdir runs/demo

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf runs
