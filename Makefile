# scops — two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install everything, build the tiny bundle, answer one question
#   make test   same set-up, then the test suite
# `make setup` alone builds the venv; it is idempotent and fast when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp without -march=native so the wheel pip caches runs on any x86-64 with AVX2.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
KERNEL_SRC := CMakeLists.txt $(wildcard kernels/*.h kernels/*.c kernels/*.cpp kernels/*.cu kernels/CMakeLists.txt)
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo clean system-deps
setup: $(VENV)/.stamp-pkg

$(VENV)/.stamp-deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
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

# Debian packages the tests drive: Chromium (the web page test, via Playwright) and
# espeak-ng (real speech for the audio tests). Without root or apt those tests skip.
SYSTEM_DEPS := chromium espeak-ng
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	    || echo "could not install$$missing: the tests that need them will be skipped"; \
	fi

test: setup system-deps
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# the long checks (marked `slow`): repeated kill trials, long conversations, ...
test-slow: setup system-deps
	$(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/scops demo

clean:
	rm -rf build $(VENV)
