"""The paper's Table 2/3 shape for a causal LM: perplexity of FP, each expert, the oracle and MoQE
on the test split (per corpus, bootstrap 95% CIs, paired MoQE-vs-best test), at INT8 and INT4,
plus per-sequence latency of MoQE vs its expert (ONNX Runtime CPU).

    python bench/lm_perplexity.py moqe_compile/recipes/smollm2-135m.toml --menus int4 \\
        --json bench/results/epyc-2core/smollm2-lm-int4.json

Builds the recipe once per expert menu (--menus int8,int4 replace the recipe's own experts;
``recipe`` keeps them) into ``--work DIR`` (default: a temporary folder), then reads each
bundle's build report (test split: never used for any choice) and times one test window. Figures are what the run measured; nothing is tuned on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

MENUS = {
    "int8": ["w8a8-rtn", "w8a8-smoothquant-0.5", "w8a8-smoothquant-0.85", "w8-gptq"],
    "int4": ["w4-rtn", "w4-hqq", "w4-gptq", "w4-awq"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the bundles, one per menu (default: a temporary folder; give one for --reuse)")
    ap.add_argument("--menus", default="int8,int4", help=f"comma-separated, of {[*MENUS, 'recipe']}")
    add_json_option(ap)
    ap.add_argument("--repeats", type=int, default=3, help="latency rounds (interleaved medians)")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already built under --work")
    ap.add_argument("--max-sequences", type=int, default=None, help="override [data] max_sequences")
    ap.add_argument("--skip", default="", help="comma-separated presets to leave out of the menus")
    args = ap.parse_args(argv)
    menus = args.menus.split(",")
    if unknown := [m for m in menus if m not in MENUS and m != "recipe"]:
        ap.error(f"--menus: {unknown} not in {[*MENUS, 'recipe']}")  # before the first (long) build

    results = {}
    with tempfile.TemporaryDirectory(prefix="moqe-lm-") as tmp:
        work = args.work or Path(tmp)
        for menu in menus:
            results[menu] = measure_menu(args, menu, work / menu)
    write_json(args.json, results)
    return 0


def measure_menu(args, menu: str, out: Path) -> dict:
    """Build (or with --reuse, read) the bundle of one menu; its test-split figures and latency."""
    import numpy as np

    from moqe_compile.bundle import read_bundle
    from moqe_compile.tasks.causal_lm.report import render_lm_markdown
    from moqe_compile.tasks.causal_lm.eval import latency
    from moqe_compile.tasks.causal_lm.config import expert_from_dict, load_lm_recipe
    from moqe_compile.build import build as build_lm
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    cfg = load_lm_recipe(args.recipe)
    if menu != "recipe":
        skip = set(filter(None, args.skip.split(",")))
        cfg.experts = [expert_from_dict({"name": p, "preset": p}) for p in MENUS[menu] if p not in skip]
    if args.max_sequences is not None:
        cfg.data.max_sequences = args.max_sequences
    if not (args.reuse and (out / "manifest.json").is_file()):
        build_lm(cfg, out)
    b = read_bundle(out)
    rep = json.loads(b.file("report/report.json").read_text())
    rt = LMRuntime(b)
    with np.load(b.file("report/eval_data.npz"), allow_pickle=False) as z:
        window = z["test_ids"][0]
    lat = latency(rt, window, args.repeats)
    rt.close()
    print(render_lm_markdown(rep["splits"]["test"], f"{menu}: test split"))
    print(f"gate: {rep['gate']['decision']} ({rep['gate']['reason']})")
    print("latency ms/sequence: " + ", ".join(f"{k} {v:.1f}" for k, v in lat["median_ms"].items())
          + f"; MoQE / its expert {lat['moqe_over_its_expert']:.3f}\n", flush=True)
    return {"test": rep["splits"]["test"], "gate": rep["gate"], "latency_ms": lat,
            "build_seconds": b.manifest["report"]["build_seconds"],
            "experts": {e["name"]: {"kernels": e["variants"]["onnxruntime-cpu"]["kernels"],
                                    "build_seconds": e["build_seconds"]} for e in b.manifest["experts"]}}


if __name__ == "__main__":
    sys.exit(main())
