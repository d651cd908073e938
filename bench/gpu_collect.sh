#!/usr/bin/env bash
# bench/gpu_collect.sh FILES_AT -- put a GPU run's report where report.json says it belongs
# (bench/results/<gpu>_<shape>/: report.md, report.json, latency.png), ready to commit.
set -euo pipefail
src=${1:?usage: gpu_collect.sh FOLDER_WITH_REPORT}
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert not r.get('rehearsal'), 'a CPU rehearsal is not a GPU result'; print(r['results_dir'])" "$src/report.json")
mkdir -p "$repo/$dest"
cp "$src/report.md" "$src/report.json" "$src/latency.png" "$repo/$dest/"
for f in pytest-gpu.log bench.log; do [ -f "$src/$f" ] && cp "$src/$f" "$repo/$dest/"; done
echo "$repo/$dest"
