#!/usr/bin/env bash
# MoQE vs the best single expert on Fashion-MNIST, at INT8 and at W4A8, with experts from the
# recipe menu. Needs the Debian dataset (apt-get install -y dataset-fashion-mnist); the FP CNN
# is trained once and cached.
#   bash bench/studies/fashion_mnist/menus.sh [--work DIR] [--results DIR]
source "$(dirname "$0")/common.sh"
python "$here/train_cnn.py"
for case in w4a8 int8; do
  build_eval "$case-menu" -q
done
