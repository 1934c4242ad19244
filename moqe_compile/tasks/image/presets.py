"""Named image expert and router presets (recipes as data).

A recipe's ``[[experts]]`` entry may name an expert preset with ``preset = ...`` and override
any of its fields; ``[router] preset`` names a router architecture the same way.
``PRESETS_VERSION`` goes up whenever a preset's meaning changes.
"""

from __future__ import annotations

from typing import Any

PRESETS_VERSION = 4

# The strongest single expert (docs/design.md#the-strongest-expert): MSE weight clip, GPTQ
# rounding on the quantized stream, activation ranges refitted layer by layer on that stream,
# sequential bias correction. Every report measures it against FP, and routing must beat it.
# The clip is MSE-optimal in the layer's output, chosen jointly with GPTQ ("mse-output"); it
# was chosen on router_val over the weight-MSE clip (docs/results.md#the-strongest-single-expert-ablation).
STRONGEST = {"calibration": "mse", "weight_clip": "mse-output", "weight_rounding": "gptq",
             "sequential_activations": True, "bias_correction": True}
STRONGEST_PRESETS = ("strongest", "w4a8-strongest")

EXPERT_PRESETS: dict[str, dict[str, Any]] = {
    "minmax-tensor": {"calibration": "minmax", "per_channel": False},
    "minmax": {"calibration": "minmax"},
    "percentile-99.9": {"calibration": "percentile", "percentile": 99.9},
    "percentile-99.999": {"calibration": "percentile", "percentile": 99.999},
    "entropy": {"calibration": "entropy", "num_bins": 2048},
    "mse": {"calibration": "mse", "weight_clip": "mse"},
    "mse-bc": {"calibration": "mse", "weight_clip": "mse", "bias_correction": True},
    "cle-minmax": {"calibration": "minmax", "equalization": True},
    "adaround": {"calibration": "mse", "weight_clip": "mse", "weight_rounding": "adaround"},
    "w4a8-minmax": {"calibration": "minmax", "weight_bits": 4},
    "w4a8-mse": {"calibration": "mse", "weight_bits": 4, "weight_clip": "mse"},
    "w4a8-mse-bc": {"calibration": "mse", "weight_bits": 4, "weight_clip": "mse", "bias_correction": True},
    "w4a8-adaround": {"calibration": "mse", "weight_bits": 4, "weight_clip": "mse", "weight_rounding": "adaround",
                      "bias_correction": True},
    # Block reconstruction (BRECQ) on the quantized stream, first and last layer at 8 bits (the
    # convention of the published W4A8 post-training results): docs/design.md#block-reconstruction.
    "w4a8-brecq": {"calibration": "mse", "weight_bits": 4, "weight_clip": "mse", "weight_rounding": "brecq",
                   "sequential_activations": True, "high_precision_ends": True},
    "strongest": dict(STRONGEST),
    "w4a8-strongest": {**STRONGEST, "weight_bits": 4},
}

# Router architectures (docs/design.md#routers). "paper": SE-ResNet-8 16/32/64 + 8x8 attention
# over the image average-pooled to 32 px, the source paper's shape; "small": 16 px subsampled,
# 8/16/32, no squeeze-excite, 1x32 attention; "tiny": "small" without the attention block (12
# of the 30 nodes ONNX Runtime runs), because each node costs a few microseconds more when the
# router runs right after an expert with cold caches, as it does in service. "default" is
# "tiny" (presets version 4; "small" in version 3, "paper" before): 3.6% of one MobileNetV2
# INT8 expert at batch 1 where "small" took 4.7-6.2%, routing router_val no worse
# (docs/results.md#the-default-router).
PAPER_ROUTER = {"arch": "se-resnet8-attn", "input_size": 32, "downsample": "avgpool", "channels": [16, 32, 64],
                "se": [True, True, True], "heads": 8, "head_dim": 8, "quantize": "none"}
SMALL_ROUTER = {"arch": "se-resnet8-attn", "input_size": 16, "downsample": "subsample", "channels": [8, 16, 32],
                "se": [False, False, False], "heads": 1, "head_dim": 32, "quantize": "none"}
TINY_ROUTER = {**SMALL_ROUTER, "arch": "se-resnet8", "heads": 0, "head_dim": 0}
ROUTER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(PAPER_ROUTER),
    "small": dict(SMALL_ROUTER),
    "default": dict(TINY_ROUTER),
    "compact": {**SMALL_ROUTER, "channels": [16, 32, 64], "head_dim": 64},
    "tiny": dict(TINY_ROUTER),
}
