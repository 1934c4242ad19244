#!/usr/bin/env bash
# Issue 10 on Fashion-MNIST: the W4A8 menu with the strongest expert, the copies control and
# the significance gate; and the W2A8 layer-group experts (the "regime where routing pays"
# lead), built with --force-routing so the test split shows what the refused router does, the
# gate's verdict still recorded. Each eval report.json is copied into bench/.
#   bash bench/fmnist_gated.sh [OUT_ROOT]
set -euo pipefail
root=${1:-/tmp/moqe-fmnist}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$root"
moqe-compile build bundles/fmnist-w4a8-gated.toml -o "$root/w4a8-gated"
moqe-compile eval "$root/w4a8-gated" --out "$root/w4a8-gated-eval" --no-latency
cp "$root/w4a8-gated-eval/report.json" "$here/results-fmnist-w4a8-gated-eval.json"
moqe-compile build bundles/fmnist-w2a8-groups.toml -o "$root/w2a8-groups" --force-routing
moqe-compile eval "$root/w2a8-groups" --out "$root/w2a8-groups-eval" --no-latency
cp "$root/w2a8-groups-eval/report.json" "$here/results-fmnist-w2a8-groups-eval.json"
