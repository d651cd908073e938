#!/usr/bin/env bash
# bench/gpu_check.sh -- the GPU session's kit, run on a bare lent machine (and rehearsed here).
#
# On the device machine, call by call (the exact calls: .gpukit/CALLS.md, made by
# `python -m scops.bench.gpukit prepare`):
#   probe                    what the machine has (GPU, driver, python, torch, nvcc, cuBLAS)
#   recv DIR PIECE           keep one piece of a payload (sha256 checked against kit.json)
#   setup base|ort           join a payload's pieces, check, unpack; base also puts scops (this
#                            tree) and its kernel libraries on the path and smoke-tests llama.cpp
#   start-build              build the benchmark bundle (minigpt4-7b, fp16 encoders) in the
#                            background while the onnxruntime-gpu pieces arrive
#   status                   the background build's progress
#   test                     pytest -m gpu               -> $OUT/pytest-gpu.log
#   bench                    wait for the bundle, then scops bench --device cuda --shape minigpt4-7b
#                            --vs hf,llama-cpp -> $OUT/report.md, report.json, latency.png, bench.log
# Here, on the CPU:
#   rehearse [OUT]           the same steps up to where a GPU is needed: the kit's pieces are
#                            joined, checked and unpacked (if .gpukit exists), pytest -m gpu runs
#                            (and skips), and the GPU bench plan runs on the CPU (tiny shape)
#
# State lives in $KIT (default /tmp/scops-kit) while the machine is warm; every step can be
# repeated (finished work is kept). Python: $PY (default python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
KIT=${KIT:-/tmp/scops-kit}
PY=${PY:-python3}
OUT=${OUT:-$KIT/out}
SHAPE=${SHAPE:-minigpt4-7b}
KITJSON=${KITJSON:-$REPO/.gpukit/kit.json}
mkdir -p "$KIT/pieces" "$KIT/logs" "$OUT"
say() { echo "[gpu-check $(date +%H:%M:%S)] $*" >&2; }

env_file() {  # the environment every later step runs in
  local sites="$KIT/src"
  [ -d "$KIT/ort/site" ] && sites="$sites:$KIT/ort/site"
  [ -d "$KIT/base/site" ] && sites="$sites:$KIT/base/site"
  local nv
  nv=$("$PY" - <<'EOF'
import glob, os, site, sys
dirs = set()
for s in site.getsitepackages() + sys.path:
    for p in glob.glob(os.path.join(s or ".", "nvidia", "*", "lib", "lib*.so*")):
        dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
EOF
)
  cat > "$KIT/env.sh" <<EOF
export PYTHONPATH="$sites\${PYTHONPATH:+:\$PYTHONPATH}"
export LD_LIBRARY_PATH="$nv:/usr/local/cuda/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export SCOPS_CACHE="$KIT/cache"
export PYTHONUNBUFFERED=1
EOF
}

load_env() { env_file; . "$KIT/env.sh"; }

scops_src() {  # scops = this working tree: a package of symlinks, the kernel libraries copied in
  mkdir -p "$KIT/src/scops"
  for d in export runtime kernels bench; do ln -sfn "$REPO/$d" "$KIT/src/scops/$d"; done
  local want have
  want=$(jq -r .kernels_sha256 "$KITJSON" 2>/dev/null || "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['kernels_sha256'])" "$KITJSON")
  have=$(cd "$REPO" && PYTHONPATH="$KIT/src" "$PY" -c "from scops.bench.gpukit import kernel_sources_hash as h; print(h())")
  if [ "$want" = "$have" ] && [ -f "$KIT/base/lib/libscops_kernels_cuda.so" ]; then
    cp "$KIT/base/lib/"libscops_kernels*.so "$REPO/kernels/"
    say "kernel libraries: the ones built with the kit (sources unchanged)"
  else
    say "kernel sources changed since the kit was made: building them here (sm_90)"
    cmake -S "$REPO" -B "$KIT/kernels-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES=90 > "$KIT/logs/kernels.log"
    cmake --build "$KIT/kernels-build" -j "$(nproc)" >> "$KIT/logs/kernels.log"
    cp "$(find "$KIT/kernels-build" -name libscops_kernels.so | head -1)" \
       "$(find "$KIT/kernels-build" -name libscops_kernels_cuda.so | head -1)" "$REPO/kernels/"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
probe)
  say "probe"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || say "nvidia-smi failed"
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  nvcc --version | tail -1 || true
  ls /usr/local/cuda/include/cublas_v2.h 2>/dev/null || say "no cuBLAS headers in /usr/local/cuda"
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || true
  df -h /tmp | tail -1; nproc; free -g | head -2
  ;;
