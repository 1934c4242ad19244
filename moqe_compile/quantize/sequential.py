"""The sequential pass of the strongest recipe, inside the finished Q/DQ graph (ours: ORT
fits every activation range on the FP model and rounds weights to nearest, with no hook to
do either on the quantized stream).

Walking the Q/DQ graph in topological order, on calibration data:
- each activation QuantizeLinear gets the range minimizing squared quantization error (MSE)
  of its input as it is *now*, i.e. with every layer before it already quantized and
  corrected;
- each Conv/Gemm gets its integer weights by GPTQ from the
  Hessian of its quantized input stream, on the fixed per-channel scales of the MSE clip;
- then its bias absorbs the mean per-channel FP-minus-quantized output.

Only initializers change (activation scales/zero-points, int8 weights, biases), so the graph
stays exactly what ``quantize_static`` wrote and ``check-qdq`` judges it as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

from moqe_compile.quantize.brecq import BlockSettings, Region, reconstruct
from moqe_compile.quantize.brecq import blocks as brecq_blocks
from moqe_compile.quantize.calibrate import mse_ranges
from moqe_compile.quantize.gptq import LayerHessian, gptq_clip_search, gptq_round
from moqe_compile.quantize.graph import WeightLayer, get_init, run_with_outputs, weight_layers
from moqe_compile.quantize.stream import TensorStream
from moqe_compile.quantize.weights import channel_scales

# ORT's QDQ quantizer drops a Relu/Clip after a quantized node when activations are asymmetric
# (the uint8 range clips instead); the QuantizeLinear then reads the pre-activation tensor, so
# its range must be fitted on the activation's output, not on what it reads.
_REMOVABLE = ("Relu", "Clip")


def _inits(m: onnx.ModelProto) -> dict:
    return {i.name: i for i in m.graph.initializer}


def _const_value(m: onnx.ModelProto, name: str):
    for i in m.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _removed_activation(base: onnx.ModelProto, q: onnx.ModelProto, tensor: str):
    """The function ORT folded into ``tensor``'s quantizer, or None."""
    producer = {o: n for n in base.graph.node for o in n.output}.get(tensor)
    if producer is None or producer.op_type not in _REMOVABLE:
        return None
    if any(n.op_type == producer.op_type and tensor in n.output for n in q.graph.node):
        return None  # the activation is still in the Q/DQ graph
    if producer.op_type == "Relu":
        return lambda v: np.maximum(v, 0)
    lo = _const_value(base, producer.input[1]) if len(producer.input) > 1 and producer.input[1] else None
    hi = _const_value(base, producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
    return lambda v: np.clip(v, -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))


HIST_CHUNK = 1 << 22  # values per histogram chunk (32 MB as float64)


def fit_activation_mse(values: np.ndarray, zp_dtype: int, symmetric: bool, bins: int = 2048) -> tuple:
    """(scale, zero_point) of the range minimizing the squared quantization error of ``values``,
    computed exactly as ORT turns a range into Q/DQ parameters."""
    v = values.ravel()
    lo, hi = float(min(v.min(), 0.0)), float(max(v.max(), 0.0))
    qmin, qmax = get_qmin_qmax_for_qType(zp_dtype, symmetric=symmetric)
    if hi - lo <= 0:
        r_lo, r_hi = np.float32(lo), np.float32(hi)
    else:
        # Counts over a fixed range add up across chunks: the whole tensor's histogram in
        # float64 without a float64 copy of it (1 GB for one MobileNetV2 layer on 120 images).
        edges = np.histogram_bin_edges(np.zeros(1), bins=bins, range=(lo, hi))
        hist = sum(np.histogram(v[i : i + HIST_CHUNK].astype(np.float64), bins=bins, range=(lo, hi))[0]
                   for i in range(0, len(v), HIST_CHUNK))
        r = mse_ranges({"t": (hist, edges, lo, hi, max(-lo, hi))}, asymmetric=not symmetric,
                       levels=int(qmax) - int(qmin) + 1)["t"]
        r_lo, r_hi = np.float32(r.lowest), np.float32(r.highest)
    zp, scale = compute_scale_zp(r_lo, r_hi, qmin, qmax, symmetric=symmetric)
    return np.float32(scale), zp


IM2COL_BYTES = 256 << 20  # per Hessian chunk; a fixed 32 samples of a 112 px depthwise layer took 1.4 GB

