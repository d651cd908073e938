# scops — two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install everything, build the tiny bundle, answer one question
#   make test   same set-up, then the test suite
# `make setup` alone builds the venv; it is idempotent and fast when nothing changed.
# `make setup GPU=1` adds the NVIDIA backends: onnxruntime-gpu in place of onnxruntime and
# llama-cpp-python rebuilt with CUDA (CUDA_ARCHS overrides the GPU architectures).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp without -march=native so the wheel pip caches runs on any x86-64 with AVX2.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
KERNEL_SRC := CMakeLists.txt $(wildcard kernels/*.h kernels/*.c kernels/*.cpp kernels/*.cu kernels/CMakeLists.txt)
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-arm64 fuzz demo clean system-deps gpu-hint
GPU ?= 0
ifeq ($(GPU),1)
setup: $(VENV)/.stamp-pkg $(VENV)/.stamp-gpu
else
setup: $(VENV)/.stamp-pkg gpu-hint
endif

$(VENV)/.stamp-deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# a GPU set-up is undone first: onnxruntime and onnxruntime-gpu own the same files
	if $(PIP) show -q onnxruntime-gpu 2>/dev/null; then $(PIP) uninstall -q -y onnxruntime-gpu llama-cpp-python; rm -f $(VENV)/.stamp-gpu; fi
	$(PIP) install -q --upgrade pip wheel
	# torch first, from the local CPU build, so nothing later pulls the CUDA one
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q llama-cpp-python==0.3.36
	$(PIP) install -q "scikit-build-core>=0.10"
	$(PIP) install -q --no-build-isolation -e ".[export,bench,test]"
	touch $@

$(VENV)/.stamp-pkg: $(VENV)/.stamp-deps $(KERNEL_SRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

# ---- NVIDIA GPU -------------------------------------------------------------------------
# onnxruntime-gpu 1.31.1 is the CUDA 13 build (its [cuda,cudnn] extras bring the CUDA runtime
# libraries and cuDNN as pip packages). llama-cpp-python is rebuilt with CMAKE_ARGS=-DGGML_CUDA=on
# into a cached wheel (bench/gpu_build_llama.sh: ~/.cache/scops/gpu/llama-<archs>/).
ORT_GPU_VERSION := 1.31.1
LLAMA_VERSION := 0.3.36
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# The GPU's own architecture when one is visible, else Hopper (sm_90: H100/H200);
# e.g. CUDA_ARCHS="86-real;89-real;90-real" for several consumer and data-centre cards.
CUDA_ARCHS ?= $(if $(HAVE_GPU),native,90-real)
GPU_CACHE ?= $(HOME)/.cache/scops/gpu
CUDA_VER = $(shell $(NVCC) --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')

$(VENV)/.stamp-gpu: $(VENV)/.stamp-deps bench/gpu_build_llama.sh
	@test -n "$(NVCC)" || { echo "make setup GPU=1: nvcc not found (install the CUDA toolkit)"; exit 2; }
	# cuBLAS for the llama.cpp build and at run time: the toolkit's, else the pip package
	set -e; read major minor <<< "$(CUDA_VER)"; home=$$(dirname $$(dirname $$(readlink -f $(NVCC)))); \
	if [ ! -f $$home/include/cublas_v2.h ]; then \
	  name=nvidia-cublas; [ "$$major" -lt 13 ] && name=nvidia-cublas-cu$$major; \
	  $(PIP) install -q "$$name>=$$major.$$minor,<$$major.$$((minor + 1))"; fi
	set -e; wheel=$$(CUDA_ARCHS="$(CUDA_ARCHS)" LLAMA_VERSION=$(LLAMA_VERSION) \
	  LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" bash bench/gpu_build_llama.sh $(PY) \
	  "$(GPU_CACHE)/llama-$$(echo '$(CUDA_ARCHS)' | tr -c 'A-Za-z0-9\n' '_')" | tail -1); \
	$(PIP) install -q --force-reinstall --no-deps "$$wheel"
	$(PIP) uninstall -q -y onnxruntime || true
	$(PIP) install -q "onnxruntime-gpu[cuda,cudnn]==$(ORT_GPU_VERSION)"
	$(PY) -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
	touch $@

gpu-hint:
	@if [ -n "$(HAVE_GPU)" ] && [ -n "$(NVCC)" ] && [ ! -f $(VENV)/.stamp-gpu ]; then \
	  echo "NVIDIA GPU and nvcc found: 'make setup GPU=1' installs onnxruntime-gpu and builds llama.cpp with CUDA"; fi

# Debian packages the tests drive (command:package): Chromium (the web page test, via
# Playwright), espeak-ng (real speech for the audio tests), the aarch64 cross compiler and
# qemu-user (the NEON projector's C tests under emulation). Without root or apt those tests
# skip, and say why (pytest -rs).
SYSTEM_DEPS := chromium:chromium espeak-ng:espeak-ng aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64:qemu-user
system-deps:
	@missing=""; for d in $(SYSTEM_DEPS); do command -v $${d%%:*} >/dev/null || missing="$$missing $${d#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	    || echo "could not install$$missing: the tests that need them will be skipped"; \
	fi

test: setup system-deps
	$(VENV)/bin/pytest -q -rs $(PYTEST_ARGS)

# The projector cross-built for aarch64 (NEON) and its C tests run under qemu-user, every
# shape (make test runs the quick version). Fails if the cross tools cannot be installed.
test-arm64: system-deps
	bash kernels/check_arm64.sh

# the long checks (marked `slow`): repeated kill trials, long conversations, ...
test-slow: setup system-deps
	$(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)

# Coverage-guided fuzzing (atheris) of every decoder, FUZZ_SECONDS per target, one after
# another; findings under build/fuzz/ (see tests/fuzz/run.py). `make test` replays the
# committed corpus only.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?=
fuzz: setup
	$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q "atheris>=2.3"
	$(PY) tests/fuzz/run.py all $(FUZZ_TARGETS) --seconds $(FUZZ_SECONDS)

demo: setup
	$(VENV)/bin/scops demo

clean:
	rm -rf build $(VENV)
