# make demo | make test | make test-all | make clean
# Each target creates (or reuses) .venv and installs the project into it once per change of pyproject.toml.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ovsam-installed

.PHONY: install demo test test-all clean

# torch goes in first, alone and with the exact pins, so that pip picks that build (on the project's machines it
# lies on local disk) before anything else can ask for another.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --output demo_out

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) demo_out .pytest_cache build *.egg-info
