# The two commands of the README:
#   make course   set up .venv, fetch the assets, run every notebook in order (papermill)
#   make test     set up .venv, fetch the assets, run the tests
# Both are safe to run again: the venv is rebuilt only when pyproject.toml changes, and the
# assets only when missing or corrupt.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch for a machine without a GPU; on a CUDA machine pass TORCH=torch.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Extra notebook parameters for `make course`, e.g. PARAMS="-p profile gpu -p model_id Qwen/Qwen2.5-0.5B-Instruct"
PARAMS ?=
PYTEST_ARGS ?=

.PHONY: install assets course test lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

assets: install
	$(PY) -m qlora_helpers assets

course: assets
	$(PY) -m qlora_helpers run $(PARAMS)

test: assets
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lab: assets
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) runs
