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
#   rehearse [KITDIR]        the device calls of a kit made for this machine's Python, in order,
#                            against a scratch $KIT: pieces checked and joined, payloads unpacked,
#                            the (tiny) bundle built in the background, pytest -m gpu (skips
#                            here), and the GPU bench plan with --rehearse (CPU figures)
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
    if [ -d "$KIT/base/llama-src" ] && [ ! -f "$KIT/logs/llama.done" ]; then
      say "llama.cpp comes as source: start-build compiles it (sm_90, $(nproc) jobs) before the bundle"
    fi
  fi
  load_env
  # smoke tests: their failure is reported, not fatal (the later steps say what it costs)
  "$PY" - <<'EOF' || say "SMOKE TEST FAILED (above): the steps that need this part will fail too"
from scops.runtime import gpu
print("GPUs (driver):", gpu.cuda_devices())
print("preloaded:", len(gpu.preload_cuda_libraries()), "CUDA libraries from pip packages")
from scops.kernels import native_info
print("scops kernels:", native_info())
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers(), "TensorRT libs:", gpu.tensorrt_available())
import importlib.util
if importlib.util.find_spec("llama_cpp") is None:
    print("llama.cpp: not installed yet (start-build compiles it)")
else:
    import llama_cpp
    print("llama.cpp GPU offload:", bool(llama_cpp.llama_supports_gpu_offload()), gpu.llama_devices())
EOF
  if [ "$name" = ort ]; then
    "$PY" - <<'EOF' || say "onnxruntime CUDA EP SMOKE TEST FAILED (above)"
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
  say "background: llama.cpp CUDA build if it came as source, then the $SHAPE bundle (log: $KIT/logs/build.log)"
  cat > "$KIT/build.sh" <<BUILD
set -e
. '$KIT/env.sh'
cd '$REPO'
if [ -d '$KIT/base/llama-src' ] && [ ! -f '$KIT/logs/llama.done' ]; then
  # llama.cpp compiles beside the bundle's build (checkpoint, ONNX export, GGUF); only the
  # bundle's last step, quantization, needs it and waits for it
  (t0=\$(date +%s)
   NO_ISOLATION=1 CUDA_ARCHS=90-real JOBS=\$(nproc) LLAMA_SDIST='$KIT/base/llama-src' \
     bash bench/gpu_build_llama.sh '$PY' '$KIT/llama-wheel' > '$KIT/logs/llama-build.log' 2>&1 &&
   '$PY' -m pip install -q --no-deps --no-index --target '$KIT/base/site' '$KIT'/llama-wheel/*.whl &&
   echo "llama.cpp CUDA build: \$(( \$(date +%s) - t0 )) s" && touch '$KIT/logs/llama.done' ||
   touch '$KIT/logs/llama.failed') &
fi
'$PY' -c "
import os, time
from scops.bench.shapes import SHAPES, ensure_bundle
from scops.export import assemble
quantize = assemble.quantize_gguf
def after_llama(*a, **k):
    while os.path.isdir('$KIT/base/llama-src') and not os.path.exists('$KIT/logs/llama.done'):
        if os.path.exists('$KIT/logs/llama.failed'):
            raise SystemExit('the llama.cpp CUDA build failed: $KIT/logs/llama-build.log')
        time.sleep(5)
    return quantize(*a, **k)
assemble.quantize_gguf = after_llama
print(ensure_bundle(SHAPES['$SHAPE'], 'fp16', lambda m: print(m, flush=True)))
"
BUILD
  setsid nohup bash -c "bash '$KIT/build.sh' && touch '$KIT/logs/build.done' || touch '$KIT/logs/build.failed'" \
    > "$KIT/logs/build.log" 2>&1 < /dev/null &
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
  while [ -d "$KIT/base/llama-src" ] && [ ! -f "$KIT/logs/llama.done" ] && [ ! -f "$KIT/logs/llama.failed" ]; do
    sleep 10; say "waiting for the llama.cpp CUDA build: $(tail -1 "$KIT/logs/llama-build.log" 2>/dev/null)"
  done
  set -o pipefail
  "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
  ;;
bench)
  load_env
  cd "$REPO"
  while [ ! -f "$KIT/logs/build.done" ] && [ ! -f "$KIT/logs/build.failed" ] && pgrep -f "$KIT/build.sh" > /dev/null; do
    sleep 10; say "waiting for the bundle: $(tail -1 "$KIT/logs/build.log")"
  done
  cp "$KIT/logs/build.log" "$OUT/build.log" 2>/dev/null || true
  set -o pipefail
  extra=()
  [ -n "${REHEARSE:-}" ] && extra=(--rehearse --reps 1 --tokens 8)      # the CPU rehearsal of this call
  "$PY" -m scops.runtime.cli bench --device cuda --shape "$SHAPE" --vs hf,llama-cpp "${extra[@]}" --out "$OUT"     2>&1 | tee "$OUT/bench.log"
  say "results: $("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['results_dir'])" "$OUT/report.json")"
  ;;
rehearse)
  # The device calls of a kit made for this machine's Python, run here in order:
  #   python -m scops.bench.gpukit prepare --kit .gpukit-rehearsal --python 3.11 \
  #       --llama-wheel <a llama-cpp-python wheel> --ort onnxruntime==<version>
  kitdir=${1:-$REPO/.gpukit-rehearsal}
  export KITJSON="$kitdir/kit.json" KIT=${REHEARSE_KIT:-$(mktemp -d)} PY=${PY_REHEARSE:-$REPO/.venv/bin/python}
  export SHAPE=${REHEARSE_SHAPE:-tiny} REHEARSE=1 OUT=${OUT_REHEARSE:-$REPO/gpu-rehearsal-out}
  [ -f "$KITJSON" ] || { say "no $KITJSON: make a rehearsal kit first (see the comment above)"; exit 2; }
  mkdir -p "$OUT"
  before=$(ls "$REPO"/kernels/*.so 2>/dev/null || true)
  mapfile -t calls < <(cd "$REPO" && "$PY" -m scops.bench.gpukit calls --kit "$kitdir")
  rc=0
  for c in "${calls[@]}"; do
    say "call: $c"
    (cd "$REPO" && bash -c "$c") || { rc=$?; say "call failed ($rc): $c"; break; }
  done
  [ -z "$before" ] && rm -f "$REPO"/kernels/libscops_kernels*.so    # the device copies them in; here they would shadow the venv's
  say "rehearsal done (rc $rc): $OUT; state in $KIT"
  exit $rc
  ;;
*)
  sed -n 2,27p "$0"
  exit 2
  ;;
esac
