#!/usr/bin/env bash
# Figures of the Foundation issue: default bundle build time, and latency at batch 1 and 32
# of the router, each expert, FP32 and the whole MoQE path (medians, interleaved, one run).
#   bash bench/foundation.sh [OUT_DIR]
set -euo pipefail
out=${1:-bundles/mobilenetv2-demo}
/usr/bin/time -f "build wall %e s, max RSS %M KB" moqe-compile build -q -o "$out"
python -c "import json,sys; m=json.load(open(sys.argv[1]+'/manifest.json')); print('build stages (s):', m['report']['build_seconds'])" "$out"
python bench/latency.py "$out" --batches 1 32 --repeats 30 --json "$out.latency.json"
