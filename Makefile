PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# Re-install only when the requirements change.
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "$(PY) not found: install Python 3.11 or run make PY=python3"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The demo is the DVC pipeline (dvc.yaml with params.yaml); a second run finds everything up to date.
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m stages.summary

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf data/demo data/demo_predict cache/*.h5 cache/*.h5.json cache/*.episodes runs metrics/*.npy reports predictions
