#!/usr/bin/env bash
# The regime where routing should pay, second setting: a CNN trained on three visible domains of
# Fashion-MNIST (original, inverted, heavy noise), experts calibrated on the mixture and per
# domain at W3A8 (fmnist-domains.toml) and at W2A8 (fmnist-domains-w2a8.toml), the CV router,
# every control; built with --force-routing so the test split shows what the router does (the
# gate's verdict is still recorded), then the per-domain diagnosis. About 20 min per bundle on
# 2 CPUs, plus ~55 min to train the FP model once.
#   bash bench/studies/fashion_mnist/domains.sh [--work DIR] [--results DIR]
source "$(dirname "$0")/common.sh"
python "$here/train_cnn.py" --domains original inverted noise   # cached in ~/.cache/moqe/fmnist_domains_cnn
for v in domains domains-w2a8; do
  build_eval "$v" --force-routing
  python "$here/domains_diagnose.py" "$work/$v" --json "$results/fmnist-$v-diagnosis.json"
done
