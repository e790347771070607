# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv/ with the versions of requirements.lock (pip constraints), then run.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Renders the demo world and reads every format back with the loaders (the table it prints).
demo: $(STAMP)
	$(VENV)/bin/mesadepth synth --preset demo --out runs/world --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mesadepth tests benchmarks
	$(VENV)/bin/ruff format --check mesadepth tests benchmarks

.PHONY: install demo test lint
