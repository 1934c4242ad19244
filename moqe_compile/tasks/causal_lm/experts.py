"""Language-model experts: the FP ONNX decoder -> one quantized ONNX decoder per recipe.

The recipe picks the quantizer (``quantize/nbits.py``: ORT's dynamic W8A8, RTN, HQQ or GPTQ
into MatMulNBits; ``quantize/gptq.py``: our GPTQ into MatMulNBits); SmoothQuant and AWQ
(``smoothing.py``) rescale the torch weights before export. The embedding Gather is never
quantized (the router reads the FP embeddings); the LM head gets its own width, ``head_bits``.
"""

from __future__ import annotations

from pathlib import Path

from moqe_compile.errors import BuildError
from moqe_compile.quantize.gptq import gptq_onnx
from moqe_compile.quantize.nbits import lm_head_node, quantize_dynamic_w8a8, quantize_matmulnbits, set_accuracy_level
from moqe_compile.tasks.causal_lm.config import FLOAT_HEAD, LMExpertRecipe


def quantize_onnx(fp_onnx: Path, recipe: LMExpertRecipe, out: Path, calib_feeds: list[dict],
                  exclude_nodes=(), model=None, calib_ids=None, progress: bool = True) -> None:
    """Write ``recipe``'s quantized decoder. ``exclude_nodes``: MatMul node names left in float
    (an MoE model's gates, ``moe.py``); the head among them stays float too. ``model`` /
    ``calib_ids``: the torch model ``fp_onnx`` was exported from and the calibration windows,
    for true-sequential GPTQ (``gptq_sequential``; ``progress``: its bar shown)."""
    head = lm_head_node(fp_onnx)
    if head in exclude_nodes:
        head = None
    own_head = head is not None and recipe.head_bits != recipe.bits  # the head at a width of its own
    kept = _high_precision(fp_onnx, recipe, head, exclude_nodes)
    exclude = list(exclude_nodes) + ([head] if own_head else []) + kept
    if recipe.scheme == "w8a8-dynamic":
        quantize_dynamic_w8a8(fp_onnx, out, exclude)  # head_bits 8 (= bits) or float
    elif recipe.weights == "gptq" or recipe.bits == 3:
        # Ours: one calibration pass for all Hessians, the head at its width in it; at 3 bits RTN
        # too (the same writer without Hessians: ORT's RTN writes 2, 4 or 8 bits).
        node_bits = {head: recipe.head_bits} if own_head and recipe.head_bits != FLOAT_HEAD else {}
        node_bits.update({n: 8 for n in kept})
        done = None
        if recipe.gptq_sequential:
            if model is None or calib_ids is None:
                raise BuildError("gptq_sequential needs the torch model and the calibration windows.")
            from moqe_compile.tasks.causal_lm.sequential import sequential_gptq

            done = sequential_gptq(model, calib_ids, fp_onnx, recipe.bits, recipe.block_size, recipe.gptq_damp,
                                   recipe.symmetric, recipe.gptq_act_order,
                                   recipe.head_bits if head is not None else None, exclude_nodes, progress)
        gptq_onnx(fp_onnx, out, calib_feeds, recipe.bits, recipe.block_size, recipe.gptq_damp,
                  set(exclude) - set(node_bits), symmetric=recipe.symmetric, node_bits=node_bits,
                  act_order=recipe.gptq_act_order, done=done, nearest=recipe.weights == "rtn")
    else:
        quantize_matmulnbits(fp_onnx, out, recipe.weights, recipe.bits, recipe.block_size, recipe.symmetric,
                             exclude, calib_feeds, recipe.gptq_damp)
        # ORT's HQQ and GPTQ write 4 bits only: the head at another width, and the MatMuls kept
        # at 8 bits, are ORT's RTN on their own. With kept MatMuls the expert is 4-bit (3-bit
        # and 8-bit experts take the branch above or refuse them), so an own head is 8-bit or float.
        if own_head and recipe.head_bits != FLOAT_HEAD:  # the head, and any kept MatMul (both 8-bit)
            quantize_matmulnbits(out, out, "rtn", recipe.head_bits, recipe.block_size, recipe.symmetric,
                                 list(exclude_nodes))
        elif kept:
            quantize_matmulnbits(out, out, "rtn", 8, recipe.block_size, recipe.symmetric,
                                 list(exclude_nodes) + ([head] if own_head else []))
    if recipe.scheme == "nbits":
        set_accuracy_level(out, recipe.accuracy_level, recipe.accuracy_level_8bit)


def _high_precision(fp_onnx: Path, recipe: LMExpertRecipe, head: str | None, exclude_nodes) -> list[str]:
    """The recipe's ``high_precision_nodes``, checked against the graph's constant-weight MatMuls."""
    if not recipe.high_precision_nodes:
        return []
    import onnx

    from moqe_compile.quantize.nbits import const_matmuls

    names = {n.name for n in const_matmuls(onnx.load(str(fp_onnx), load_external_data=False), set(exclude_nodes))[0]}
    bad = [n for n in recipe.high_precision_nodes if n not in names or n == head]
    if bad:
        raise BuildError(f"expert {recipe.name!r}: high_precision_nodes {bad[:5]} are not quantized MatMuls of the "
                         f"decoder (the head has its own key, head_bits); e.g. {sorted(names)[:3]}.")
    return list(recipe.high_precision_nodes)
