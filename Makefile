# `make test` and `make demo` create .venv when it is missing and install the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo base bench clean fashion-data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The demo's default world is Fashion-MNIST: on Debian (no network needed) its files come from the
# package dataset-fashion-mnist, installed here when missing; elsewhere torchvision downloads them.
# Where neither works, the demo says so in one line and runs the digits world.
FASHION_DEB := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

demo: $(STAMP) fashion-data
	$(VENV)/bin/soup demo

fashion-data:
	@test -d $(FASHION_DEB) || ! command -v apt-get >/dev/null || \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "dataset-fashion-mnist could not be installed; the demo tries torchvision's download"

# Regenerate the committed base checkpoints: the glyph base (about 10 minutes on 2 CPU cores),
# then the Fashion-MNIST world's base from it (about 4 minutes).
base: $(STAMP) fashion-data
	$(VENV)/bin/soup pretrain-base --out orchestrator/assets
	$(VENV)/bin/soup pretrain-base --world fashion --out orchestrator/assets

bench: $(STAMP)
	$(PY) benchmarks/finetune_default.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
