# fc2-triton: `make test` and `make autotune` work on a fresh machine with only Python installed.
#
# Test environments are virtualenvs under $(ENV_ROOT), named by a hash of requirements/*.txt, so
# a fresh clone reuses them and a change of pins builds new ones:
#   ascend-<hash>: CPU torch + triton-ascend (interpreter numerics, Ascend adapter lowering),
#   cuda-<hash>:   CPU torch + upstream triton (CUDA sm_90 compile checks, no GPU needed).
# triton-ascend and upstream triton both install the module `triton`: never in one environment.

PYTHON ?= python3
ENV_ROOT ?= $(HOME)/.cache/fc2-triton
ENV_HASH := $(shell cat requirements/*.txt | sha256sum | cut -c1-12)
ASCEND_ENV := $(ENV_ROOT)/ascend-$(ENV_HASH)
CUDA_ENV := $(ENV_ROOT)/cuda-$(ENV_HASH)
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: test test-numerics test-lowering autotune bench envs clean-envs

test: test-numerics test-lowering

# 1. Everything numerical, multi-process with gloo, Triton in its interpreter.
test-numerics: $(ASCEND_ENV)/.ready
	TRITON_INTERPRET=1 $(ASCEND_ENV)/bin/python -m pytest -q -m "not ascend_lowering and not cuda_compile" $(PYTEST_ARGS) tests

# 2. Every kernel and every config the autotuner may pick, lowered for Ascend A2/A3 and compiled
#    for CUDA sm_90 (Triton must be imported compiled, hence TRITON_INTERPRET=0).
test-lowering: $(ASCEND_ENV)/.ready $(CUDA_ENV)/.ready
	TRITON_INTERPRET=0 $(ASCEND_ENV)/bin/python -m pytest -q -m ascend_lowering $(PYTEST_ARGS) tests/test_lowering.py
	TRITON_INTERPRET=0 $(CUDA_ENV)/bin/python -m pytest -q -m cuda_compile $(PYTEST_ARGS) tests/test_lowering.py

# Until `python -m autotune` lands, the main job runs the kernel benchmark at its CPU default.
autotune: $(ASCEND_ENV)/.ready
	$(ASCEND_ENV)/bin/python -m bench.bench_a2a_gemm

bench: autotune

envs: $(ASCEND_ENV)/.ready $(CUDA_ENV)/.ready

$(ASCEND_ENV)/.ready:
	rm -rf $(ASCEND_ENV)
	$(PYTHON) -m venv $(ASCEND_ENV)
	$(ASCEND_ENV)/bin/pip install -q -r requirements/torch-cpu.txt -r requirements/ascend.txt \
		-r requirements/tools.txt -r requirements/dev.txt
	touch $@

$(CUDA_ENV)/.ready:
	rm -rf $(CUDA_ENV)
	$(PYTHON) -m venv $(CUDA_ENV)
	$(CUDA_ENV)/bin/pip install -q -r requirements/torch-cpu.txt -r requirements/cuda.txt \
		-r requirements/dev.txt
	touch $@

clean-envs:
	rm -rf $(ENV_ROOT)
