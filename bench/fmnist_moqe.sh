#!/usr/bin/env bash
# The Router/eval issue's case: MoQE vs the best single expert on Fashion-MNIST, at INT8 and at
# W4A8, with experts from the recipe menu. Needs the Debian dataset and the cached FP CNN:
#   apt-get install -y dataset-fashion-mnist && python bench/fmnist_model.py --out ~/.cache/moqe/fmnist_cnn
#   bash bench/fmnist_moqe.sh [OUT_ROOT]
set -euo pipefail
root=${1:-/tmp/moqe-fmnist}
mkdir -p "$root"
for case in w4a8 int8; do
  moqe-compile build "bundles/fmnist-$case-menu.toml" -o "$root/$case" -q
  moqe-compile eval "$root/$case" --out "$root/$case-eval" --no-latency
done
