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

# The whole MeSa chain on the synthetic world, on CPU: renders runs/demo/world if needed, runs
# configs/demo/pipeline.yaml into runs/demo/pipeline and writes runs/demo/pipeline/report.md.
# Running it again skips finished steps.
demo: $(STAMP)
	$(VENV)/bin/mesadepth demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mesadepth tests benchmarks
	$(VENV)/bin/ruff format --check mesadepth tests benchmarks

.PHONY: install demo test lint
