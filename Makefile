# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeship-installed

.PHONY: demo test lint install clean

install: $(STAMP)

# torch first, pinned: 2.13.0 is a CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,test]' torch==2.13.0  # torch again, so the resolver cannot trade it down
	$(PY) -m pip check
	touch $(STAMP)

# Model -> signed bundles for every target -> a fleet server and three device agents -> a staged rollout
# whose canary fails its health check (`edgeship demo --quick`: only the ONNX Runtime table).
demo: $(STAMP)
	$(VENV)/bin/edgeship demo --out demo-out

lint: $(STAMP)
	$(VENV)/bin/ruff check sdk device_runtime packagers fleet tests examples benchmarks
	$(VENV)/bin/ruff format --check sdk device_runtime packagers fleet tests examples benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
