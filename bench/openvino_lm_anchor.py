"""An anchor for the 4-bit LM figures: OpenVINO runs the same ONNX decoder graphs (the FP model
and the bundle's MatMulNBits experts) side by side with ONNX Runtime. Says whether "4-bit is
not faster than FP32 at prefill" is ONNX Runtime's kernels or this CPU.

    pip install -e ".[bench]"
    python bench/openvino_lm_anchor.py bundles/smollm2-budget --windows 4 --decode-tokens 16 --repeats 5 [--json PATH]

ONNX Runtime: each graph as the bundle serves it (``DecoderSession``: level ``all``, default
threads, no spin-waiting, the recipe's ``accuracy_level``). OpenVINO: the same graph with its
shared tensors written in (``Graph.self_contained``), read by OpenVINO's ONNX reader (MatMulNBits
becomes 4/8-bit weight constants that its CPU plugin runs as compressed matrix products) and
compiled for ``CPU`` with the ``LATENCY`` hint and ``f32`` inference precision, so that its FP
model computes in float32 as ONNX Runtime's does (left to itself it may pick bf16 on a CPU that
has it); its default dynamic quantization of activations for compressed weights stays on.
Per round, interleaved: a prefill of one test window and a decode of ``--decode-tokens``
single-token steps on the KV cache after a 32-token prompt (``--prompt-tokens``); medians over ``--repeats`` rounds.
Perplexity of every (runtime, graph) over the first ``--windows`` test windows, with the paired
difference OpenVINO minus ONNX Runtime on the same graph, so a fast wrong answer shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import write_json  # noqa: E402
from lm_accuracy_level import measure, nbits_graphs, opener, parse_measure_args, timing_row  # noqa: E402


class OpenVINODecoder:
    """``DecoderSession``'s ``step``/``logits``/``empty_past`` on an OpenVINO compiled model."""

    def __init__(self, core, model: bytes, kv_heads: int, head_dim: int, config: dict):
        self.compiled = core.compile_model(core.read_model(model=model, weights=b""), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.inputs[2:]]

    def step(self, ids, mask, past):
        res = self.request.infer(dict(zip(self.inputs, [ids, mask, *past])))
        out = [np.array(res[o]) for o in self.compiled.outputs]  # copied: the request reuses its buffers
        return out[0], out[1:]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self.step(ids, np.ones_like(ids), self.empty_past(len(ids)))[0]


def main() -> None:
    args = parse_measure_args(__doc__, repeats=5, extra=lambda ap: ap.add_argument(
        "--experts", nargs="*", default=None, help="expert names (default: every MatMulNBits expert)"))

    import openvino as ov

    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.stats import paired_bootstrap

    b = read_bundle(args.bundle)
    d = b.manifest["model"]["decoder"]
    graphs = nbits_graphs(b, args.experts)
    open_ort = opener(b, args.threads)
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    sessions = {}
    for name, g in graphs.items():
        sessions[f"ort/{name}"] = open_ort(name, g)
        sessions[f"openvino/{name}"] = OpenVINODecoder(core, g.self_contained(), d["kv_heads"], d["head_dim"], config)
    windows, nll, med = measure(b, sessions, args.windows, args.decode_tokens, args.repeats, args.prompt_tokens)
    window = windows[0]
    out = {"bundle": Path(args.bundle).name, "openvino": ov.get_version(), "openvino_config": config,
           "windows": int(len(windows)), "tokens_per_window": int(len(window)), "decode_tokens": args.decode_tokens,
           "prompt_tokens": args.prompt_tokens,
           "repeats": args.repeats, "median_ms": med, "models": {}}
    print(f"{len(windows)} test windows of {len(window)} tokens; prefill = one window, decode = "
          f"{args.decode_tokens} tokens after a {args.prompt_tokens}-token prompt; "
          f"medians of {args.repeats} interleaved rounds")
    for k in sessions:
        runtime, name = k.split("/", 1)
        fp = f"{runtime}/fp"
        row = timing_row(nll, med, k, fp, phases=("prefill", "decode"))
        extra = ""
        if runtime == "openvino":
            p = row["nll_minus_ort"] = paired_bootstrap(nll[k], nll[f"ort/{name}"])
            row["prefill_vs_ort"] = med[f"prefill/ort/{name}"] / row["prefill_ms"]
            row["decode_vs_ort"] = med[f"decode/ort/{name}"] / row["decode_ms"]
            extra = (f"  x{row['prefill_vs_ort']:.2f} / x{row['decode_vs_ort']:.2f} vs ORT; NLL - ORT {p['diff']:+.4f} "
                     f"{np.round(p['ci95'], 4)}")
        out["models"][k] = row
        print(f"  {k:<34} ppl {row['ppl']:8.3f}  prefill {row['prefill_ms']:8.1f} ms "
              f"(x{row['prefill_speedup_vs_fp']:.2f} vs its FP)  decode {row['decode_ms']:8.1f} ms (x{row['decode_speedup_vs_fp']:.2f}){extra}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