CLIP_FACTORS = (0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


def clip_candidates(w: np.ndarray, qmax: int) -> list[np.ndarray]:
    """Per-channel scales tried by ``weight_clip = "mse-output"``: the weight-MSE clip and
    fractions of max |w| (1.0 = no clipping)."""
    full = channel_scales(w, qmax, "minmax")
    return [channel_scales(w, qmax, "mse")] + [(f * full).astype(np.float32) for f in CLIP_FACTORS]


def _dq_of(q: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == tensor), None)


def _rescale_bias(q: onnx.ModelProto, inits: dict, node: onnx.NodeProto) -> None:
    """Keep an int32 bias on the grid input_scale * weight_scale after its input's range was
    refitted: ORT fuses Conv/Gemm into QLinearConv/QGemm only when the bias scale is that
    product, and otherwise runs the layer in float."""
    bdq = _dq_of(q, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    xdq, wdq = _dq_of(q, node.input[0]), _dq_of(q, node.input[1])
    if bdq is None or xdq is None or wdq is None:
        return
    x_s = numpy_helper.to_array(inits[xdq.input[1]]).astype(np.float32)
    w_s = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float32)
    old_s = numpy_helper.to_array(inits[bdq.input[1]])
    new_s = (x_s * w_s).astype(old_s.dtype).reshape(old_s.shape)
    if np.array_equal(old_s, new_s):
        return
    b = numpy_helper.to_array(inits[bdq.input[0]])
    nb = np.round(b.astype(np.float64) * old_s / new_s)
    info = np.iinfo(b.dtype)
    inits[bdq.input[0]].CopyFrom(numpy_helper.from_array(np.clip(nb, info.min, info.max).astype(b.dtype),
                                                         bdq.input[0]))
    inits[bdq.input[1]].CopyFrom(numpy_helper.from_array(new_s, bdq.input[1]))


def _refit_activation(base: onnx.ModelProto, q: onnx.ModelProto, inits: dict, node: onnx.NodeProto,
                      v: np.ndarray, symmetric: bool) -> None:
    """Give activation QuantizeLinear ``node`` the MSE range of ``v``, its input on the quantized stream."""
    act = _removed_activation(base, q, node.input[0])
    if act is not None:
        v = act(v)
    zp_init = inits[node.input[2]]
    scale, zp = fit_activation_mse(v, zp_init.data_type, symmetric)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.asarray(scale, np.float32).reshape(
        numpy_helper.to_array(inits[node.input[1]]).shape), node.input[1]))
    zp_arr = numpy_helper.to_array(zp_init)
    zp_init.CopyFrom(numpy_helper.from_array(np.asarray(zp).astype(zp_arr.dtype).reshape(zp_arr.shape),
                                             node.input[2]))


