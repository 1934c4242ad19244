#!/usr/bin/env bash
# Issue 10: the cost-aware router on the W2A8 layer-group experts. The cost weight is chosen on
# router_val only (bench/fmnist_w2a8_cost.py states the rule), from the routers the W2A8
# layer-group bundle's experts give; the recipe bundles/fmnist-w2a8-cost.toml carries the chosen
# value, then is built with --force-routing and evaluated with every control.
#   bash bench/fmnist_w2a8_cost.sh [OUT_ROOT]
set -euo pipefail
root=${1:-/tmp/moqe-fmnist}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$root"
[ -f "$root/w2a8-groups/manifest.json" ] ||
  moqe-compile build "$here/../bundles/fmnist-w2a8-groups.toml" -o "$root/w2a8-groups" --force-routing
python "$here/fmnist_w2a8_cost.py" "$root/w2a8-groups" --json "$here/results-fmnist-w2a8-cost-sweep.json"
chosen=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_cost_weight'])" \
  "$here/results-fmnist-w2a8-cost-sweep.json")
in_recipe=$(python -c "import sys,tomllib; print(float(tomllib.load(open(sys.argv[1],'rb'))['router']['cost_weight']))" \
  "$here/../bundles/fmnist-w2a8-cost.toml")
[ "$chosen" = "$in_recipe" ] || { echo "val chose cost_weight = $chosen; bundles/fmnist-w2a8-cost.toml has $in_recipe" >&2; exit 1; }
moqe-compile build "$here/../bundles/fmnist-w2a8-cost.toml" -o "$root/w2a8-cost" --force-routing
moqe-compile eval "$root/w2a8-cost" --out "$root/w2a8-cost-eval" --no-latency
cp "$root/w2a8-cost-eval/report.json" "$here/results-fmnist-w2a8-cost-eval.json"
# The stricter cost control (best random mix of single experts at MoQE's expected cost) and MoQE
# against every single expert, on router_val and test of the built bundle.
python "$here/fmnist_w2a8_cost.py" "$root/w2a8-cost" --frontier --json "$here/results-fmnist-w2a8-cost-frontier.json"
