"""Language-model experts: FP decoder (torch + ONNX) -> one quantized ONNX decoder per recipe.

Where the work is done:
- ``w8a8-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 per-channel weights,
  activations quantized per tensor at run time). On ORT CPU this runs as MatMulInteger /
  DynamicQuantizeMatMul / MatMulIntegerToFloat. Dynamic rather than static Q/DQ because LM
  activation ranges vary per sequence; per-tensor scales also mean a score depends on what
  else is in the batch, so experts are scored one sequence at a time (score_lm.py).
- ``nbits``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, ORT's
  own offline RTN (its DEFAULT blockwise quantizer), HQQ and, as ``gptq-ort``, its GPTQ (vendored
  neural-compressor code, fed our calibration windows) -> MatMulNBits, float activations.
  ``gptq`` is ours (quantize/lm_gptq.py): ORT's runs the model once per MatMul input (hours here).
- SmoothQuant and AWQ are *ours* (ORT's SmoothQuant needs the full neural-compressor package,
  its AWQ needs NVIDIA modelopt; neither installs here): both rescale the FP torch weights
  around each RMSNorm before export, so the exported graph is the same function in FP and
  only the quantizer sees different weight/activation ranges.

The embedding Gather is never quantized (the router reads the FP embeddings).
Every expert's ORT-optimized graph is checked: no float MatMul may keep a constant weight
(except the LM head when ``quantize_lm_head = false``).
"""

from __future__ import annotations

import collections
import copy
import tempfile
from pathlib import Path

import numpy as np

from moqe_compile.errors import BuildError
from moqe_compile.tasks.causal_lm.config import LMExpertRecipe

INTEGER_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QGemm",
                   "QLinearMatMul")
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm")


# ---------------------------------------------------------------- torch-side transforms

def _norm_groups(model):
    """(RMSNorm, [linears reading its output]) per decoder layer, Llama/Qwen2/Mistral layout."""
    try:
        layers = model.model.layers
        groups = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            groups.append((layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]))
            groups.append((layer.post_attention_layernorm, [m.gate_proj, m.up_proj]))
    except AttributeError as e:
        raise BuildError(f"SmoothQuant/AWQ know the Llama-style layout (model.layers[i].input_layernorm, "
                         f"self_attn.q/k/v_proj, mlp.gate/up_proj); this model differs: {e}.") from e
    return groups


