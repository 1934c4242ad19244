"""Language-model experts: the FP ONNX decoder -> one quantized ONNX decoder per recipe.

The recipe picks the quantizer (``quantize/nbits.py``: ORT's dynamic W8A8, RTN, HQQ or GPTQ
into MatMulNBits; ``quantize/gptq.py``: our GPTQ into MatMulNBits); SmoothQuant and AWQ
(``smoothing.py``) rescale the torch weights before export. The embedding Gather is never
quantized (the router reads the FP embeddings), and the LM head only when the recipe says so.
"""

from __future__ import annotations

from pathlib import Path

from moqe_compile.quantize.gptq import gptq_onnx
from moqe_compile.quantize.nbits import lm_head_node, quantize_dynamic_w8a8, quantize_matmulnbits, set_accuracy_level
from moqe_compile.tasks.causal_lm.config import LMExpertRecipe


def quantize_onnx(fp_onnx: Path, recipe: LMExpertRecipe, out: Path, calib_feeds: list[dict],
                  exclude_nodes=()) -> None:
    """Write ``recipe``'s quantized decoder. ``exclude_nodes``: MatMul node names left in float
    (an MoE model's gates, ``moe.py``)."""
    head = lm_head_node(fp_onnx)
    exclude = [head] if head and not recipe.quantize_lm_head else []
    exclude += [n for n in exclude_nodes if n not in exclude]
    if recipe.scheme == "w8a8-dynamic":
        quantize_dynamic_w8a8(fp_onnx, out, exclude)
    elif recipe.weights == "gptq":  # ours: one calibration pass for all Hessians
        gptq_onnx(fp_onnx, out, calib_feeds, recipe.bits, recipe.block_size, recipe.gptq_damp, set(exclude),
                  symmetric=recipe.symmetric)
    else:
        quantize_matmulnbits(fp_onnx, out, recipe.weights, recipe.bits, recipe.block_size, recipe.symmetric,
                             exclude, calib_feeds, recipe.gptq_damp)
    if recipe.scheme == "nbits":
        set_accuracy_level(out, recipe.accuracy_level)
