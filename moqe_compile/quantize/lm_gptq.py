"""GPTQ (Frantar et al., 2023) for the MatMuls of an ONNX decoder, written as MatMulNBits.

Ours rather than ORT's: ``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig`` runs the
whole model over the calibration set once per distinct MatMul input (121 times for
SmolLM2-135M: ~3 h per expert measured on 2 shared cores here). This module collects every
MatMul input in *one* pass per calibration window (all of them added as graph outputs), builds
the Hessians H = 2/n X^T X, runs the GPTQ column loop (lazy blocks of 128 columns, groups of
``block_size`` input channels with symmetric scales found on the error-updated weights) in
torch, and writes each quantized weight straight into a ``com.microsoft.MatMulNBits`` node
(ORT's layout: B uint8 [N, blocks, block_size * bits / 8], scales [N * blocks], default zero
point 2^(bits-1)); it cannot go through ORT's RTN quantizer afterwards, which would recompute
scales and re-round the GPTQ weights. Hessians come from the FP model (as ORT's GPTQ does),
not from the partially quantized one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moqe_compile.errors import BuildError


def _const_matmuls(model, exclude: set[str]):
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and n.name not in exclude], inits


def collect_hessians(fp_onnx: Path, feeds: list[dict], exclude: set[str] = frozenset(), progress=None) -> dict:
    """{activation name: (H float64 [K, K], tokens)} for every constant-weight MatMul input."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp_onnx))
    nodes, _ = _const_matmuls(model, exclude)
    names = list(dict.fromkeys(n.input[0] for n in nodes))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the named tensors
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    H: dict[str, np.ndarray] = {}
    n: dict[str, int] = {}
    for feed in feeds:
        for name, x in zip(names, sess.run(names, feed)):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            H[name] = H.get(name, 0) + x.T @ x
            n[name] = n.get(name, 0) + len(x)
        if progress is not None:
            progress.update(1)
    return {k: (2.0 * H[k] / n[k], n[k]) for k in H}


def gptq_weight(w_out_in, H, bits: int, group: int, damp: float = 0.01, lazy: int = 32, symmetric: bool = True):
    """GPTQ of W (N out, K in) given H (K, K): (integer codes int32 [N, K], scales [N, K // group],
    zero points int32 [N, K // group] or None). K must be a multiple of ``group`` (the caller pads).

    ``symmetric``: codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = group absmax / that, no zero point.
    Asymmetric (the GPTQ paper's default): codes in [0, 2^b - 1] over the group's [min, max]
    (widened to include 0), zero point round(-min / scale); every level is used, so it fits
    skewed groups better (and SmolLM2's GGUF "FP" weights are asymmetric Q4_1 blocks)."""
    import torch

    # One torch thread for all of it: these are small LAPACK calls and many tiny per-column ops,
    # where OpenMP threads only add barrier waits, pathologically so on a loaded machine.
    # Measured here (2 cores, load ~8): a 256 x 256 cholesky_inverse took 2.2 s with 2 threads;
    # a 8192 x 512 layer 11.3 s with 2 threads and blocks of 128, 0.7 s with 1 thread and 32.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w_out_in, H, bits, group, damp, lazy, symmetric)
    finally:
        torch.set_num_threads(threads)


