#!/usr/bin/env bash
# bench/gpu_build_llama.sh -- build llama-cpp-python with CUDA into a cached wheel.
#
#   bench/gpu_build_llama.sh PYTHON OUT_DIR
#     PYTHON   the interpreter whose pip builds the wheel (its site-packages may hold
#              nvidia-cublas when the CUDA toolkit has no cuBLAS of its own)
#     OUT_DIR  where the wheel lands; the build tree stays beside it (OUT_DIR/build), so an
#              interrupted build resumes where it stopped
#   env: CUDA_ARCHS        CMake CUDA architectures (default 90-real: Hopper, the H100/H200)
#        LLAMA_VERSION     llama-cpp-python release (default 0.3.36, the project's pin)
#        LLAMA_CMAKE_ARGS  the CPU build's arguments (the Makefile passes its own)
#        LLAMA_SDIST       a local sdist (or its unpacked folder) to build from (default: pip download it)
#        NO_ISOLATION=1    build with the interpreter's own scikit-build-core (a machine with no registry)
#        JOBS              parallel compile jobs (default: nproc)
#
# Prints the wheel's path on the last line. A wheel built before with the same version and
# architectures is reused. The wheel is py3-none-linux_x86_64 (ctypes bindings, no CPython
# ABI), so one built here with Python 3.11 installs on Python 3.12 as well.
#
# What the CUDA build needs and how it is found:
#   nvcc          PATH, then /usr/local/cuda/bin
#   cuBLAS        the toolkit's include/ and lib64/, else nvidia-cublas in PYTHON's
#                 site-packages (pip install "nvidia-cublas>=13,<14" there)
#   libcuda.so    (the driver) for llama.cpp's virtual-memory pool; without it (a build
#                 machine with no driver) the build sets GGML_CUDA_NO_VMM=ON and llama.cpp
#                 uses its plain cudaMalloc pool instead
set -euo pipefail
PY=${1:?usage: gpu_build_llama.sh PYTHON OUT_DIR}
OUT=${2:?usage: gpu_build_llama.sh PYTHON OUT_DIR}
CUDA_ARCHS=${CUDA_ARCHS:-90-real}
LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}
LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF}
JOBS=${JOBS:-$(nproc)}
say() { echo "[gpu-build $(date +%H:%M:%S)] $*" >&2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
existing=$(ls "$OUT"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -n "$existing" ] && [ "$(cat "$OUT/archs" 2>/dev/null)" = "$CUDA_ARCHS" ]; then
  say "reusing $existing (CUDA archs $CUDA_ARCHS)"
  echo "$existing"
  exit 0
fi

NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
  echo "gpu_build_llama: nvcc not found (install the CUDA toolkit or put nvcc on PATH)" >&2
  exit 2
fi
NVCC=$(readlink -f "$NVCC")
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
CUDA_MAJOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
say "nvcc $NVCC (CUDA $CUDA_MAJOR), CUDA_HOME $CUDA_HOME, archs $CUDA_ARCHS, $JOBS jobs"

args="$LLAMA_CMAKE_ARGS -DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$NVCC -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS"
if [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  # No cuBLAS in the toolkit: use the pip package (its headers and libcublas.so.N).
  site=$("$PY" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for inc in pathlib.Path(root).glob("*/include/cublas_v2.h"):
        print(inc.parent.parent)
        raise SystemExit
EOF
)
  if [ -z "$site" ]; then
    echo "gpu_build_llama: no cuBLAS in $CUDA_HOME and none in $PY's site-packages;" \
         "install it there: $PY -m pip install 'nvidia-cublas>=$CUDA_MAJOR,<$((CUDA_MAJOR + 1))'" >&2
    exit 2
  fi
  say "cuBLAS from the pip package in $site"
  lib=$site/lib
  args="$args -DCUDA_cublas_LIBRARY=$(ls "$lib"/libcublas.so.* | head -1)"
  args="$args -DCUDA_cublasLt_LIBRARY=$(ls "$lib"/libcublasLt.so.* | head -1)"
  args="$args -DCMAKE_CUDA_FLAGS=-I$site/include -DCMAKE_CXX_FLAGS=-I$site/include"
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' && [ ! -e "$CUDA_HOME/lib64/stubs/libcuda.so" ]; then
  say "no libcuda.so (no driver here): GGML_CUDA_NO_VMM=ON (llama.cpp's cudaMalloc pool)"
  args="$args -DGGML_CUDA_NO_VMM=ON"
fi

sdist=${LLAMA_SDIST:-}
if [ -z "$sdist" ]; then
  sdist=$(ls "$OUT"/llama_cpp_python-"$LLAMA_VERSION".tar.gz 2>/dev/null || true)
  if [ -z "$sdist" ]; then
    say "downloading the llama-cpp-python $LLAMA_VERSION sdist"
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$OUT" "llama-cpp-python==$LLAMA_VERSION"
    sdist=$(ls "$OUT"/llama_cpp_python-"$LLAMA_VERSION".tar.gz)
  fi
fi

say "building (CMAKE_ARGS=$args); the build tree is $OUT/build"
t0=$(date +%s)
rm -f "$OUT"/llama_cpp_python-*.whl "$OUT/archs"
# --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, and would
# hand back the CPU wheel. build-dir: kept, so a second run recompiles only what changed.
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "$PY" -m pip wheel --no-deps --no-cache-dir \
  ${NO_ISOLATION:+--no-build-isolation --no-index} \
  --config-settings=build-dir="$OUT/build" -w "$OUT" "$sdist" >&2
echo "$CUDA_ARCHS" > "$OUT/archs"
wheel=$(ls "$OUT"/llama_cpp_python-"$LLAMA_VERSION"-*.whl)
say "built $wheel in $(( $(date +%s) - t0 )) s ($(du -h "$wheel" | cut -f1))"
echo "$wheel"
