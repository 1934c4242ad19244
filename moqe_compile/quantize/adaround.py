"""AdaRound-style learned weight rounding (Nagel et al., 2020), ours: no maintained library
does it on ONNX graphs. Per layer, each weight rounds down or up as learned by a rectified
sigmoid h(V), minimizing the layer's output error on calibration inputs plus a regularizer
that anneals h toward 0/1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ZETA, GAMMA = 1.1, -0.1


def h(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid: the soft rounding offset in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def layer_fn(op: str, attrs: dict, in_shape: tuple):
    if op == "Gemm":
        return F.linear
    strides = tuple(attrs.get("strides", [1, 1]))
    dil = tuple(attrs.get("dilations", [1, 1]))
    group = int(attrs.get("group", 1))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("auto_pad convolutions are not supported by AdaRound here")
    # ONNX pads = [top, left, bottom, right]; F.pad wants (left, right, top, bottom).
    sym = pads[0] == pads[2] and pads[1] == pads[3]

    def conv(x, w, b):
        if sym:
            return F.conv2d(x, w, b, strides, (pads[0], pads[1]), dil, group)
        return F.conv2d(F.pad(x, (pads[1], pads[3], pads[0], pads[2])), w, b, strides, 0, dil, group)

    return conv


def init_v(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(w / s), V) with h(V) equal to the rounding remainder, so the soft weights start
    at the FP weights."""
    floor = torch.floor(w / s)
    rest = ((w / s - floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return floor, torch.log(rest / (1 - rest))


def anneal(it: int, iters: int, warmup: float = 0.2) -> float | None:
    """AdaRound's regularizer exponent beta at step ``it``: none during the warm-up, then 20 -> 2."""
    t = it / max(1, iters - 1)
    return None if t < warmup else 20 - 18 * (t - warmup) / (1 - warmup)


def round_reg(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Sum of 1 - |2 h(V) - 1|^beta: zero once every weight is rounded fully down or up."""
    return (1 - (2 * h(v) - 1).abs().pow(beta)).sum()


def adaround_layer(op: str, attrs: dict, w: np.ndarray, b: np.ndarray | None, scale: np.ndarray, qmax: int,
                   x: np.ndarray, iters: int = 300, lr: float = 1e-2, reg: float = 0.01, batch: int = 16,
                   seed: int = 0) -> np.ndarray:
    """Integer weights (int32 array, shape of ``w``) with learned rounding."""
    g = torch.Generator().manual_seed(seed)
    W = torch.from_numpy(w.astype(np.float32))
    B = torch.from_numpy(b.astype(np.float32)) if b is not None else None
    S = torch.from_numpy(scale.astype(np.float32)).reshape(-1, *([1] * (w.ndim - 1)))
    X = torch.from_numpy(x.astype(np.float32))
    fn = layer_fn(op, attrs, tuple(x.shape))
    floor, V = init_v(W, S)
    V = V.clone().requires_grad_(True)
    opt = torch.optim.Adam([V], lr=lr)
    lo = -qmax - 1
    with torch.no_grad():
        target_all = fn(X, W, B)
    for it in range(iters):
        idx = torch.randint(0, len(X), (min(batch, len(X)),), generator=g)
        wq = torch.clamp(floor + h(V), lo, qmax) * S
        out = fn(X[idx], wq, B)
        rec = F.mse_loss(out, target_all[idx])
        # beta anneals 20 -> 2 after a 20% warm-up without the rounding regularizer.
        beta = anneal(it, iters)
        regl = round_reg(V, beta) if beta is not None else torch.zeros(())
        loss = rec + reg * regl / V.numel() * 100
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = torch.clamp(floor + (h(V) >= 0.5).float(), lo, qmax)
    return q.numpy().astype(np.int32)
