#!/usr/bin/env bash
# The cost-aware router on the W2A8 layer-group experts. The cost weight is chosen on router_val
# only (w2a8_cost.py states the rule), from the routers the W2A8 layer-group bundle's experts
# give; the recipe fmnist-w2a8-cost.toml carries the chosen value (checked here), then is built
# with --force-routing and evaluated with every control.
#   bash bench/studies/fashion_mnist/w2a8_cost.sh [--work DIR] [--results DIR]
source "$(dirname "$0")/common.sh"
python "$here/train_cnn.py"
[ -f "$work/w2a8-groups/manifest.json" ] ||
  moqe-compile build "$recipes/fmnist-w2a8-groups.toml" -o "$work/w2a8-groups" --force-routing
sweep=$results/fmnist-w2a8-cost-sweep.json
python "$here/w2a8_cost.py" "$work/w2a8-groups" --json "$sweep"
chosen=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_cost_weight'])" "$sweep")
in_recipe=$(python -c "import sys,tomllib; print(float(tomllib.load(open(sys.argv[1],'rb'))['router']['cost_weight']))" \
  "$recipes/fmnist-w2a8-cost.toml")
[ "$chosen" = "$in_recipe" ] || { echo "val chose cost_weight = $chosen; fmnist-w2a8-cost.toml has $in_recipe" >&2; exit 1; }
build_eval w2a8-cost --force-routing
# The stricter cost control (best random mix of single experts at MoQE's expected cost) and MoQE
# against every single expert, on router_val and test of the built bundle.
python "$here/w2a8_cost.py" "$work/w2a8-cost" --frontier --json "$results/fmnist-w2a8-cost-frontier.json"
