"""GPTQ error-feedback weight rounding (Frantar et al., 2023): one core, two front ends.

For a layer y = W x, GPTQ quantizes W column by column (input features) and pushes each
column's rounding error onto the not-yet-quantized columns, weighted by the inverse Hessian of
the layer's squared output error, H = X^T X over the layer's inputs on calibration data.
The core (:class:`Hessian`, :func:`gptq_quantize`) has one Hessian accumulation, one damping
rule and one column loop; the front ends differ only in the grid a column is rounded to:

- **Per output channel, fixed scales** (:func:`gptq_round`, :func:`gptq_clip_search`): Conv
  and Gemm weights of a Q/DQ CNN (Conv weights as im2col rows, one Hessian per conv group).
  The scales are fixed beforehand (the MSE clip) and only the integers change, so the result
  stays an ordinary Q/DQ graph that ORT's Q/DQ insertion reproduces exactly. The GPTQ
  libraries that exist (AutoGPTQ, GPTQModel, llm-compressor, ORT's ``matmul_nbits_quantizer``)
  target transformer MatMul weights with their own group-wise scales and packed kernels; none
  rounds Conv weights under fixed per-channel scales. X is the *quantized* stream (the
  layer's input in the partially quantized graph), so the rounding compensates for the errors
  upstream too (``sequential.py``).
- **Blockwise, scales fitted per group** (:func:`gptq_blockwise`, :func:`gptq_onnx`): the
  constant-weight MatMuls of an ONNX decoder, written as ``com.microsoft.MatMulNBits`` (ORT's
  layout: B uint8 [N, blocks, block_size * bits / 8], scales [N * blocks], default zero point
  2^(bits-1)). Each group of ``block_size`` input channels gets its scale from the
  error-updated weights when its first column comes up. Ours rather than ORT's
  ``GPTQWeightOnlyQuantConfig``, which runs the whole model over the calibration set once per
  distinct MatMul input: :func:`collect_hessians` gathers every MatMul input in *one* pass per
  calibration window (all added as graph outputs). The weights go straight into MatMulNBits
  nodes: ORT's RTN quantizer would recompute the scales and re-round the GPTQ weights.
  Hessians come from the FP model (as ORT's GPTQ does), not from the partially quantized one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moqe_compile.errors import BuildError

LAZY_COLUMNS = 32


# ---------------------------------------------------------------- Hessians

class Hessian:
    """Accumulates H_g = sum over rows of x_g x_g^T per group g in float64, batch by batch.

    Each batch's products are taken in the dtype of the rows it is given, so a caller can trade
    precision for memory within a batch; the sum across batches is always float64."""

    def __init__(self, cols: int, groups: int = 1):
        self.groups, self.cols = groups, cols
        self.H = torch.zeros(groups, cols, cols, dtype=torch.float64)
        self.rows = 0

    def add_rows(self, rows: torch.Tensor) -> None:
        """``rows``: (R, groups, cols)."""
        r = rows.permute(1, 0, 2).contiguous()  # (G, R, cols)
        self.H += torch.bmm(r.transpose(1, 2), r).to(torch.float64)
        self.rows += r.shape[1]

    def mean(self) -> torch.Tensor:
        """H / rows, (groups, cols, cols)."""
        if self.rows == 0:
            raise BuildError("GPTQ got no calibration rows for a layer (empty calibration data?).")
        return self.H / self.rows


def _conv_geometry(attrs: dict) -> tuple[tuple, tuple, list, int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise BuildError("auto_pad convolutions are not supported by GPTQ here; export with explicit pads.")
    strides = tuple(attrs.get("strides", [1, 1]))
    dil = tuple(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    return strides, dil, pads, int(attrs.get("group", 1))


class LayerHessian(Hessian):
    """The Hessian of a Conv (im2col rows, one per conv group) or Gemm (transB) layer's input."""

    def __init__(self, op: str, attrs: dict, w_shape: tuple):
        self.op, self.attrs = op, attrs
        if op == "Gemm":
            super().__init__(int(w_shape[1]))
            self.kernel = None
            return
        if len(w_shape) != 4:
            raise BuildError(f"GPTQ supports 2-D convolutions only; weight shape {tuple(w_shape)}.")
        _, _, _, groups = _conv_geometry(attrs)
        super().__init__(int(np.prod(w_shape[1:])), groups)  # (C_in / group) * kh * kw, channel-major as F.unfold
        self.kernel = tuple(w_shape[2:])

    def add(self, x: np.ndarray) -> None:
        # float32 products within a batch (a few 10k im2col rows); float64 across batches.
        X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.op == "Gemm":
            self.add_rows(X.reshape(len(X), -1)[:, None, :])
            return
        strides, dil, pads, _ = _conv_geometry(self.attrs)
        if self.kernel == (1, 1) and set(strides) == {1} and not any(pads):
            cols = X.reshape(X.shape[0], X.shape[1], -1)  # a pointwise conv's im2col is the input itself
        else:
            # ONNX pads = [top, left, bottom, right]; F.pad wants (left, right, top, bottom).
            X = F.pad(X, (pads[1], pads[3], pads[0], pads[2]))
            cols = F.unfold(X, self.kernel, dilation=dil, stride=strides)  # (N, C_in*kh*kw, L)
        n, _, L = cols.shape
        # Per sample and group, X_g X_g^T on the (cols, L) view: no (rows, groups, cols) copy.
        c = cols.reshape(n, self.groups, self.cols, L)
        self.H += torch.matmul(c, c.transpose(-1, -2)).to(torch.float64).sum(0)
        self.rows += n * L


