"""Named causal-LM expert presets (recipes as data).

``scheme``: "w8a8-dynamic" = onnxruntime.quantization.quantize_dynamic (int8 per-channel
weights, activations quantized per tensor at run time -> MatMulInteger / DynamicQuantizeMatMul
kernels); "nbits" = MatMulNBitsQuantizer (weight-only, blockwise, float activations ->
MatMulNBits kernel). ``weights``: the weight-rounding algorithm. ``smoothquant_alpha`` /
``awq`` rescale the FP torch weights before export.
"""

from __future__ import annotations

from typing import Any

LM_EXPERT_PRESETS: dict[str, dict[str, Any]] = {
    # W8A8, round-to-nearest per-channel weights: ONNX Runtime's own dynamic quantization.
    "w8a8-rtn": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn"},
    # SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, s_j =
    # max|X_j|^a / max|W_j|^(1-a), folded into the preceding RMSNorm; then W8A8 as above.
    "w8a8-smoothquant-0.5": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn", "smoothquant_alpha": 0.5},
    "w8a8-smoothquant-0.85": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn", "smoothquant_alpha": 0.85},
    # SmoothQuant on every linear group, down_proj's input (through up_proj) included: where
    # SwiGLU's products put the largest activation outliers. The best W8A8 recipe measured on
    # SmolLM2-135M: x1.05 of FP perplexity against x1.56 for the RMSNorm groups alone
    # (docs/results.md#smoothquant-on-every-linear-group-w8a8).
    "w8a8-smoothquant-all-0.85": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn", "smoothquant_alpha": 0.85,
                                  "smoothquant_groups": "all"},
    # Weight-only GPTQ (Frantar et al. 2023) written as MatMulNBits; FP activations. "gptq" is ours
    # (one calibration pass for all Hessians), "gptq-ort" is ORT's (one pass per MatMul input,
    # so its build time grows with the number of distinct MatMul inputs: docs/results.md#smollm2-135m-int8-and-int4).
    "w8-gptq": {"scheme": "nbits", "bits": 8, "weights": "gptq", "block_size": 128},
    # 4-bit weight-only (MatMulNBits), blockwise: ORT's RTN, HQQ (Badri & Shaji 2023) and GPTQ.
    "w4-rtn": {"scheme": "nbits", "bits": 4, "weights": "rtn", "block_size": 32},
    "w4-hqq": {"scheme": "nbits", "bits": 4, "weights": "hqq", "block_size": 32},
    # w4-gptq is GPTQ as published (asymmetric groups of 128, act-order with static groups, damping
    # 0.01) with the LM head at 8 bits (head_bits' default): the best 4-bit g128 recipe measured
    # on SmolLM2-135M (docs/results.md#smollm2-135m-4-bit-g128-recipes-as-published).
    "w4-gptq": {"scheme": "nbits", "bits": 4, "weights": "gptq", "block_size": 128, "symmetric": False,
                "gptq_act_order": True},
    # AWQ (Lin et al. 2024): per-input-channel scales s = mean|X|^a, a grid-searched per scaling
    # group on calibration activations to minimize the 4-bit output error, then the clipping
    # search; then RTN MatMulNBits.
    "w4-awq": {"scheme": "nbits", "bits": 4, "weights": "rtn", "block_size": 32, "awq": True},
    # Sparse MoE models only (tasks/causal_lm/moe_bits.py): a bit width per routed expert at a fixed
    # average (Chowdhury et al. 2026): experts whose gate row changed least in l2 norm during training,
    # and experts with a large max intra-neuron weight variance, get the wider width. ``bits`` is the
    # width of every other MatMul (attention, shared expert, LM head); the gates stay FP.
    "moe-expert-bits": {"scheme": "nbits", "bits": 4, "weights": "gptq", "block_size": 32, "moe_bits": 5.0,
                        "moe_widths": [4, 8], "moe_allocation": "combined"},
}

# The experts of a recipe that lists none.
DEFAULT_EXPERTS = ("w8a8-rtn", "w8a8-smoothquant-0.5", "w4-rtn", "w4-hqq")
