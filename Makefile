# `make run`: set up .venv (if missing; the package alone) and run every method on the offline quick preset.
# `make test`: set up .venv (if missing, with the test, ray and flower extras), lint and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install first (override, e.g. `make test TORCH="torch torchvision"`).
TORCH ?= torch==2.14.1 torchvision==0.29.1
BASE := $(VENV)/.fcl-bench-installed
EXTRAS := $(VENV)/.fcl-bench-extras-installed

.PHONY: run test install clean-venv

$(BASE): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(EXTRAS): $(BASE)
	$(PY) -m pip install -q -e '.[test,ray,flower]'
	touch $(EXTRAS)

install: $(EXTRAS)

run: $(BASE)
	$(VENV)/bin/fcl-bench run --methods all

test: $(EXTRAS)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
