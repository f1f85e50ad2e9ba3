# `make test` and `make demo` create .venv when it is missing and install the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo base bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/soup demo

# Regenerate the tiny world's committed base checkpoint (about 10 minutes on 2 CPU cores).
base: $(STAMP)
	$(VENV)/bin/soup pretrain-base --out orchestrator/assets

bench: $(STAMP)
	$(PY) benchmarks/finetune_default.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
