# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,rl]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python tools/demo.py
	$(BIN)/python -m trainer.main --flagfile=configs/demo.cfg

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf $(VENV) data *.egg-info
