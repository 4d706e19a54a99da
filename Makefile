# `make run`: set up .venv (if missing) and run every method on the offline quick preset.
# `make test`: set up .venv (if missing, with the test, ray and flower extras), lint and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install first (override, e.g. `make test TORCH="torch torchvision"`).
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.fcl-bench-installed

.PHONY: run test install clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,ray,flower]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fcl-bench run --methods all

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
