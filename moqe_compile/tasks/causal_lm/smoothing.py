"""SmoothQuant and AWQ-style scaling of a Llama-style decoder's torch weights, before export.

Ours: ORT's SmoothQuant needs the full neural-compressor package and its AWQ needs NVIDIA
modelopt. Both rescale the FP weights around each RMSNorm, so the exported graph is the same
function in FP and only the quantizer sees different weight/activation ranges.
"""

from __future__ import annotations

import copy

import numpy as np

from moqe_compile.errors import BuildError
from moqe_compile.quantize.nbits import rtn_blockwise


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


def awq(model, calib_ids: np.ndarray, bits: int, block: int, symmetric: bool, grid: int = 10,
        keep_tokens: int = 2048):
    """AWQ-style activation-aware scaling (Lin et al., 2024, sec. 3.2): per norm->linears group,
    s = mean|X|^a normalized, a on a grid in [0, 1), chosen to minimize || X W^T - (X/s) Q(W s)^T ||^2
    on calibration rows. Simplification (docs/language-models.md): inputs come from the FP model,
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
                err = float(((x / s) @ rtn_blockwise(w * s, bits, block, symmetric).T - ref).pow(2).mean())
                if err < best[0]:
                    best = (err, float(a), s)
            _fold(norm, linears, best[2])
            chosen.append(best[1])
    model._moqe_awq_alphas = chosen  # noqa: SLF001 - recorded in the manifest by the caller
    return model