def _gptq(w_out_in, H, bits, group, damp, lazy, symmetric):
    import torch


    W = torch.as_tensor(np.array(w_out_in, dtype=np.float32))
    H = torch.as_tensor(np.array(H, dtype=np.float32))
    N, K = W.shape
    qmax = 2 ** (bits - 1) - 1
    qlo, qhi = (-qmax, qmax) if symmetric else (0, 2**bits - 1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise BuildError(f"GPTQ: the Hessian is not positive definite even with damping {damp}; "
                         "raise gptq_damp or give more calibration windows.") from e
    # Lazy blocks of 32 columns: the in-block update costs N x block per column.
    if group % lazy and lazy % group:
        lazy = group
    Q = torch.zeros(N, K, dtype=torch.int32)
    S = torch.zeros(N, K // group)
    Z = torch.zeros(N, K // group)
    z = torch.zeros(N)
    for i1 in range(0, K, lazy):
        i2 = min(i1 + lazy, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:  # scales from the error-updated weights of this group
                # A group starts at a lazy-block boundary (see below), where W holds every
                # update so far; W1 would cut a group longer than the block.
                g = W[:, col : col + group] if i == 0 else W1[:, i : i + group]
                if symmetric:
                    s = (g.abs().amax(1) / qmax).clamp_min(1e-10)
                else:
                    lo, hi = g.amin(1).clamp_max(0), g.amax(1).clamp_min(0)
                    s = ((hi - lo) / qhi).clamp_min(1e-10)
                    z = torch.round(-lo / s)
                S[:, col // group], Z[:, col // group] = s, z
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, qlo, qhi)
            Q[:, col] = q.to(torch.int32)
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.numpy(), S.numpy(), (None if symmetric else Z.numpy().astype(np.int32))


def pack_nbits(q: np.ndarray, bits: int, unsigned: bool = False) -> np.ndarray:
    """int codes [..., n] -> MatMulNBits' uint8 layout along the last axis (4 bits: low nibble
    first, an odd count padded with 0). Signed codes in [-(2^(b-1)-1), 2^(b-1)-1] are offset by
    the kernel's default zero point 2^(b-1); ``unsigned`` codes (asymmetric) are stored as they are."""
    u = (q if unsigned else q + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], -1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # low nibble first


def gptq_onnx(fp_onnx: Path, out: Path, feeds: list[dict], bits: int, group: int, damp: float,
              exclude: set[str] = frozenset(), progress=None, symmetric: bool = True) -> dict:
    """Quantize every constant-weight MatMul of ``fp_onnx`` with GPTQ into MatMulNBits."""
    import onnx
    from onnx import helper, numpy_helper

    if bits not in (4, 8):
        raise BuildError(f"GPTQ to MatMulNBits supports bits 4 or 8, got {bits}.")
    hess = collect_hessians(fp_onnx, feeds, exclude, progress)
    model = onnx.load(str(fp_onnx))
    nodes, inits = _const_matmuls(model, exclude)
    g = model.graph
    drop_inits = set()
    for node in nodes:
        W = numpy_helper.to_array(inits[node.input[1]])  # (K, N)
        K, N = W.shape
        pad = (-K) % group
        H, _ = hess[node.input[0]]
        if pad:  # padded input channels: zero weights, unit Hessian (no error to feed back)
            W = np.pad(W, ((0, pad), (0, 0)))
            H = np.pad(H, ((0, pad), (0, pad)))
            H[K:, K:] = np.eye(pad)
        q, s, z = gptq_weight(W.T, H, bits, group, damp, symmetric=symmetric)
        blocks = (K + pad) // group
        B = pack_nbits(q.reshape(N, blocks, group), bits, unsigned=not symmetric)
        bname, sname = f"{node.input[1]}_Q{bits}G{group}", f"{node.input[1]}_scales"
        g.initializer.extend([numpy_helper.from_array(B, bname),
                              numpy_helper.from_array(s.astype(np.float32).reshape(-1), sname)])
        inputs = [node.input[0], bname, sname]
        if z is not None:  # uint8 zero points, packed per output row like B (ORT's MatMulNBits layout)
            zname = f"{node.input[1]}_zero_points"
            g.initializer.append(numpy_helper.from_array(pack_nbits(z, bits, unsigned=True).reshape(-1), zname))
            inputs.append(zname)
        new = helper.make_node("MatMulNBits", inputs, list(node.output),
                               name=f"{node.name}_Q{bits}", domain="com.microsoft", K=K, N=N, bits=bits,
                               block_size=group)
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
