"""The paper's Table 2/3 shape for a causal LM: perplexity of FP, each expert, the oracle and MoQE
on the test split (per corpus, bootstrap 95% CIs, paired MoQE-vs-best test), at INT8 and INT4,
plus per-sequence latency of MoQE vs its expert (ONNX Runtime CPU).

    python bench/lm_table.py bundles/smollm2-135m.toml --out bench/lm-out --json bench/results-smollm2-lm.json

Builds the recipe once per expert menu (--menus int8,int4; the recipe's own experts are
replaced), then reads each bundle's build report (test split: never used for any choice) and
times one test window. Figures are what the run measured; nothing is tuned on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MENUS = {
    "int8": ["w8a8-rtn", "w8a8-smoothquant-0.5", "w8a8-smoothquant-0.85", "w8-gptq"],
    "int4": ["w4-rtn", "w4-hqq", "w4-gptq", "w4-awq"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True, help="directory for the bundles (one per menu)")
    ap.add_argument("--menus", default="int8,int4")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--repeats", type=int, default=3, help="latency rounds (interleaved medians)")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already built under --out")
    ap.add_argument("--max-sequences", type=int, default=None, help="override [data] max_sequences")
    ap.add_argument("--skip", default="", help="comma-separated presets to leave out of the menus")
    args = ap.parse_args(argv)

    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.lm import render_lm_markdown
    from moqe_compile.evaluate.lm_eval import _latency
    from moqe_compile.lm_config import _expert, load_lm_recipe
    from moqe_compile.lm_pipeline import build_lm
    from moqe_compile.runtime.lm import LMRuntime

    results = {}
    for menu in args.menus.split(","):
        cfg = load_lm_recipe(args.recipe)
        skip = set(filter(None, args.skip.split(",")))
        cfg.experts = [_expert({"name": p, "preset": p}) for p in MENUS[menu] if p not in skip]
        if args.max_sequences is not None:
            cfg.data.max_sequences = args.max_sequences
        out = Path(args.out) / menu
        if not (args.reuse and (out / "manifest.json").is_file()):
            build_lm(cfg, out)
        b = read_bundle(out)
        rep = json.loads(b.file("report/report.json").read_text())
        rt = LMRuntime(b)
        import numpy as np

        with np.load(b.file("report/eval_data.npz"), allow_pickle=False) as z:
            window = z["test_ids"][0]
        lat = _latency(rt, window, args.repeats)
        rt.close()
        results[menu] = {"test": rep["splits"]["test"], "gate": rep["gate"], "latency_ms": lat,
                         "build_seconds": b.manifest["report"]["build_seconds"],
                         "experts": {e["name"]: {"kernels": e["variants"]["onnxruntime-cpu"]["kernels"],
                                                 "build_seconds": e["build_seconds"]} for e in b.manifest["experts"]}}
        print(render_lm_markdown(rep["splits"]["test"], f"{menu}: test split"))
        print(f"gate: {rep['gate']['decision']} ({rep['gate']['reason']})")
        print("latency ms/sequence: " + ", ".join(f"{k} {v:.1f}" for k, v in lat["median_ms"].items())
              + f"; MoQE / its expert {lat['moqe_over_its_expert']:.3f}\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
