"""The build's two decoder-graph rewrites, before and after, on one LM bundle: sibling
MatMulNBits fused (q/k/v as one kernel, gate/up as one) and every RMSNorm as one
(Skip)SimplifiedLayerNormalization node. Prefill, decode and perplexity of FP and of each
4-bit expert, side by side in one process, with the outputs compared.

    python bench/lm_graph_rewrites.py bundles/smollm2-135m --windows 8 --decode-tokens 16 --repeats 7 [--json PATH]

Variants, each made in memory from the bundle's graphs (the bundle is not touched):
- FP: ``fp`` (as in the bundle), ``fp+norms`` (what the build now ships), and the control
  ``fp+norms+siblings`` (FP's float MatMuls fused the same way: how much the fusion alone is worth);
- each MatMulNBits expert ``E``: ``E`` (as in the bundle), ``E+siblings``, ``E+siblings+norms``
  (what the build now ships).
A bundle built since these rewrites landed is already rewritten: its variants merge nothing
(``rewrites`` 0) and time the same graph again. Timing and perplexity are
bench/lm_accuracy_level.py's (interleaved rounds, medians; the first ``--windows`` test windows).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/ importable
from common import write_json  # noqa: E402
from lm_accuracy_level import measure_and_head, nbits_graphs, opener, parse_measure_args, timing_row  # noqa: E402


def rewritten(graph, siblings: bool, norms: bool, float_matmuls: bool):
    """(the graph with the rewrites applied in memory, how many groups and norms they merged)."""
    import onnx

    from moqe_compile.quantize.nbits_fuse import fuse_siblings
    from moqe_compile.tasks.causal_lm.model import fuse_rms_norms

    m = onnx.load_from_string(graph.model)
    count = fuse_siblings(m, float_matmuls=float_matmuls) if siblings else 0
    count += fuse_rms_norms(m) if norms else 0
    return dataclasses.replace(graph, model=m.SerializeToString()), count


def variants(name: str) -> dict:
    """{variant: (siblings, norms)} of graph ``name``."""
    if name == "fp":
        return {"fp": None, "fp+norms": (False, True), "fp+norms+siblings": (True, True)}
    return {name: None, f"{name}+siblings": (True, False), f"{name}+siblings+norms": (True, True)}


def main() -> None:
    args = parse_measure_args(__doc__, repeats=7)

    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.stats import paired_bootstrap

    b = read_bundle(args.bundle)
    open_ = opener(b, args.threads)
    sessions, counts, base = {}, {}, {}
    for name, g in nbits_graphs(b).items():
        for k, how in variants(name).items():
            g2, counts[k] = (g, 0) if how is None else rewritten(g, *how, float_matmuls=name == "fp")
            sessions[k] = open_(k, g2)
            base[k] = name
    windows, nll, med, out = measure_and_head(b, sessions, args)
    logits = {k: s.logits(windows[:1]) for k, s in sessions.items()}
    for k in sessions:
        # like against like: a shipped-now expert against the shipped-now FP, an old one against the old FP
        fp = "fp+norms" if k.endswith("+norms") and base[k] != "fp" else "fp"
        row = timing_row(nll, med, k, fp) | {
            "rewrites": counts[k], "fp_compared": fp,
            "max_abs_logit_diff_vs_bundle": float(np.abs(logits[k] - logits[base[k]]).max())}
        if k != base[k]:
            row["nll_minus_bundle"] = paired_bootstrap(nll[k], nll[base[k]])
        out["models"][k] = row
        print(f"  {k:<28} ppl {row['ppl']:8.3f}  prefill {row['prefill_ms']:7.1f} ms  decode {row['decode_ms']:7.1f} ms"
              f"  vs {fp}: prefill x{row['prefill_speedup_vs_fp']:.2f} decode x{row['decode_speedup_vs_fp']:.2f}"
              f"  rewrites {counts[k]}, max |logit diff| {row['max_abs_logit_diff_vs_bundle']:.2g}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