def _gptq_layer(base: onnx.ModelProto, q: onnx.ModelProto, inits: dict, node: onnx.NodeProto, layer: WeightLayer,
                xin: np.ndarray, qmax: int, clip_search: bool, damp: float) -> None:
    """Integer weights of ``node`` by GPTQ on the Hessian of its quantized input ``xin``."""
    wdq = _dq_of(q, node.input[1])
    w_q, w_s = wdq.input[0], wdq.input[1]
    scale = numpy_helper.to_array(inits[w_s]).astype(np.float32)
    wint = numpy_helper.to_array(inits[w_q])
    h = LayerHessian(layer.op, layer.attrs, wint.shape)
    # im2col of the whole set at once would not fit in memory: chunks of about IM2COL_BYTES
    # (a sample's im2col rows in float32 and its per-group products in float32 and float64).
    groups = int(layer.attrs.get("group", 1)) if layer.op == "Conv" else 1
    cols = wint.size // wint.shape[0]
    per_sample = 4 * cols * groups * int(np.prod(xin.shape[2:]) if xin.ndim > 2 else 1) + 12 * groups * cols**2
    step = int(max(1, min(32, IM2COL_BYTES // max(per_sample, 1))))
    for i in range(0, len(xin), step):
        h.add(xin[i : i + step])
    # Rounded from the FP weights: the ones ORT stored are already nearest-rounded.
    w_fp = get_init(base, layer.weight)
    if clip_search:
        new, scale = gptq_clip_search(w_fp, qmax, h, clip_candidates(w_fp, qmax), damp)
        old = numpy_helper.to_array(inits[w_s])
        inits[w_s].CopyFrom(numpy_helper.from_array(scale.astype(old.dtype).reshape(old.shape), w_s))
        _rescale_bias(q, inits, node)
    else:
        new = gptq_round(w_fp, scale, qmax, h, damp=damp)
    inits[w_q].CopyFrom(numpy_helper.from_array(new.astype(wint.dtype), w_q))


def correct_bias(q: onnx.ModelProto, inits: dict, node: onnx.NodeProto, f: np.ndarray, g: np.ndarray) -> None:
    """Add the mean per-channel FP-minus-quantized output ``f - g`` (N, C[, H, W]) to the bias of
    Conv/Gemm ``node`` in Q/DQ graph ``q`` (``inits``: its initializers by name). ORT-CPU graphs
    hold int32 biases behind a DequantizeLinear (the correction is rounded to its grid), TensorRT
    graphs float biases."""
    delta = (f - g).mean(axis=(0,) if f.ndim == 2 else (0, 2, 3))
    bdq = _dq_of(q, node.input[2])
    bias_name = bdq.input[0] if bdq is not None else node.input[2]
    b = numpy_helper.to_array(inits[bias_name])
    if bdq is None:
        nb = (b + delta).astype(b.dtype)
    else:
        nb = (b + np.round(delta / numpy_helper.to_array(inits[bdq.input[1]]))).astype(b.dtype)
    inits[bias_name].CopyFrom(numpy_helper.from_array(nb, bias_name))


def _edited(q: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    """The initializers the pass may edit at ``node``: an activation quantizer's scale and zero
    point; a Conv/Gemm's weight and bias behind their DequantizeLinear (or the float bias)."""
    if node.op_type == "QuantizeLinear":
        return list(node.input[1:3])
    out = []
    for t in node.input[1:3]:
        dq = _dq_of(q, t)
        out += list(dq.input) if dq is not None else [t]
    return out


def refine(base: onnx.ModelProto, q_path: Path, qmax: dict[str, int], symmetric: bool, exclude: set[str],
           input_name: str, x: np.ndarray, refit_activations: bool = True, gptq: bool = True,
           clip_search: bool = False, gptq_damp: float = 0.01, bias_correction: bool = False,
           engine: str = "stream", blocks: BlockSettings | None = None, progress: bool = True) -> dict:
    """Run the sequential pass on the Q/DQ graph at ``q_path`` (rewritten in place); return
    what it did, for the manifest's ``steps``. ``x``: calibration inputs; ``qmax``: the
    weight grid of each Conv/Gemm node on this backend; ``symmetric``: activation ranges
    symmetric (TensorRT). ``refit_activations``: MSE ranges on the quantized stream; ``gptq``:
    GPTQ weight rounding (``clip_search``: each channel's clip chosen jointly with it, else the
    scales ORT wrote; ``gptq_damp``: damping as a fraction of the mean Hessian diagonal);
    ``bias_correction``: biases absorb the mean output error. ``engine``: how the tensors are
    computed: ``"stream"`` runs each node once (:class:`~moqe_compile.quantize.stream.TensorStream`);
    ``"whole-graph"``, the reference it replaced, runs the whole graph in a new session per
    tensor (O(L^2)) and holds every FP layer output at once. ``blocks``: block reconstruction
    (``quantize/brecq.py``) of the integer weights, each block when the walk has passed it (its
    activation ranges refitted first), on the stream engine only; ``progress``: its bars shown."""
    if engine not in ("stream", "whole-graph"):
        raise ValueError(f"engine {engine!r}: 'stream' or 'whole-graph'")
    if blocks is not None and engine != "stream":
        raise ValueError("block reconstruction runs on the stream engine only")
    q = onnx.load(str(q_path))
    inits = _inits(q)
    layers: dict[str, WeightLayer] = {l.node: l for l in weight_layers(base) if l.node not in exclude}
    if engine == "stream":
        qs = TensorStream(q, input_name, x)
        fs = TensorStream(base, input_name, x) if bias_correction else None
        fetch, fp_output = qs.get, (fs.get if fs else None)
    else:
        qs = None
        fp_out = {}
        if bias_correction:
            got = run_with_outputs(base, [l.output for l in layers.values()], input_name, x)
            fp_out = {k: np.concatenate(v) for k, v in got.items()}
        fp_output = fp_out.__getitem__

        def fetch(name: str) -> np.ndarray:
            return np.concatenate(run_with_outputs(q, [name], input_name, x)[name])

    fitted: set[str] = set()
    done = {"refit_activations": 0, "gptq_layers": 0, "bias_corrected_layers": 0}
    plan = _BlockPlan(base, q, inits, layers, qmax, input_name, x, blocks, progress) if blocks is not None else None
    for k, node in enumerate(list(q.graph.node)):
        if qs is not None:
            qs.pos = plan.pos(k) if plan is not None else k
        if (node.op_type == "QuantizeLinear" and refit_activations and node.input[0] not in inits
                and node.input[1] in inits and node.input[1] not in fitted):
            _refit_activation(base, q, inits, node, fetch(node.input[0]), symmetric)
            fitted.add(node.input[1])
            done["refit_activations"] += 1
        elif node.op_type in ("Conv", "Gemm") and node.name in layers:
            layer = layers[node.name]
            _rescale_bias(q, inits, node)
            if gptq:
                _gptq_layer(base, q, inits, node, layer, fetch(node.input[0]), qmax[layer.node], clip_search,
                            gptq_damp)
                done["gptq_layers"] += 1
            if qs is not None:
                qs.changed(_edited(q, node))
            if bias_correction and len(node.input) > 2 and node.input[2]:
                correct_bias(q, inits, node, fp_output(layer.output), fetch(node.output[0]))
                done["bias_corrected_layers"] += 1
        elif plan is None or not plan.ends_at(k):
            continue
        if qs is not None and node.op_type in ("QuantizeLinear", "Conv", "Gemm"):
            qs.changed(_edited(q, node))
        if plan is not None and plan.ends_at(k):
            plan.reconstruct(k, qs)
    if plan is not None:
        done.update(plan.summary())
    onnx.save(q, str(q_path))
    return done


class _BlockPlan:
    """Where each block of the Q/DQ graph starts and ends in the walk, and its reconstruction.

    While a block is open the stream keeps every tensor read from its start on (``pos``), so at
    its end its input is still there and, once its weights change, its output is recomputed from
    the block's own tensors rather than from the graph input."""

    def __init__(self, base: onnx.ModelProto, q: onnx.ModelProto, inits: dict, layers: dict, qmax: dict,
                 input_name: str, x: np.ndarray, cfg: BlockSettings, progress: bool = True):
        self.q, self.inits, self.qmax, self.cfg, self.progress = q, inits, qmax, cfg, progress
        valid = {o for n in q.graph.node for o in n.output} | {input_name}
        self.blocks = brecq_blocks(base, input_name, set(layers), cfg.layers, valid)
        # Built before the walk edits any initializer: a Region reads only the graph's nodes and
        # keeps ``inits`` itself, so it is the one ``reconstruct`` would build at the block's end.
        self.regions: list[Region | None] = [Region(q, inits, b) for b in self.blocks]
        self.span = [(r.start, r.end) for r in self.regions]
        self.end = {e: j for j, (_, e) in enumerate(self.span)}
        self.n = min(len(x), cfg.samples)
        self.fp = TensorStream(base, input_name, x[: self.n])
        self.fp_weights = {name: get_init(base, l.weight) for name, l in layers.items()}
        self.errors: list[list[float]] = []

    def pos(self, k: int) -> int:
        return min([k] + [s for s, e in self.span if s <= k <= e])

    def ends_at(self, k: int) -> bool:
        return k in self.end

    def reconstruct(self, k: int, qs: TensorStream) -> None:
        j = self.end[k]
        b = self.blocks[j]
        region, self.regions[j] = self.regions[j], None  # its constant cache goes with it once used
        got = reconstruct(self.q, self.inits, b, qs.get(b.t_in)[: self.n], self.fp.get(b.t_out), self.fp_weights,
                          self.qmax, self.cfg, desc=f"block {j + 1}/{len(self.blocks)}", region=region,
                          progress=self.progress)
        if got["error_before"] is not None:
            self.errors.append([round(got["error_before"], 6), round(got["error_after"], 6)])
        qs.changed(got["edited"])
        qs.get(b.t_out)  # recomputed now, from the block's tensors the stream still holds

    def summary(self) -> dict:
        return {"brecq_blocks": len(self.errors), "brecq_block_errors": self.errors}
