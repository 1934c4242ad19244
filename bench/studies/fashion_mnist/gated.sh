#!/usr/bin/env bash
# The W4A8 menu with the strongest expert, the copies control and the significance gate; and the
# W2A8 layer-group experts (the regime where routing might pay), built with --force-routing so
# the test split shows what the refused router does, the gate's verdict still recorded.
#   bash bench/studies/fashion_mnist/gated.sh [--work DIR] [--results DIR]
source "$(dirname "$0")/common.sh"
python "$here/train_cnn.py"
build_eval w4a8-gated
build_eval w2a8-groups --force-routing
