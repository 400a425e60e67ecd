# Two commands do all the set-up: `make demo` and `make test` (see README.md).
#   TF=cpu    TensorFlow 2.21 (default)          TF=tf220  TensorFlow 2.20, CPU wheel
#   TF=gpu    TensorFlow 2.21 + CUDA wheels      TF=tpu    tensorflow-tpu 2.20 + libtpu
# Each TF choice gets its own virtualenv (.venv, .venv-tf220, .venv-gpu, .venv-tpu): the four
# are different distributions of the one `tensorflow` module and must not share one.
# RL=rl (default): gymnasium + MuJoCo 3.14.0, the locomotion tasks' figures; RL=metaworld:
# Meta-World, whose package pins MuJoCo 3.3.0 (other dynamics: docs/rl.md), in its own
# virtualenv (.venv-metaworld, .venv-tf220-metaworld, ...).
TF ?= cpu
RL ?= rl
SUPPORTED_PYTHONS := 3.11 3.12 3.13
RL_SUFFIX := $(if $(filter rl,$(RL)),,-$(RL))
ifeq ($(TF),cpu)
VENV ?= .venv$(RL_SUFFIX)
else
VENV ?= .venv-$(TF)$(RL_SUFFIX)
endif
# The first supported interpreter on PATH (PYTHON=/path/to/python overrides).
PYTHON ?= $(firstword $(foreach v,$(SUPPORTED_PYTHONS),$(shell command -v python$(v))) $(shell command -v python3))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TF)

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	@case "$(TF)" in cpu|tf220|gpu|tpu) ;; *) echo "TF=$(TF): choose cpu, tf220, gpu or tpu"; exit 2;; esac
	@case "$(RL)" in rl|metaworld) ;; *) echo "RL=$(RL): choose rl or metaworld"; exit 2;; esac
	@$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; ok = "$(SUPPORTED_PYTHONS)".split(); sys.exit(0 if v in ok else "$(PYTHON) is Python %s; this project needs one of %s (every pinned wheel exists for those): set PYTHON=/path/to/python3.11" % (v, ", ".join(ok)))'
	@other=$$(ls $(VENV)/.installed-* 2>/dev/null | grep -v -- '-$(TF)$$' | head -1); if [ -n "$$other" ]; then echo "$(VENV) holds another TensorFlow build ($${other##*-}); use another VENV= or remove $(VENV)"; exit 2; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,$(RL),$(TF)]'
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python tools/demo.py
	$(BIN)/python -m trainer.main --flagfile=configs/demo.cfg
	@echo "Export it and predict on images: $(BIN)/python -m trainer.export --model_dir=runs/demo_omniglot_5w1s --output=exports/demo, then tools/predict.py (docs/using.md)"

# pytest workers (pytest-xdist): most tests wait on one trainer process, so one per core.
PYTEST_WORKERS ?= auto
TESTS ?= tests
test: install
	$(BIN)/python -m pytest $(TESTS) -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf .venv .venv-tf220 .venv-gpu .venv-tpu data *.egg-info