def _collect_inputs(model, calib_ids: np.ndarray, groups, keep_tokens: int):
    """Per group: per-channel max |x|, mean |x| and up to ``keep_tokens`` input rows (for AWQ)."""
    import torch

    stats = [{"max": None, "sum": None, "n": 0, "rows": []} for _ in groups]
    hooks = []

    def hook(i):
        def f(_mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            s = stats[i]
            amax, asum = x.abs().amax(0), x.abs().sum(0)
            s["max"] = amax if s["max"] is None else torch.maximum(s["max"], amax)
            s["sum"] = asum if s["sum"] is None else s["sum"] + asum
            s["n"] += len(x)
            have = sum(len(r) for r in s["rows"])
            if have < keep_tokens:
                s["rows"].append(x[: keep_tokens - have].clone())
        return f

    for i, (_, linears) in enumerate(groups):
        hooks.append(linears[0].register_forward_pre_hook(hook(i)))
    try:
        with torch.no_grad():
            for row in calib_ids:
                model(input_ids=torch.from_numpy(row[None]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _fold(norm, linears, s) -> None:
    """x' = x / s inside the norm's weight, W' = W * s on the input channels: same function."""
    norm.weight.data /= s
    for lin in linears:
        lin.weight.data *= s[None, :]


def smoothquant(model, calib_ids: np.ndarray, alpha: float):
    """SmoothQuant (Xiao et al., 2023, eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    import torch

    model = copy.deepcopy(model)
    groups = _norm_groups(model)
    stats = _collect_inputs(model, calib_ids, groups, 0)
    with torch.no_grad():
        for (norm, linears), st in zip(groups, stats):
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = (st["max"].clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
            _fold(norm, linears, s)
    return model


def _rtn_blockwise(w, bits: int, block: int, symmetric: bool):
    """Fake-quantize (out, in) weights in blocks of ``block`` input channels (MatMulNBits' layout)."""
    out_f, in_f = w.shape
    pad = (-in_f) % block
    wp = torch_pad(w, pad).reshape(out_f, -1, block)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = wp.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
        q = (wp / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        lo, hi = wp.amin(-1, keepdim=True), wp.amax(-1, keepdim=True)
        scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
        zp = (-lo / scale).round()
        q = ((wp / scale).round() + zp).clamp(0, 2**bits - 1)
        q = (q - zp) * scale
    return q.reshape(out_f, -1)[:, :in_f]


def torch_pad(w, pad: int):
    import torch.nn.functional as F

    return F.pad(w, (0, pad)) if pad else w


def awq(model, calib_ids: np.ndarray, bits: int, block: int, symmetric: bool, grid: int = 10,
        keep_tokens: int = 2048):
    """AWQ-style activation-aware scaling (Lin et al., 2024, sec. 3.2): per norm->linears group,
    s = mean|X|^a normalized, a on a grid in [0, 1), chosen to minimize || X W^T - (X/s) Q(W s)^T ||^2
    on calibration rows. Simplification (noted in the README): inputs come from the FP model,
    not from the already-scaled preceding layers, and the v->o / up->down pairs are not scaled."""
    import torch

    model = copy.deepcopy(model)
    groups = _norm_groups(model)
    stats = _collect_inputs(model, calib_ids, groups, keep_tokens)
    chosen = []
    with torch.no_grad():
        for (norm, linears), st in zip(groups, stats):
            x = torch.cat(st["rows"])
            mean = (st["sum"] / st["n"]).clamp_min(1e-6)
            w = torch.cat([lin.weight for lin in linears])  # (sum out, in)
            ref = x @ w.T
            best = (float("inf"), 0.0, torch.ones_like(mean))
            for a in np.arange(grid) / grid:
                s = mean ** float(a)
                s = s / (s.max() * s.min()).sqrt()
                err = float(((x / s) @ _rtn_blockwise(w * s, bits, block, symmetric).T - ref).pow(2).mean())
                if err < best[0]:
                    best = (err, float(a), s)
            _fold(norm, linears, best[2])
            chosen.append(best[1])
    model._moqe_awq_alphas = chosen  # noqa: SLF001 - recorded in the manifest by the caller
    return model


# ---------------------------------------------------------------- ONNX-side quantization

def lm_head_node(model_path: Path) -> str | None:
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    return next((n.name for n in g.node if "logits" in n.output and n.op_type in FLOAT_MATMULS), None)


class _CalibReader:
    """CalibrationDataReader protocol over scoring feeds (empty past)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self):
        self.i = 0


def quantize_onnx(fp_onnx: Path, recipe: LMExpertRecipe, out: Path, calib_feeds: list[dict],
                  exclude_nodes=()) -> None:
    """``exclude_nodes``: MatMul node names left in float (an MoE model's gates, models/moe.py)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    head = lm_head_node(fp_onnx)
    exclude = [head] if head and not recipe.quantize_lm_head else []
    exclude += [n for n in exclude_nodes if n not in exclude]
    if recipe.scheme == "w8a8-dynamic":
        quantize_dynamic(str(fp_onnx), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if recipe.weights == "gptq":  # ours: one calibration pass for all Hessians (quantize/lm_gptq.py)
        from moqe_compile.quantize.lm_gptq import gptq_onnx

        gptq_onnx(fp_onnx, out, calib_feeds, recipe.bits, recipe.block_size, recipe.gptq_damp, set(exclude),
                  symmetric=recipe.symmetric)
        return
    if recipe.weights == "rtn":
        algo = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                                            bits=recipe.bits)
    elif recipe.weights == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=recipe.bits)
    else:
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=_CalibReader(calib_feeds),
                                         percdamp=recipe.gptq_damp, block_size=128)
    q = MatMulNBitsQuantizer(onnx.load(str(fp_onnx)), bits=recipe.bits, block_size=recipe.block_size,
                             is_symmetric=recipe.symmetric, nodes_to_exclude=exclude, algo_config=algo)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


def check_kernels(path: Path, allow_fp_head: bool = False, allow_fp=()) -> dict:
    """ORT-optimize the expert (as the runtime will) and count its kernels; a float MatMul/Gemm
    left with a constant weight means a layer silently stayed FP. ``allow_fp``: node names
    meant to stay float (an MoE model's gates), listed as ``float_by_design``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="moqe-lm-check-") as tmp:
        opt = Path(tmp) / "opt.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        g = onnx.load(str(opt)).graph
    inits = {i.name for i in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    float_w = [n.name for n in g.node if n.op_type in FLOAT_MATMULS and len(n.input) > 1 and n.input[1] in inits
               and not (allow_fp_head and "logits" in n.output)]
    by_design = [n for n in float_w if n in set(allow_fp)]
    float_w = [n for n in float_w if n not in set(allow_fp)]
    kernels = {k: ops[k] for k in INTEGER_KERNELS if ops[k]}
    # MatMulNBits with float zero points (ORT's HQQ writes them) misses MLAS' fast 4-bit path:
    # measured here 0.7 vs 13 tokens/s decoding SmolLM2-135M. Recorded so the report can say so.
    init_type = {i.name: i.data_type for i in g.initializer}
    slow = sum(1 for n in g.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]
               and init_type.get(n.input[3]) == 1)
    out = {"ok": not float_w and bool(kernels), "kernels": kernels, "float_weight_matmuls": float_w,
           "embedding_gathers": ops["Gather"], "matmulnbits_float_zero_points": slow}
    if allow_fp:
        out["float_by_design"] = by_design
    return out
