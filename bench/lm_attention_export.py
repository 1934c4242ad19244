"""The attention the LM decoder is exported from: transformers' SDPA and eager attention and
ours (``moqe-grouped``, tasks/causal_lm/attention.py: keys and values not repeated per query
head). The bundle's model exported each way, FP and a 4-bit RTN g32 expert of each (the build's
path: ORT's RTN, the 8-bit head at int8 compute, sibling MatMulNBits fused): prefill, decode
and perplexity side by side in one process, with the logits compared.

    python bench/lm_attention_export.py bundles/smollm2-135m --windows 8 --decode-tokens 16 --repeats 7 [--json PATH]
    python bench/lm_attention_export.py bundles/smollm2-135m --windows 8 --prompt-tokens 1024 ...  # a long context

The model comes from the bundle's recipe (``[model]``), the test windows from its
``report/eval_data.npz``; timing and perplexity are bench/lm_accuracy_level.py's (interleaved
rounds, medians). Needs the build extras (torch, transformers) and the model's files.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/ importable
from common import write_json  # noqa: E402
from lm_accuracy_level import measure_and_head, opener, parse_measure_args, timing_row  # noqa: E402

KINDS = ("sdpa", "eager", "moqe-grouped")


def export_both(model_cfg: dict, calib: np.ndarray, work: Path) -> dict:
    """{f"{graph}/{attention}": path} for graph in (fp, w4-rtn-g32) and both attention kinds."""
    from moqe_compile.quantize.nbits_fuse import fuse_siblings_file
    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx
    from moqe_compile.tasks.causal_lm.model import export_decoder, load_causal_lm
    from moqe_compile.tasks.causal_lm.steps import calib_feeds

    model, _ = load_causal_lm(model_cfg["source"], model_cfg["path"])  # registers moqe-grouped
    recipe = expert_from_dict({"name": "w4-rtn-g32", "preset": "w4-rtn"})
    paths = {}
    for kind in KINDS:
        model.set_attn_implementation(kind)
        fp = paths[f"fp/{kind}"] = work / f"fp-{kind}.onnx"
        spec = export_decoder(model, fp, model_cfg.get("opset", 18))
        q = paths[f"w4-rtn-g32/{kind}"] = work / f"w4-{kind}.onnx"
        quantize_onnx(fp, recipe, q, calib_feeds(calib, spec))  # RTN: the feeds are not read
        fuse_siblings_file(q)
    return paths


def main() -> None:
    args = parse_measure_args(__doc__, repeats=7)

    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.stats import paired_bootstrap

    b = read_bundle(args.bundle)
    open_ = opener(b, args.threads)
    with np.load(b.file("report/eval_data.npz"), allow_pickle=False) as z:
        calib = z["test_ids"][:1]
    with tempfile.TemporaryDirectory(prefix="moqe-attn-") as tmp:
        paths = export_both(b.manifest["build_config"]["_data"]["model"], calib, Path(tmp))
        sessions = {k: open_(k, p) for k, p in paths.items()}
        windows, nll, med, out = measure_and_head(b, sessions, args)
        logits = {k: s.logits(windows[:1]) for k, s in sessions.items()}
    for k in sessions:
        graph, kind = k.split("/")
        fp, sdpa = f"fp/{kind}", f"{graph}/sdpa"
        row = timing_row(nll, med, k, fp)
        for what in ("prefill", "decode", "steps"):
            row[f"{what}_speedup_vs_sdpa"] = med[f"{what}/{sdpa}"] / med[f"{what}/{k}"]
        row["max_abs_logit_diff_vs_sdpa"] = float(np.abs(logits[k] - logits[sdpa]).max())
        if kind != "sdpa":
            row["nll_minus_sdpa"] = paired_bootstrap(nll[k], nll[sdpa])
        out["models"][k] = row
        print(f"  {k:<24} ppl {row['ppl']:8.3f}" + "".join(
              f"  {what} {row[f'{what}_ms']:7.1f} ms (x{row[f'{what}_speedup_vs_sdpa']:.2f} vs sdpa, "
              f"x{row[f'{what}_speedup_vs_fp']:.2f} vs {fp})" for what in ("prefill", "decode", "steps"))
              + f"  max |logit diff| {row['max_abs_logit_diff_vs_sdpa']:.2g}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
