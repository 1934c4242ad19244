"""GPTQ-style error-feedback weight rounding (Frantar et al., 2023) for Conv/Gemm layers of a
Q/DQ CNN, ours: the GPTQ implementations that exist (AutoGPTQ, GPTQModel, llm-compressor,
ORT's ``matmul_nbits_quantizer``) target transformer Linear/MatMul weights with their own
group-wise scales and 4-bit packed kernels; none rounds Conv weights under fixed per-channel
scales that ORT's Q/DQ insertion must reproduce exactly. Here the scales are fixed beforehand
(the MSE clip) and only the integers change, so the result stays an ordinary Q/DQ graph.

For a layer y = W x, GPTQ quantizes W column by column (input features, Conv weights as
im2col rows) and pushes each column's rounding error onto the not-yet-quantized columns,
weighted by the inverse Hessian of the layer's squared output error, H = X^T X over the
layer's inputs on calibration data. X is the *quantized* stream (the layer's input in the
partially quantized graph), so the rounding compensates for the errors upstream too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moqe_compile.errors import BuildError


def _conv_geometry(attrs: dict) -> tuple[tuple, tuple, list, int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise BuildError("auto_pad convolutions are not supported by GPTQ here; export with explicit pads.")
    strides = tuple(attrs.get("strides", [1, 1]))
    dil = tuple(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    return strides, dil, pads, int(attrs.get("group", 1))


class Hessian:
    """Accumulates H_g = sum over rows of x_g x_g^T per group g (float64), batch by batch."""

    def __init__(self, op: str, attrs: dict, w_shape: tuple):
        self.op, self.attrs = op, attrs
        if op == "Gemm":
            self.groups, self.cols = 1, int(w_shape[1])
        else:
            if len(w_shape) != 4:
                raise BuildError(f"GPTQ supports 2-D convolutions only; weight shape {tuple(w_shape)}.")
            _, _, _, self.groups = _conv_geometry(attrs)
            self.cols = int(np.prod(w_shape[1:]))  # (C_in / group) * kh * kw, channel-major as F.unfold
        self.kernel = tuple(w_shape[2:]) if op == "Conv" else None
        self.H = torch.zeros(self.groups, self.cols, self.cols, dtype=torch.float64)
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.op == "Gemm":
            rows = X.reshape(len(X), -1)[:, None, :]  # (R, 1, cols)
        else:
            strides, dil, pads, _ = _conv_geometry(self.attrs)
            # ONNX pads = [top, left, bottom, right]; F.pad wants (left, right, top, bottom).
            X = F.pad(X, (pads[1], pads[3], pads[0], pads[2]))
            cols = F.unfold(X, self.kernel, dilation=dil, stride=strides)  # (N, C_in*kh*kw, L)
            n, _, L = cols.shape
            rows = cols.reshape(n, self.groups, self.cols, L).permute(0, 3, 1, 2).reshape(n * L, self.groups, self.cols)
        # float32 products within a batch (a few 10k rows), float64 accumulation across batches.
        r = rows.permute(1, 0, 2).contiguous()  # (G, R, cols)
        self.H += torch.bmm(r.transpose(1, 2), r).to(torch.float64)
        self.rows += len(r)


def gptq_round(w: np.ndarray, scale: np.ndarray, qmax: int, hessian: Hessian, damp: float = 0.01,
               act_order: bool = True) -> np.ndarray:
    """Integer weights (int32, shape of ``w``) on the fixed per-output-channel ``scale`` grid.

    ``damp`` adds damp * mean(diag H) to the diagonal (H is singular wherever inputs are
    collinear or dead); ``act_order`` quantizes the columns with the largest diagonal first,
    so their errors are the ones spread over the most remaining columns.
    """
    if hessian.rows == 0:
        raise BuildError("GPTQ got no calibration rows for a layer (empty calibration data?).")
    lo = -qmax - 1 if qmax != 63 else -64
    G, k = hessian.groups, hessian.cols
    m = w.shape[0] // G
    W = torch.from_numpy(w.reshape(G, m, k).astype(np.float64))  # (G, m, k)
    S = torch.from_numpy(scale.astype(np.float64)).reshape(G, m)
    H = hessian.H.clone() / hessian.rows
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0  # inputs that are always 0 (e.g. after ReLU): their weights never matter
    H[dead.unsqueeze(-1) & torch.eye(k, dtype=torch.bool)] = 1.0
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)  # (G, k)
    else:
        perm = torch.arange(k).expand(G, k)
    W = torch.gather(W, 2, perm[:, None, :].expand(G, m, k)).clone()
    H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(G, k, k)), 2, perm[:, None, :].expand(G, k, k))
    mean_diag = torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)
    H = H + (damp * mean_diag)[:, None, None] * torch.eye(k, dtype=torch.float64)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
        raise BuildError(f"GPTQ: the layer Hessian is not positive definite even with damp = {damp}: {e}") from e
    Q = torch.zeros_like(W)
    for i in range(k):
        col = W[:, :, i]
        q = torch.clamp(torch.round(col / S), lo, qmax)
        Q[:, :, i] = q
        err = (col - q * S) / Hinv[:, i, i][:, None]  # (G, m)
        W[:, :, i:] -= err[:, :, None] * Hinv[:, None, i, i:]
    inv = torch.argsort(perm, dim=1)
    Q = torch.gather(Q, 2, inv[:, None, :].expand(G, m, k))
    return Q.reshape(w.shape).numpy().astype(np.int32)


def row_errors(w: np.ndarray, q: np.ndarray, scale: np.ndarray, hessian: Hessian) -> np.ndarray:
    """Per output channel, the layer's output squared error (w - s q) H (w - s q)^T / rows."""
    G, k = hessian.groups, hessian.cols
    m = w.shape[0] // G
    E = torch.from_numpy((w.reshape(w.shape[0], -1).astype(np.float64)
                          - q.reshape(q.shape[0], -1) * scale.astype(np.float64)[:, None]).reshape(G, m, k))
    return torch.einsum("gmk,gkl,gml->gm", E, hessian.H / hessian.rows, E).reshape(-1).numpy()


def gptq_clip_search(w: np.ndarray, qmax: int, hessian: Hessian, candidates: list[np.ndarray],
                     damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(integers, per-channel scales): for every output channel, the candidate scale whose GPTQ
    rounding gives that channel the lowest output squared error on the calibration inputs.

    Output channels are independent in GPTQ (error feedback runs along a row), so one GPTQ
    pass per candidate scores every channel at once. Choosing the clip by the *weight* MSE
    ignores that GPTQ's error feedback cannot compensate a clipped (saturated) weight; this
    chooses it by what GPTQ minimizes (measured on Fashion-MNIST W4A8: README, issue 10)."""
    best_err = best_q = best_s = None
    for s in candidates:
        q = gptq_round(w, s, qmax, hessian, damp)
        err = row_errors(w, q, s, hessian)
        if best_err is None:
            best_err, best_q, best_s = err, q.copy(), s.astype(np.float32).copy()
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q[better] = q[better]
        best_s[better] = s[better]
    return best_q, best_s
