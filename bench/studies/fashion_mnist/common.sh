# Sourced by this folder's scripts (their arguments pass through): the shared options and the
# build / evaluate / keep-the-report step.
#   --work DIR     the bundles and eval reports (default: a fresh temporary folder, printed);
#                  pass gated.sh's DIR to w2a8_cost.sh to reuse its W2A8 layer-group bundle
#   --results DIR  where the JSON of record go (default bench/results/epyc-2core)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
recipes=$repo/moqe_compile/recipes
work="" results=$repo/bench/results/epyc-2core
while [[ $# -gt 0 ]]; do
  case $1 in
    --work) work=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    *) echo "usage: bash $0 [--work DIR] [--results DIR]" >&2; exit 2 ;;
  esac
done
work=${work:-$(mktemp -d)}
mkdir -p "$work" "$results"
echo "work folder: $work" >&2

# build_eval NAME [build options]: fmnist-NAME.toml -> $work/NAME, evaluated on its test split,
# the report kept as $results/fmnist-NAME-eval.json
build_eval() {
  local name=$1; shift
  moqe-compile build "$recipes/fmnist-$name.toml" -o "$work/$name" "$@"
  moqe-compile eval "$work/$name" --out "$work/$name-eval" --no-latency
  cp "$work/$name-eval/report.json" "$results/fmnist-$name-eval.json"
}
