"""One SmolLM2-135M-shaped MatMul (default: an MLP projection, 576 -> 1536, 4-bit) as MatMulNBits on ONNX Runtime CPU:
integer zero points (RTN, symmetric and asymmetric) vs HQQ's float zero points, each at
``accuracy_level`` 0 (float compute) and 4 (int8 compute), against the float MatMul, at one
row (decode) and 256 rows (prefill); no model or data download needed.

    python bench/matmulnbits_kernels.py --repeats 200 [--json PATH]
    python bench/matmulnbits_kernels.py --n 49152 --bits 8 --block 128 --repeats 50   # SmolLM2's 8-bit head

Weights are random (N(0, 0.05)); every session runs interleaved round by round on the same
input, medians over ``--repeats`` rounds (a fifth of them at 256 rows). The error column is
max |y - y_fp| / max |y_fp|: what the 4-bit weights and the int8 activations cost together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

def main() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    from moqe_compile.backends.onnxruntime_cpu import session
    from moqe_compile.quantize.nbits import apply_accuracy_level
    from moqe_compile.evaluate.latency import time_interleaved

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--k", type=int, default=576, help="input width (SmolLM2-135M's hidden size)")
    ap.add_argument("--n", type=int, default=1536, help="output width (1536: an MLP projection; 49152: the LM head)")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8], help="weight bits (HQQ is measured at 4 only)")
    ap.add_argument("--block", type=int, default=32)
    add_json_option(ap)
    args = ap.parse_args()
    K, N, bits, block = args.k, args.n, args.bits, args.block

    w = (np.random.default_rng(0).normal(size=(K, N)) * 0.05).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
                          [numpy_helper.from_array(w, "w")])
    fp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    def quantized(algo, symmetric: bool, level: int) -> bytes:
        q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(fp.SerializeToString()), bits=bits, block_size=block,
                                 is_symmetric=symmetric, algo_config=algo)
        q.process()
        apply_accuracy_level(q.model.model, level)
        return q.model.model.SerializeToString()

    sess = {"fp32": session(fp.SerializeToString())}
    for level in (0, 4):
        sess[f"rtn-sym/a{level}"] = session(quantized(DefaultWeightOnlyQuantConfig(block, True, bits=bits), True, level))
        sess[f"rtn-asym/a{level}"] = session(quantized(DefaultWeightOnlyQuantConfig(block, False, bits=bits), False, level))
        if bits == 4:
            sess[f"hqq/a{level}"] = session(quantized(HQQWeightOnlyQuantConfig(block, bits=4), False, level))
    out = {"shape": [K, N], "bits": bits, "block": block, "repeats": args.repeats, "rows": {}}
    for m in (1, 256):
        x = np.random.default_rng(1).normal(size=(m, K)).astype(np.float32)
        ref = sess["fp32"].run(None, {"x": x})[0]
        row = time_interleaved({k: (lambda s=s: s.run(None, {"x": x})) for k, s in sess.items()},
                               args.repeats if m == 1 else max(1, args.repeats // 5))
        for k, s in sess.items():
            y = s.run(None, {"x": x})[0]
            row[k]["speedup_vs_fp32"] = round(row["fp32"]["median_ms"] / row[k]["median_ms"], 3)
            row[k]["rel_err"] = round(float(np.abs(y - ref).max() / np.abs(ref).max()), 4)
        out["rows"][str(m)] = row
        print(f"{m} row(s):")
        for k, v in row.items():
            print(f"  {k:<12} {v['median_ms'] * 1e3:9.1f} us  x{v['speedup_vs_fp32']:.2f} vs fp32  rel err {v['rel_err']}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
