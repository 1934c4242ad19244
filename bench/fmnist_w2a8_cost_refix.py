"""python bench/fmnist_w2a8_cost_refix.py  (after bench/fmnist_w2a8_cost.sh built /tmp/moqe-fmnist/w2a8-cost)

Re-evaluate the W2A8 cost-aware bundle with the fixed controls: router_val (the gate's split)
and test; print the gate the fixed rule gives and the new cost_matched figure."""
import json
import subprocess

from moqe_compile.evaluate.controls import gate_decision
b = "/tmp/moqe-fmnist/w2a8-cost"
out = {}
for split in ("router_val", "test"):
    d = f"/tmp/moqe-fmnist/w2a8-cost-refix-{split}"
    subprocess.run(["moqe-compile", "eval", b, "--data", split, "--no-latency", "--out", d, "--json"],
                   check=True, stdout=subprocess.DEVNULL)
    out[split] = json.load(open(f"{d}/report.json"))
g = gate_decision(out["router_val"], 0.05, False)
t = out["test"]
cm = t["controls"]["cost_matched"]
res = {"gate_fixed": {k: g[k] for k in ("decision", "reason", "p_value", "val_gain")},
       "test_cost_matched": {k: cm.get(k) for k in ("moqe_expected_cost", "cheaper", "costlier", "weight_cheaper",
                                                    "moqe_minus_interpolated")},
       "test_moqe_vs_each": t["moqe_vs_each"], "test_moqe": t["moqe"]["top1"]}
json.dump(res, open("bench/results-fmnist-w2a8-cost-refixed.json", "w"), indent=2)
print(json.dumps(res, indent=2))
