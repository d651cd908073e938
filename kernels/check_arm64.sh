#!/usr/bin/env bash
# kernels/check_arm64.sh -- cross-build the projector for aarch64 and run its C tests
# (kernels/test_projector.c: NEON and scalar vs a double reference on awkward sizes,
# bit-identity across thread counts, argument checks) under qemu-user.
#
#   kernels/check_arm64.sh [--quick] [BUILD_DIR]      (default BUILD_DIR: build/arm64)
#
# Needs Debian's g++-aarch64-linux-gnu and qemu-user (`make test-arm64` installs them when
# it can).  Exit status: 0 passed, 1 failed, 77 the cross tools are missing (skipped; the
# message says which).
set -euo pipefail
quick=""
if [[ "${1:-}" == "--quick" ]]; then quick="--quick"; shift; fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build/arm64}"
sysroot=/usr/aarch64-linux-gnu

missing=()
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ qemu-aarch64 cmake; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[[ -e "$sysroot/lib/ld-linux-aarch64.so.1" ]] || missing+=("$sysroot (libc6-dev-arm64-cross)")
if (( ${#missing[@]} )); then
  echo "SKIPPED: aarch64 check needs ${missing[*]} (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)"
  exit 77
fi

mkdir -p "$(dirname "$build")"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$root/kernels/toolchain-aarch64.cmake" \
  -DSCOPS_ENABLE_CUDA=OFF -DSCOPS_BUILD_TESTS=ON >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" -- >"$build.build.log" 2>&1 || { cat "$build.build.log"; exit 1; }
test_bin="$build/kernels/scops_projector_test"
file_info="$(file -b "$test_bin" 2>/dev/null || echo "?")"
echo "built $test_bin ($file_info)"
# The C tests on the emulated CPU; --expect neon fails a build that fell back to scalar.
QEMU_LD_PREFIX="$sysroot" qemu-aarch64 -L "$sysroot" "$test_bin" $quick --expect neon