# ---------------------------------------------------------------- grids

class ChannelGrid:
    """Fixed per-output-channel scales, codes in [-qmax - 1, qmax] (a Q/DQ int8 weight)."""

    group = None
    fits_scales = False

    def __init__(self, scale: torch.Tensor, qmax: int):
        self.s, self.z = scale, torch.zeros_like(scale)
        self.lo, self.hi = -qmax - 1, qmax

    def start(self, col: int, w: torch.Tensor) -> None:
        """Scales are fixed: nothing to fit."""

    def round(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized) of one column ``w`` (G, m) on the current scales."""
        q = torch.clamp(torch.round(w / self.s) + self.z, self.lo, self.hi)
        return q, (q - self.z) * self.s


class GroupGrid(ChannelGrid):
    """Scales (and zero points when asymmetric) fitted on each group of ``group`` input
    channels as its first column comes up, on the error-updated weights (MatMulNBits).

    Symmetric: codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = group absmax / that, no zero point.
    Asymmetric (the GPTQ paper's default): codes in [0, 2^b - 1] over the group's [min, max]
    (widened to include 0), zero point round(-min / scale); every level is used, so it fits
    skewed groups better."""

    fits_scales = True

    def __init__(self, bits: int, group: int, symmetric: bool, rows: tuple, cols: int, dtype):
        self.group, self.symmetric, self.qmax = group, symmetric, 2 ** (bits - 1) - 1
        self.lo, self.hi = (-self.qmax, self.qmax) if symmetric else (0, 2**bits - 1)
        self.s, self.z = torch.zeros(rows, dtype=dtype), torch.zeros(rows, dtype=dtype)
        self.S = torch.zeros(*rows, cols // group, dtype=dtype)
        self.Z = torch.zeros_like(self.S)

    def start(self, col: int, w: torch.Tensor) -> None:
        if self.symmetric:
            self.s = (w.abs().amax(-1) / self.qmax).clamp_min(1e-10)
        else:
            lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
            self.s = ((hi - lo) / self.hi).clamp_min(1e-10)
            self.z = torch.round(-lo / self.s)
        self.S[..., col // self.group], self.Z[..., col // self.group] = self.s, self.z

    def static(self, W: torch.Tensor, perm: torch.Tensor) -> "StaticGroups":
        """Fit every group once on ``W`` (G, m, k), in the original column order, and return a
        grid that rounds the columns in the order ``perm`` (G, k) with their own group's scale."""
        for col in range(0, W.shape[-1], self.group):
            self.start(col, W[:, :, col : col + self.group])
        return StaticGroups(self, perm)


class StaticGroups(ChannelGrid):
    """Act-order with group scales (GPTQ's "static groups", as in AutoGPTQ / GPTQModel): the
    columns run by decreasing Hessian diagonal, so a group's columns are scattered over the
    loop and its scale cannot be fitted when its first column comes up; it is fitted once on
    the original weights instead, and each column is rounded with its own group's scale.
    The error feedback still runs over every later column, across groups. ``group = 1``: the
    column loop calls ``start`` at every column, which selects that column's scales."""

    group = 1
    fits_scales = True

    def __init__(self, fitted: GroupGrid, perm: torch.Tensor):
        G, k = perm.shape
        idx = perm[:, None, :].expand(G, fitted.S.shape[-2], k)
        self.Sc = torch.gather(fitted.S.repeat_interleave(fitted.group, -1), 2, idx)
        self.Zc = torch.gather(fitted.Z.repeat_interleave(fitted.group, -1), 2, idx)
        self.lo, self.hi = fitted.lo, fitted.hi

    def start(self, col: int, w: torch.Tensor) -> None:
        self.s, self.z = self.Sc[..., col], self.Zc[..., col]


# ---------------------------------------------------------------- the core

def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, per group."""
    k = H.shape[-1]
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(dim=-1)
    H = H + (damp * mean_diag)[:, None, None] * torch.eye(k, dtype=H.dtype)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
        raise BuildError(f"GPTQ: the layer Hessian is not positive definite even with damping {damp}; raise "
                         f"gptq_damp or give more calibration data ({e}).") from e


def _columns(W: torch.Tensor, Hinv: torch.Tensor, grid, lazy: int) -> torch.Tensor:
    """The column loop on W (G, m, k), in lazy blocks: within a block each column's error
    updates the block's remaining columns, the columns after it get the block's errors at once."""
    G, m, k = W.shape
    if grid.group and grid.group % lazy and lazy % grid.group:
        lazy = grid.group  # a group must start at a block boundary or lie inside one block
    Q = torch.zeros(G, m, k, dtype=torch.int32)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, Err1, Hinv1 = W[:, :, i1:i2].clone(), torch.zeros(G, m, i2 - i1, dtype=W.dtype), Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grid.group and col % grid.group == 0:
                # At a block start W holds every update so far; W1 would cut a group longer than the block.
                grid.start(col, W[:, :, col : col + grid.group] if i == 0 else W1[:, :, i : i + grid.group])
            q, deq = grid.round(W1[:, :, i])
            Q[:, :, col] = q.to(torch.int32)
            err = (W1[:, :, i] - deq) / Hinv1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    return Q


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid, damp: float = 0.01, act_order: bool = False,
                  lazy: int = LAZY_COLUMNS) -> torch.Tensor:
    """Integer codes (int32, (G, m, k)) of weights W (G, m, k) under Hessians H (G, k, k) on ``grid``.

    Inputs that are always 0 on calibration data get a unit diagonal (H is singular there);
    their weights are zeroed when the grid fits its scales on the weights (they would only
    widen the grid), kept when the scales are fixed. ``damp`` adds damp * mean(diag H) to the
    diagonal. ``act_order`` quantizes the columns with the largest diagonal first, so their
    errors are the ones spread over the most remaining columns; a grid fitted per group then
    fits its groups once beforehand (:class:`StaticGroups`)."""
    # One torch thread: small LAPACK calls and many tiny per-column ops, where OpenMP threads
    # only add barrier waits, pathologically so on a loaded machine (docs/results.md#smollm2-135m-int8-and-int4).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _quantize(W.clone(), H.clone(), grid, damp, act_order, lazy)
    finally:
        torch.set_num_threads(threads)


def _quantize(W, H, grid, damp, act_order, lazy):
    G, m, k = W.shape
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0
    H[dead.unsqueeze(-1) & torch.eye(k, dtype=torch.bool)] = 1.0
    if grid.fits_scales:
        W[dead[:, None, :].expand(G, m, k)] = 0
    if not act_order:
        return _columns(W, _inverse_factor(H, damp), grid, lazy)
    perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)  # (G, k)
    if grid.fits_scales:
        grid = grid.static(W, perm)
    W = torch.gather(W, 2, perm[:, None, :].expand(G, m, k)).clone()
    H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(G, k, k)), 2, perm[:, None, :].expand(G, k, k))
    Q = _columns(W, _inverse_factor(H, damp), grid, lazy)
    return torch.gather(Q, 2, torch.argsort(perm, dim=1)[:, None, :].expand(G, m, k))


# ---------------------------------------------------------------- front end 1: per output channel (Q/DQ)

def gptq_round(w: np.ndarray, scale: np.ndarray, qmax: int, hessian: Hessian, damp: float = 0.01,
               act_order: bool = True) -> np.ndarray:
    """Integer weights (int32, shape of ``w``) on the fixed per-output-channel ``scale`` grid."""
    G, k = hessian.groups, hessian.cols
    m = w.shape[0] // G
    W = torch.from_numpy(w.reshape(G, m, k).astype(np.float64))
    grid = ChannelGrid(torch.from_numpy(scale.astype(np.float64)).reshape(G, m), qmax)
    Q = gptq_quantize(W, hessian.mean(), grid, damp, act_order)
    return Q.reshape(w.shape).numpy().astype(np.int32)


def row_errors(w: np.ndarray, q: np.ndarray, scale: np.ndarray, hessian: Hessian) -> np.ndarray:
    """Per output channel, the layer's output squared error (w - s q) H (w - s q)^T / rows."""
    G, k = hessian.groups, hessian.cols
    m = w.shape[0] // G
    E = torch.from_numpy((w.reshape(w.shape[0], -1).astype(np.float64)
                          - q.reshape(q.shape[0], -1) * scale.astype(np.float64)[:, None]).reshape(G, m, k))
    return torch.einsum("gmk,gkl,gml->gm", E, hessian.mean(), E).reshape(-1).numpy()


def gptq_clip_search(w: np.ndarray, qmax: int, hessian: Hessian, candidates: list[np.ndarray],
                     damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(integers, per-channel scales): for every output channel, the candidate scale whose GPTQ
    rounding gives that channel the lowest output squared error on the calibration inputs
    (the earliest candidate on a tie).

    Output channels are independent in GPTQ (error feedback runs along a row under the shared
    H^-1), so every candidate's rows go through *one* GPTQ pass, stacked: the same integers as
    one pass per candidate, with the per-column work done once (2-14x faster on MobileNetV2's
    layer shapes). Choosing the clip by the *weight* MSE ignores that GPTQ's error feedback
    cannot compensate a clipped (saturated) weight; this chooses it by what GPTQ minimizes."""
    G, k = hessian.groups, hessian.cols
    m, c = w.shape[0] // G, len(candidates)
    W = torch.from_numpy(w.reshape(G, m, k).astype(np.float64)).repeat(1, c, 1)  # rows: candidate-major
    S = torch.from_numpy(np.stack([s.astype(np.float64).reshape(G, m) for s in candidates], 1).reshape(G, c * m))
    Q = gptq_quantize(W, hessian.mean(), ChannelGrid(S, qmax), damp, act_order=True)
    Q = Q.reshape(G, c, m, k).permute(1, 0, 2, 3).reshape(c, *w.shape).numpy().astype(np.int32)
    errs = np.stack([row_errors(w, Q[i], candidates[i], hessian) for i in range(c)])
    best, rows = errs.argmin(0), np.arange(w.shape[0])
    scales = np.stack([s.astype(np.float32).reshape(-1) for s in candidates])
    return Q[best, rows], scales[best, rows].reshape(candidates[0].shape)


# ---------------------------------------------------------------- front end 2: blockwise (MatMulNBits)

def gptq_blockwise(w_out_in, H, bits: int, group: int, damp: float = 0.01, lazy: int = LAZY_COLUMNS,
                   symmetric: bool = True, act_order: bool = False):
    """GPTQ of W (N out, K in) given H (K, K), in float32: (integer codes int32 [N, K], scales
    [N, K // group], zero points int32 [N, K // group] or None). K must be a multiple of
    ``group`` (the caller pads). See :class:`GroupGrid` for the two grids, :class:`StaticGroups`
    for ``act_order``."""
    W = torch.as_tensor(np.array(w_out_in, dtype=np.float32))
    N, K = W.shape
    grid = GroupGrid(bits, group, symmetric, (1, N), K, torch.float32)
    Q = gptq_quantize(W[None], torch.as_tensor(np.array(H, dtype=np.float32))[None], grid, damp, act_order, lazy)
    zeros = None if symmetric else grid.Z[0].numpy().astype(np.int32)
    return Q[0].numpy(), grid.S[0].numpy(), zeros


def collect_hessians(fp_onnx: Path, feeds: list[dict], exclude: set[str] = frozenset(), progress=None) -> dict:
    """{activation name: (H float64 [K, K] = X^T X / tokens, tokens)} for every constant-weight
    MatMul input, from one run per feed with all of them added as graph outputs."""
    import onnx

    from moqe_compile.backends.onnxruntime_cpu import session
    from moqe_compile.quantize.nbits import const_matmuls

    model = onnx.load(str(fp_onnx))
    nodes, _ = const_matmuls(model, exclude)
    names = list(dict.fromkeys(n.input[0] for n in nodes))
    if not names:
        return {}
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(model.SerializeToString(), optimization="none", name="GPTQ Hessians")  # keep the named tensors
    del model
    hess: dict[str, Hessian] = {}
    for feed in feeds:
        for name, x in zip(names, sess.run(names, feed)):
            rows = torch.from_numpy(x.reshape(-1, x.shape[-1]).astype(np.float64))
            hess.setdefault(name, Hessian(rows.shape[-1])).add_rows(rows[:, None, :])
        if progress is not None:
            progress.update(1)
    return {k: (h.mean()[0].numpy(), h.rows) for k, h in hess.items()}


def matmul_sensitivity(fp_onnx: Path, feeds: list[dict], bits: int, group: int, symmetric: bool,
                       exclude: set[str] = frozenset()) -> dict[str, float]:
    """{MatMul node name: relative output error of its weight rounded to nearest at ``bits`` in
    groups of ``group``}: tr(E^T H E) / tr(W^T H W) with E the rounding error and H the
    Hessian of the node's input on ``feeds`` (one calibration pass for all nodes). A proxy for
    how much a MatMul loses at that width, used to rank which to keep at 8 bits: quantizing one
    MatMul at a time and scoring the model would take a pass over the windows per MatMul."""
    import onnx
    from onnx import numpy_helper

    from moqe_compile.quantize.nbits import const_matmuls, rtn_blockwise

    hess = collect_hessians(fp_onnx, feeds, exclude)
    nodes, inits = const_matmuls(onnx.load(str(fp_onnx)), exclude)
    out = {}
    for n in nodes:
        W = torch.from_numpy(numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))  # (K, N)
        E = (W - rtn_blockwise(W.T.contiguous(), bits, group, symmetric).T).double()
        H, Wd = torch.from_numpy(hess[n.input[0]][0]), W.double()
        out[n.name] = float(torch.einsum("kn,kl,ln->", E, H, E) / torch.einsum("kn,kl,ln->", Wd, H, Wd).clamp_min(1e-30))
    return out


def gptq_matrix(W: np.ndarray, H: np.ndarray, bits: int, group: int, damp: float, symmetric: bool,
                act_order: bool = False):
    """GPTQ of a MatMul weight W (K in, N out) under H (K, K): (codes [N, K'], scales, zero
    points or None, dequantized W (K, N)); K' = K padded to a multiple of ``group`` (padded
    input channels: zero weights and a unit Hessian, so no error to feed back)."""
    K, N = W.shape
    pad = (-K) % group
    if pad:
        W = np.pad(W, ((0, pad), (0, 0)))
        H = np.pad(H, ((0, pad), (0, pad)))
        H[K:, K:] = np.eye(pad)
    q, s, z = gptq_blockwise(W.T, H, bits, group, damp, symmetric=symmetric, act_order=act_order)
    zp = 0 if z is None else z[..., None]
    deq = ((q.reshape(N, -1, group) - zp) * s.reshape(N, -1, 1)).reshape(N, -1)[:, :K].T
    return q, s, z, np.ascontiguousarray(deq, dtype=np.float32)


def _matmulnbits_node(g, node, W: np.ndarray, H: np.ndarray, bits: int, group: int, damp: float, symmetric: bool,
                      act_order: bool = False, done=None):
    """A MatMulNBits node (and its initializers, added to ``g``) replacing MatMul ``node``;
    ``done``: its (codes, scales, zero points) already computed (true-sequential GPTQ)."""
    from onnx import helper, numpy_helper

    from moqe_compile.quantize.nbits import grid_doc, pack_nbits, storage_bits

    K, N = W.shape
    q, s, z = done[:3] if done is not None else gptq_matrix(W, H, bits, group, damp, symmetric, act_order)[:3]
    store = storage_bits(bits)
    B = pack_nbits(q.reshape(N, -1, group), store, unsigned=z is not None)
    bname, sname = f"{node.input[1]}_Q{bits}G{group}", f"{node.input[1]}_scales"
    g.initializer.extend([numpy_helper.from_array(B, bname),
                          numpy_helper.from_array(s.astype(np.float32).reshape(-1), sname)])
    inputs = [node.input[0], bname, sname]
    if z is not None:  # uint8 zero points, packed per output row like B (ORT's MatMulNBits layout)
        zname = f"{node.input[1]}_zero_points"
        g.initializer.append(numpy_helper.from_array(pack_nbits(z, store, unsigned=True).reshape(-1), zname))
        inputs.append(zname)
    return helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{bits}",
                            doc_string=grid_doc(bits) or None, domain="com.microsoft", K=K, N=N, bits=store,
                            block_size=group)


def gptq_onnx(fp_onnx: Path, out: Path, feeds: list[dict], bits: int, group: int, damp: float,
              exclude: set[str] = frozenset(), progress=None, symmetric: bool = True,
              node_bits: dict[str, int] | None = None, act_order: bool = False, done: dict | None = None,
              nearest: bool = False) -> dict:
    """Quantize every constant-weight MatMul of ``fp_onnx`` (but ``exclude``) with GPTQ into
    MatMulNBits, at ``bits`` (3, 4 or 8; 3 in 4-bit codes) or, for the nodes named in
    ``node_bits``, at their own width. ``done``: {node name: :func:`gptq_matrix` result}
    computed elsewhere (true-sequential GPTQ on the partly quantized model); the Hessians of
    the other nodes come from ``fp_onnx``. ``nearest``: no calibration, identity Hessians: the
    error feedback vanishes and every weight rounds to nearest on the same group grids (RTN at
    widths ONNX Runtime's own RTN does not write)."""
    import onnx
    from onnx import helper, numpy_helper

    from moqe_compile.quantize.nbits import const_matmuls

    node_bits = node_bits or {}
    if any(b not in (3, 4, 8) for b in (bits, *node_bits.values())):
        raise BuildError(f"GPTQ to MatMulNBits supports bits 3, 4 or 8, got {bits} {node_bits or ''}.")
    done = done or {}
    hess = collect_hessians(fp_onnx, feeds, exclude | set(done), progress) if feeds and not nearest else {}
    model = onnx.load(str(fp_onnx))
    nodes, inits = const_matmuls(model, exclude)
    g = model.graph
    drop_inits = set()
    for node in nodes:
        W = numpy_helper.to_array(inits[node.input[1]])
        H = None if node.name in done else np.eye(W.shape[0]) if nearest else hess[node.input[0]][0]
        new = _matmulnbits_node(g, node, W, H,
                                node_bits.get(node.name, bits), group, damp, symmetric, act_order and not nearest,
                                done.get(node.name))
        idx = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(idx, new)
        drop_inits.add(node.input[1])
    still_used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name not in drop_inits or i.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out), save_as_external_data=False)
    return {"matmuls": len(nodes), "calibration_tokens": int(next(iter(hess.values()))[1]) if hess else 0}
