"""SmoothQuant and AWQ scaling (and AWQ's clipping) of a Llama-style decoder's torch weights, before export.

Ours: ORT's SmoothQuant needs the full neural-compressor package and its AWQ needs NVIDIA
modelopt. Both rescale the FP weights around each RMSNorm, so the exported graph is the same
function in FP and only the quantizer sees different weight/activation ranges.
"""

from __future__ import annotations

import copy

import numpy as np

from moqe_compile.errors import BuildError
from moqe_compile.quantize.nbits import rtn_blockwise
from moqe_compile.tasks.causal_lm.config import SMOOTHQUANT_GROUPS


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


def smoothquant(model, calib_ids: np.ndarray, alpha: float, groups: str = "norms"):
    """SmoothQuant (Xiao et al., 2023, eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).
    ``groups``: ``"norms"`` smooths the inputs of the linears after each RMSNorm (q/k/v,
    gate/up: the paper's choice for Llama-style models); ``"all"`` also o_proj's input through
    v_proj (where one-to-one) and down_proj's through up_proj: AWQ's groups."""
    import torch

    model = copy.deepcopy(model)
    if groups not in SMOOTHQUANT_GROUPS:
        raise BuildError(f"smoothquant groups {groups!r} is not one of {list(SMOOTHQUANT_GROUPS)}.")
    groups = _norm_groups(model) if groups == "norms" else _awq_groups(model)
    stats = _collect_inputs(model, calib_ids, groups, 0)
    with torch.no_grad():
        for (norm, linears), st in zip(groups, stats):
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = (st["max"].clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
            _fold_into(norm, linears, s)
    return model


def _awq_groups(model):
    """AWQ's scaling groups per decoder layer (AutoAWQ's Llama layout): input_layernorm -> q/k/v,
    v -> o (only when v's outputs are o's inputs one to one: with grouped-query attention a v
    channel feeds several heads, and AutoAWQ skips the pair too), post_attention_layernorm ->
    gate/up, up -> down (down reads act(gate) * up, linear in up)."""
    _norm_groups(model)  # the same layout check and message
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out.append((layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]))
        if a.v_proj.weight.shape == a.o_proj.weight.shape:
            out.append((a.v_proj, [a.o_proj]))
        out.append((layer.post_attention_layernorm, [m.gate_proj, m.up_proj]))
        out.append((m.up_proj, [m.down_proj]))
    return out


def _fold_into(prev, linears, s) -> None:
    """x' = x / s in what writes the input (a norm's weight, or a linear's output rows), W' = W * s."""
    if hasattr(prev, "in_features"):  # a linear: its output channels are the next input's channels
        prev.weight.data /= s[:, None]
        if prev.bias is not None:
            prev.bias.data /= s
    else:
        prev.weight.data /= s
    for lin in linears:
        lin.weight.data *= s[None, :]


def _best_clip(w, x, bits: int, block: int, symmetric: bool, steps: int = 20, shrink: float = 0.5):
    """AWQ's clipping search (Lin et al. 2024; AutoAWQ ``_compute_best_clip``): per output channel
    and group, the largest |w| kept, max|w| * r with r on ``steps`` points in [1 - shrink, 1],
    that minimizes the group's squared output error on the input rows ``x`` after quantization."""
    import torch
    import torch.nn.functional as F

    out_f, in_f = w.shape
    pad = (-in_f) % block
    wg = F.pad(w, (0, pad)).reshape(out_f, -1, block)
    xg = F.pad(x, (0, pad)).reshape(len(x), -1, block)
    ref = torch.einsum("ngk,ogk->nog", xg, wg)
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full(amax.shape[:2], float("inf"))
    best = amax.clone()
    for i in range(steps):
        mx = amax * (1 - shrink * i / steps)
        q = rtn_blockwise(torch.clamp(wg, -mx, mx).reshape(out_f, -1), bits, block, symmetric).reshape(wg.shape)
        err = (torch.einsum("ngk,ogk->nog", xg, q) - ref).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], mx, best)
    return torch.clamp(wg, -best, best).reshape(out_f, -1)[:, :in_f]


def awq(model, calib_ids: np.ndarray, bits: int, block: int, symmetric: bool, grid: int = 10,
        keep_tokens: int = 2048, clip: bool = True, clip_tokens: int = 512):
    """AWQ (Lin et al., 2024, sec. 3.2, and AutoAWQ's search): per scaling group (:func:`_awq_groups`),
    s = mean|X|^a normalized, a on a grid in [0, 1), chosen to minimize || X W^T - (X/s) Q(W s)^T ||^2
    on calibration rows and folded into what writes X; then (``clip``) each linear's weights but
    q/k's are clipped per output channel and group by :func:`_best_clip` on its (scaled) inputs.
    Input rows come from the FP model in one pass: the scaling keeps the FP function, so they are
    the scaled model's too (up to the scale, applied here); the clipping changes it a little,
    which AutoAWQ's layer-by-layer pass would carry into the next layer's inputs and this does not."""
    import torch

    model = copy.deepcopy(model)
    groups = _awq_groups(model)
    stats = _collect_inputs(model, calib_ids, groups, keep_tokens)
    chosen, rows = [], []
    with torch.no_grad():
        for (prev, linears), st in zip(groups, stats):
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
            _fold_into(prev, linears, best[2])
            chosen.append(best[1])
            rows.append((linears, x[:clip_tokens] / best[2]))
        if clip:
            # AutoAWQ leaves q/k unclipped: the attention scores are sensitive to them.
            qk = {id(m) for lay in model.model.layers for m in (lay.self_attn.q_proj, lay.self_attn.k_proj)}
            for linears, x in rows:
                for lin in linears:
                    if id(lin) not in qk:
                        lin.weight.data = _best_clip(lin.weight.data, x, bits, block, symmetric)
    model._moqe_awq_alphas = chosen  # noqa: SLF001 - recorded in the manifest by the caller
    return model


def rescale_for(recipe, model, calib_ids: np.ndarray):
    """The torch model ``recipe`` quantizes: SmoothQuant's or AWQ's rescaling of ``model`` (a
    copy) when the recipe asks for one, else ``model`` itself."""
    if recipe.smoothquant_alpha:
        return smoothquant(model, calib_ids, recipe.smoothquant_alpha, recipe.smoothquant_groups)
    if recipe.awq:
        return awq(model, calib_ids, recipe.bits, recipe.block_size, recipe.symmetric, recipe.awq_grid)
    return model