recv)
  dir=${1:?recv DIR PIECE}; piece=${2:?recv DIR PIECE}
  want=$("$PY" -c "import json,sys; print(next(p['sha256'] for pl in json.load(open(sys.argv[1]))['payloads'].values() for p in pl['pieces'] if p['dir']==sys.argv[2]))" "$KITJSON" "$dir")
  have=$(sha256sum "$piece" | cut -d' ' -f1)
  [ "$want" = "$have" ] || { say "piece $dir: sha256 $have, kit.json says $want"; exit 3; }
  cp "$piece" "$KIT/pieces/$dir"
  say "piece $dir kept ($(du -h "$piece" | cut -f1))"
  ;;
setup)
  name=${1:?setup base|ort}
  if [ -f "$KIT/$name/.done" ]; then say "$name: already set up"; else
    read -r n sha < <("$PY" -c "import json,sys; p=json.load(open(sys.argv[1]))['payloads'][sys.argv[2]]; print(len(p['pieces']), p['sha256'])" "$KITJSON" "$name")
    parts=()
    for i in $(seq 1 "$n"); do
      [ -f "$KIT/pieces/$name.$i" ] || { say "$name: piece $i of $n missing (recv it first)"; exit 3; }
      parts+=("$KIT/pieces/$name.$i")
    done
    have=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
    [ "$have" = "$sha" ] || { say "$name: joined payload sha256 $have != $sha"; exit 3; }
    rm -rf "$KIT/$name" && mkdir -p "$KIT/$name"
    cat "${parts[@]}" | "$PY" -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='data')" "$KIT/$name"
    rm -f "${parts[@]}"
    touch "$KIT/$name/.done"
    say "$name: unpacked ($(du -sh "$KIT/$name" | cut -f1))"
  fi
  if [ "$name" = base ]; then
    scops_src
    if [ -d "$KIT/base/llama-src" ] && ! ls "$KIT/base/site/llama_cpp/lib/"libggml-cuda.so >/dev/null 2>&1; then
      say "building llama-cpp-python with CUDA here (sm_90)"
      load_env
      NO_ISOLATION=1 CUDA_ARCHS=90-real LLAMA_SDIST="$KIT/base/llama-src" bash "$REPO/bench/gpu_build_llama.sh" \
        "$PY" "$KIT/llama-wheel" > "$KIT/logs/llama-build.log" 2>&1
      "$PY" -m pip install -q --no-deps --no-index --target "$KIT/base/site" "$KIT"/llama-wheel/*.whl
    fi
  fi
  load_env
  "$PY" - <<'EOF'
from scops.runtime import gpu
print("GPUs (driver):", gpu.cuda_devices())
print("preloaded:", len(gpu.preload_cuda_libraries()), "CUDA libraries from pip packages")
import llama_cpp
print("llama.cpp GPU offload:", bool(llama_cpp.llama_supports_gpu_offload()), gpu.llama_devices())
from scops.kernels import native_info
print("scops kernels:", native_info())
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers(), "TensorRT libs:", gpu.tensorrt_available())
EOF
  if [ "$name" = ort ]; then
    "$PY" - <<'EOF'
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.random.default_rng(0).standard_normal(64 * 64).astype(np.float32))
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
                      "smoke", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], [w])
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
feed = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feed)[0]
s = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
got = s.run(None, feed)[0]
print("onnxruntime CUDA EP smoke:", s.get_providers()[0], "max |cuda - cpu|", float(np.abs(got - cpu).max()))
EOF
  fi
  ;;
start-build)
  load_env
  if [ -f "$KIT/logs/build.done" ]; then say "bundle already built"; exit 0; fi
  say "building the $SHAPE bundle in the background (log: $KIT/logs/build.log)"
  setsid nohup bash -c ". '$KIT/env.sh'; cd '$REPO'; '$PY' -c \"
import sys
from scops.bench.shapes import SHAPES, ensure_bundle
print(ensure_bundle(SHAPES['$SHAPE'], 'fp16', lambda m: print(m, flush=True)))
\" && touch '$KIT/logs/build.done' || touch '$KIT/logs/build.failed'" > "$KIT/logs/build.log" 2>&1 < /dev/null &
  sleep 2
  tail -3 "$KIT/logs/build.log" || true
  ;;
status)
  if [ -f "$KIT/logs/build.done" ]; then say "bundle: built"; elif [ -f "$KIT/logs/build.failed" ]; then
    say "bundle: FAILED"; tail -20 "$KIT/logs/build.log"; else say "bundle: building"; tail -3 "$KIT/logs/build.log" 2>/dev/null || true; fi
  ;;
test)
  load_env
  cd "$REPO"
  set -o pipefail
  "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
  ;;
bench)
  load_env
  cd "$REPO"
  while [ ! -f "$KIT/logs/build.done" ] && [ ! -f "$KIT/logs/build.failed" ] && pgrep -f "ensure_bundle" > /dev/null; do
    sleep 10; say "waiting for the bundle: $(tail -1 "$KIT/logs/build.log")"
  done
  cp "$KIT/logs/build.log" "$OUT/build.log" 2>/dev/null || true
  set -o pipefail
  "$PY" -m scops.runtime.cli bench --device cuda --shape "$SHAPE" --vs hf,llama-cpp --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  say "results: $("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['results_dir'])" "$OUT/report.json")"
  ;;
rehearse)
  OUT=${1:-$REPO/gpu-rehearsal-out}
  mkdir -p "$OUT"
  PY=${PY_REHEARSE:-$REPO/.venv/bin/python}
  if [ -f "$KITJSON" ]; then
    say "rehearsal: joining and checking the kit's pieces in a scratch folder"
    scratch=$(mktemp -d)
    for name in base ort; do
      for d in $("$PY" -c "import json,sys; print(' '.join(p['dir'] for p in json.load(open(sys.argv[1]))['payloads'][sys.argv[2]]['pieces']))" "$KITJSON" "$name"); do
        KIT=$scratch PY=$PY bash "$0" recv "$d" "$REPO/.gpukit/$d/piece"
      done
      read -r n sha < <("$PY" -c "import json,sys; p=json.load(open(sys.argv[1]))['payloads'][sys.argv[2]]; print(len(p['pieces']), p['sha256'])" "$KITJSON" "$name")
      have=$(cat $(for i in $(seq 1 "$n"); do echo "$scratch/pieces/$name.$i"; done) | sha256sum | cut -d' ' -f1)
      [ "$have" = "$sha" ] || { say "$name: joined sha256 differs"; exit 3; }
      cat $(for i in $(seq 1 "$n"); do echo "$scratch/pieces/$name.$i"; done) | "$PY" -c "import sys, tarfile; names = tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').getnames(); print(len(names), 'files;', *[n for n in names if n.endswith(('libggml-cuda.so', 'libonnxruntime_providers_cuda.so', 'libbitsandbytes_cuda130.so', 'libscops_kernels_cuda.so')) or n.endswith('llama-src/CMakeLists.txt')])"
    done
    rm -rf "$scratch"
  else
    say "rehearsal: no .gpukit here (python -m scops.bench.gpukit prepare makes it); skipping the pieces"
  fi
  cd "$REPO"
  set -o pipefail
  "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
  "$PY" -m scops.runtime.cli bench --device cuda --rehearse --shape "${REHEARSE_SHAPE:-tiny}" --vs hf,llama-cpp \
    --reps "${REHEARSE_REPS:-1}" --tokens "${REHEARSE_TOKENS:-8}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  ;;
*)
  sed -n 2,27p "$0"
  exit 2
  ;;
esac
