#!/usr/bin/env bash
# Issue 10, "the regime where routing pays", second setting: a CNN trained on three visible
# domains of Fashion-MNIST (original, inverted, heavy noise), experts calibrated on the mixture
# and per domain at W3A8 (bundles/fmnist-domains.toml) and at W2A8 (bundles/fmnist-domains-w2a8.toml),
# the CV router, every control; built with --force-routing so the test split shows what the
# router does (the gate's verdict is still recorded), then the per-domain diagnosis. Reports are
# copied into bench/. About 20 min per bundle on 2 CPUs, plus ~55 min to train the FP model once.
#   bash bench/fmnist_domains.sh [OUT_ROOT]
set -euo pipefail
root=${1:-/tmp/moqe-fmnist}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$root"
python "$here/fmnist_model.py" --domains original inverted noise   # cached in ~/.cache/moqe/fmnist_domains_cnn
for v in domains domains-w2a8; do
  moqe-compile build "$here/../bundles/fmnist-$v.toml" -o "$root/$v" --force-routing
  moqe-compile eval "$root/$v" --out "$root/$v-eval" --no-latency
  cp "$root/$v-eval/report.json" "$here/results-fmnist-$v-eval.json"
  python "$here/fmnist_domains_diagnose.py" "$root/$v" --json "$here/results-fmnist-$v-diagnosis.json"
done
