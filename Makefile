# make demo | make test | make test-all | make clean
# Each target creates (or reuses) .venv and installs the project into it once per change of pyproject.toml.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ovsam-installed
TORCH := 2.14.1
TORCHVISION := 0.29.1

.PHONY: install demo test test-all clean

# torch goes in first, alone and with the exact pins, so that pip picks that build (on the project's machines it
# lies on local disk) before anything else can ask for another. Each step says what it does; pip prints only errors.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating the virtual environment $(VENV)..." && $(PYTHON) -m venv $(VENV); }
	@echo "installing torch $(TORCH) and torchvision $(TORCHVISION) into $(VENV) (a few minutes on the first run)..."
	@$(PY) -m pip install --quiet --quiet "torch==$(TORCH)" "torchvision==$(TORCHVISION)"
	@echo "installing the project with its dependencies and extras (pip install -e '.[all]')..."
	@$(PY) -m pip install --quiet --quiet -e ".[all]"
	@touch $(STAMP)
	@echo "installed; $(VENV) is ready"

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --output demo_out

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) demo_out .pytest_cache build *.egg-info
