"""Block reconstruction (BRECQ, Li et al., 2021; QDrop, Wei et al., 2022), ours: no maintained
library does it on ONNX graphs, and the source may be an ONNX file, so it runs on the Q/DQ graph
itself, where AdaRound and the sequential pass already work.

A *block* is the part of the graph between two single-tensor cuts (a tensor that every path from
the input to the output goes through), grown cut by cut until it holds at least ``layers``
Conv/Gemm nodes. On MobileNetV2 and EfficientNet-Lite0 the cuts are the inverted residual blocks'
outputs (a residual Add, or the projection of a block without one) and the tensors between the
layers of a block without a skip; with ``layers = 3`` the greedy grouping lands on the inverted
residual blocks themselves (expand, depthwise, project). The definition needs no knowledge of the
architecture, only the graph, so it also covers plain CNNs (three consecutive convolutions).

Per block, the nodes of the Q/DQ graph between its input and output cut are rebuilt as torch
operations (activation QuantizeLinear/DequantizeLinear as fake quantization with a
straight-through gradient); every quantized layer's integer weights become AdaRound's soft
rounding floor(w/s) + h(V) on the scales already in the graph, and all V of the block are learned
jointly to reproduce the FP model's block output from the block's input on the *quantized* stream
(every block before it already reconstructed). With ``qdrop`` > 0 each activation keeps its
unquantized value with that probability during reconstruction (QDrop). Only the integer weights
change, so the graph stays what ``quantize_static`` wrote.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from moqe_compile.errors import BuildError
from moqe_compile.quantize.adaround import anneal, h, init_v, layer_fn, round_reg
from moqe_compile.quantize.graph import node_attrs
from moqe_compile.quantize.stream import varying_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockSettings:
    """How blocks are reconstructed: ``iters`` Adam steps of ``batch`` samples out of the first
    ``samples`` calibration samples, learning rate ``lr``, rounding regularizer weight ``reg``
    (BRECQ's 0.01 against a squared error summed over channels); ``qdrop``: probability that an
    activation skips its quantization during reconstruction; ``early_stop``: stop a block once
    fewer than this share of its roundings are undecided (0 = never); ``layers``: the fewest
    Conv/Gemm nodes per block."""

    iters: int = 500
    samples: int = 256
    batch: int = 32
    lr: float = 1e-2
    reg: float = 0.01
    qdrop: float = 0.0
    early_stop: float = 0.0
    layers: int = 3
    seed: int = 0


@dataclass
class Block:
    t_in: str  # the tensor the block reads (a cut)
    t_out: str  # the tensor it writes (the next cut)
    layers: list[str]  # its Conv/Gemm node names, in graph order


def cuts(model: onnx.ModelProto, input_name: str) -> list[tuple[int, str]]:
    """(node index, tensor) of every single-tensor cut, in graph order; index -1 is the input."""
    varying = varying_tensors(model, input_name)
    remaining: dict[str, int] = {o.name: 1 for o in model.graph.output}  # outputs stay live to the end
    for n in model.graph.node:
        for t in n.input:
            if t in varying:
                remaining[t] = remaining.get(t, 0) + 1
    live, out = {input_name}, [(-1, input_name)]
    for k, n in enumerate(model.graph.node):
        for t in n.input:
            if t in varying:
                remaining[t] -= 1
                if remaining[t] == 0:
                    live.discard(t)
        live.update(o for o in n.output if o in varying and remaining.get(o, 0) > 0)
        if len(live) == 1:
            out.append((k, next(iter(live))))
    return out


def blocks(model: onnx.ModelProto, input_name: str, layers: set[str], min_layers: int,
           valid: set[str] | None = None) -> list[Block]:
    """The graph cut into blocks of at least ``min_layers`` of ``layers`` (node names) each (the
    last may hold fewer). ``valid``: the tensors a block may start or end at (those that exist in
    the Q/DQ graph too; ORT folds a ReLU/Clip into the quantizer and drops its input tensor)."""
    nodes = model.graph.node
    cut = [(k, t) for k, t in cuts(model, input_name) if valid is None or t in valid]
    segments = []  # (end tensor, layer names) between consecutive cuts
    for (k0, _), (k1, t1) in zip(cut, cut[1:]):
        segments.append((t1, [nodes[i].name for i in range(k0 + 1, k1 + 1) if nodes[i].name in layers]))
    # A segment without layers (an activation, a pooling) joins the one before it, so a block ends
    # after its activation; leading ones join the first block.
    merged: list[tuple[str, list[str]]] = []
    for t, ls in segments:
        if merged and not ls:
            merged[-1] = (t, merged[-1][1])
        elif merged and not merged[-1][1]:
            merged[-1] = (t, ls)
        else:
            merged.append((t, ls))
    out, start, acc = [], input_name, []
    for t, ls in merged:
        acc = acc + ls
        if len(acc) >= min_layers:
            out.append(Block(start, t, acc))
            start, acc = t, []
    if acc:
        out.append(Block(start, merged[-1][0], acc))
    return out


class _FQ:
    """A fake-quantized activation between its QuantizeLinear and DequantizeLinear."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def _int_range(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


class Region:
    """The nodes of Q/DQ graph ``q`` that compute ``block.t_out`` from ``block.t_in``, as torch.

    The output is the block's tensor after its own quantizer, when it has one (what the next
    block reads). ``soft``: DequantizeLinear output name -> the soft weights that replace it."""

    # oneDNN's convolutions, forward and backward, ran ~1.4x faster on NHWC tensors here
    # (bench/brecq_step.py); the graph's NCHW semantics are unchanged.
    channels_last = True

    def __init__(self, q: onnx.ModelProto, inits: dict, block: Block):
        producer = {o: n for n in q.graph.node for o in n.output if o}
        graph_inputs = {i.name for i in q.graph.input}
        need, stack = set(), [block.t_out]
        while stack:
            t = stack.pop()
            if not t or t == block.t_in or t in inits or t in need:
                continue
            if t not in producer:
                if t in graph_inputs:
                    raise BuildError(f"block {block.t_in!r} -> {block.t_out!r} reads the graph input: "
                                     f"{block.t_in!r} is not a cut of the Q/DQ graph.")
                raise BuildError(f"block reconstruction: tensor {t!r} has no producer in the Q/DQ graph.")
            need.add(t)
            stack += list(producer[t].input)
        order = {id(n): k for k, n in enumerate(q.graph.node)}
        self.nodes = sorted({id(producer[t]): producer[t] for t in need}.values(), key=lambda n: order[id(n)])
        # Where the block starts (its first reader of t_in) and ends (the producer of t_out) in the graph's order.
        self.start = min(order[id(n)] for n in self.nodes if block.t_in in n.input)
        self.end = max(order[id(n)] for n in self.nodes)
        self.out = block.t_out
        quant = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == block.t_out]
        if quant:  # the block's output quantizer and its DequantizeLinear
            deq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quant[0].output[0]]
            if deq:
                self.nodes += [quant[0], deq[0]]
                self.out = deq[0].output[0]
        self.t_in, self.inits = block.t_in, inits
        self._const: dict[str, torch.Tensor] = {}

    def const(self, name: str) -> torch.Tensor:
        if name not in self._const:
            self._const[name] = torch.from_numpy(np.array(numpy_helper.to_array(self.inits[name])))
        return self._const[name]

    def run(self, x: torch.Tensor, soft: dict, qdrop: float = 0.0, gen: torch.Generator | None = None):
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        env: dict = {self.t_in: x}
        for n in self.nodes:
            if n.op_type == "DequantizeLinear" and n.output[0] in soft:
                env[n.output[0]] = soft[n.output[0]]
                continue
            args = [None if not t else env[t] if t in env else self.const(t) for t in n.input]
            env[n.output[0]] = _op(n, args, qdrop, gen)
        y = env[self.out]
        return y.value if isinstance(y, _FQ) else y


def _attr(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _broadcast(s: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    return s.reshape([-1 if i == axis % ndim else 1 for i in range(ndim)]) if s.numel() > 1 else s


def _quantize(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qdrop: float, gen) -> _FQ:
    """Fake quantization with a straight-through gradient inside the grid (PyTorch's fused
    kernel: one pass forward and one backward, 2-3x faster than the same arithmetic as separate
    tensor operations on the large early activations, where the reconstruction spends its time)."""
    lo, hi = _int_range(zp.numpy().dtype)
    if s.numel() == 1:
        fq = torch.fake_quantize_per_tensor_affine(x, s.float().reshape(1), zp.to(torch.int32).reshape(1), lo, hi)
    else:  # a per-channel activation quantizer (not written by quantize_static, kept for completeness)
        fq = torch.fake_quantize_per_channel_affine(x, s.float(), zp.to(torch.int32), 1, lo, hi)
    if qdrop > 0:
        keep = torch.rand(x.shape, generator=gen) < qdrop
        fq = torch.where(keep, x, fq)
    return _FQ(fq)


def _dequantize(n, x, s, zp):
    if isinstance(x, _FQ):
        return x.value
    axis = _attr(n, "axis", 1)
    z = zp.float() if zp is not None else torch.zeros(())
    return (x.float() - _broadcast(z, x.dim(), axis)) * _broadcast(s.float(), x.dim(), axis)


def _gemm(n, x, w, b):
    if _attr(n, "transA", 0):
        x = x.t()
    y = _attr(n, "alpha", 1.0) * (x @ (w.t() if _attr(n, "transB", 0) else w))
    return y if b is None else y + _attr(n, "beta", 1.0) * b


def _reshape(x, shape):
    shape = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape.tolist())]
    return x.reshape(shape)


def _pool(n, x, fn):
    k = tuple(_attr(n, "kernel_shape"))
    pads = list(_attr(n, "pads", [0] * 2 * len(k)))
    return fn(x, k, tuple(_attr(n, "strides", [1] * len(k))), tuple(pads[: len(k)]))


def _op(n: onnx.NodeProto, a: list, qdrop: float, gen):
    op = n.op_type
    if op == "QuantizeLinear":
        return _quantize(a[0], a[1], a[2], qdrop, gen)
    if op == "DequantizeLinear":
        return _dequantize(n, a[0], a[1], a[2] if len(a) > 2 else None)
    a = [v.value if isinstance(v, _FQ) else v for v in a]
    if op == "Conv":
        return layer_fn("Conv", node_attrs(n), ())(a[0], a[1], a[2] if len(a) > 2 else None)
    if op == "Gemm":
        return _gemm(n, a[0], a[1], a[2] if len(a) > 2 else None)
    simple = {"Add": lambda: a[0] + a[1], "Sub": lambda: a[0] - a[1], "Mul": lambda: a[0] * a[1],
              "Div": lambda: a[0] / a[1], "Relu": lambda: F.relu(a[0]), "Sigmoid": lambda: torch.sigmoid(a[0]),
              "Identity": lambda: a[0],
              "Clip": lambda: torch.clamp(a[0], None if len(a) < 2 or a[1] is None else float(a[1]),
                                          None if len(a) < 3 or a[2] is None else float(a[2])),
              "GlobalAveragePool": lambda: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
              "Flatten": lambda: a[0].reshape(int(np.prod(a[0].shape[: _attr(n, "axis", 1)])), -1),
              "Reshape": lambda: _reshape(a[0], a[1]),
              "Concat": lambda: torch.cat(a, dim=_attr(n, "axis")),
              "AveragePool": lambda: _pool(n, a[0], F.avg_pool2d),
              "MaxPool": lambda: _pool(n, a[0], F.max_pool2d),
              "Constant": lambda: torch.from_numpy(np.array(numpy_helper.to_array(_attr(n, "value")))),
              "ReduceMean": lambda: a[0].mean(
                  dim=tuple(int(d) for d in (a[1].tolist() if len(a) > 1 and a[1] is not None else _attr(n, "axes"))),
                  keepdim=bool(_attr(n, "keepdims", 1)))}
    if op not in simple:
        raise BuildError(f"block reconstruction cannot run node {n.name!r} ({op}); use weight_rounding = 'gptq' "
                         f"or 'adaround' for this model.")
    return simple[op]()


@dataclass
class _Layer:
    dq_out: str  # the DequantizeLinear output the soft weights replace
    w_int: str  # its integer initializer
    floor: torch.Tensor
    scale: torch.Tensor
    v: torch.Tensor
    lo: int
    hi: int

    def soft(self) -> torch.Tensor:
        return torch.clamp(self.floor + h(self.v), self.lo, self.hi) * self.scale

    def hard(self) -> torch.Tensor:
        return torch.clamp(self.floor + (h(self.v) >= 0.5).float(), self.lo, self.hi)


def _layers(q: onnx.ModelProto, inits: dict, region: Region, fp_weights: dict, qmax: dict) -> list[_Layer]:
    """The region's quantized Conv/Gemm layers with their soft rounding, started at the FP weights."""
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for n in region.nodes:
        if n.op_type not in ("Conv", "Gemm") or n.name not in fp_weights or n.input[1] not in dq:
            continue
        d = dq[n.input[1]]
        if d.input[0] not in inits:
            continue
        w = torch.from_numpy(fp_weights[n.name].astype(np.float32))
        s = torch.from_numpy(numpy_helper.to_array(inits[d.input[1]]).astype(np.float32))
        s = s.reshape(-1, *([1] * (w.dim() - 1))) if s.numel() > 1 else s
        floor, v = init_v(w, s)
        out.append(_Layer(d.output[0], d.input[0], floor, s, v.requires_grad_(True), -qmax[n.name] - 1,
                          qmax[n.name]))
    return out


def _error(region: Region, x: torch.Tensor, t: torch.Tensor, weights: dict, batch: int) -> float:
    """Squared error of the block output (summed over channels, mean over the rest) on every sample."""
    with torch.no_grad():
        tot = 0.0
        for i in range(0, len(x), batch):
            tot += float(((region.run(x[i : i + batch], weights) - t[i : i + batch]) ** 2).sum(1).mean()) * len(
                x[i : i + batch])
    return tot / len(x)


def reconstruct(q: onnx.ModelProto, inits: dict, block: Block, x_in: np.ndarray, target: np.ndarray,
                fp_weights: dict, qmax: dict, cfg: BlockSettings, desc: str = "block",
                region: Region | None = None, progress: bool = True) -> dict:
    """Learn the rounding of every quantized layer of ``block`` in Q/DQ graph ``q`` (its
    initializers ``inits`` are rewritten): ``x_in`` the block's input on the quantized stream,
    ``target`` the FP model's block output, ``fp_weights`` node -> FP weight, ``qmax`` node ->
    weight grid. Returns the edited initializer names and the block error before (the integers
    the graph held) and after; the learned integers are kept only if they lower it. ``region``:
    ``Region(q, inits, block)`` when the caller already built it (nothing run on it yet).
    ``progress``: a progress bar on a terminal (``build -q`` turns it off)."""
    from tqdm.auto import tqdm

    if region is None:
        region = Region(q, inits, block)
    layers = _layers(q, inits, region, fp_weights, qmax)
    if not layers:
        return {"edited": [], "error_before": None, "error_after": None, "iters": 0}
    t0 = time.perf_counter()
    x, t = torch.from_numpy(np.ascontiguousarray(x_in)), torch.from_numpy(np.ascontiguousarray(target))
    held = {l.dq_out: torch.from_numpy(numpy_helper.to_array(inits[l.w_int]).astype(np.float32)) * l.scale
            for l in layers}
    before = _error(region, x, t, held, cfg.batch)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam([l.v for l in layers], lr=cfg.lr)
    n_round = sum(l.v.numel() for l in layers)
    it = 0
    with tqdm(total=cfg.iters, desc=desc, leave=False, file=sys.stderr, disable=None if progress else True) as bar:
        for it in range(cfg.iters):
            idx = torch.randint(0, len(x), (min(cfg.batch, len(x)),), generator=gen)
            out = region.run(x[idx], {l.dq_out: l.soft() for l in layers}, cfg.qdrop, gen)
            loss = ((out - t[idx]) ** 2).sum(1).mean()
            beta = anneal(it, cfg.iters)
            if beta is not None:
                loss = loss + cfg.reg * sum(round_reg(l.v, beta) for l in layers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            if cfg.early_stop and beta is not None and it % 20 == 0:
                with torch.no_grad():
                    undecided = sum(int(((h(l.v) > 0.01) & (h(l.v) < 0.99)).sum()) for l in layers)
                if undecided < cfg.early_stop * n_round:
                    break
    learned = {l.dq_out: l.hard() * l.scale for l in layers}
    after = _error(region, x, t, learned, cfg.batch)
    if after < before:
        for l in layers:
            old = numpy_helper.to_array(inits[l.w_int])
            inits[l.w_int].CopyFrom(numpy_helper.from_array(l.hard().numpy().astype(old.dtype), l.w_int))
    log.info("%s (%d layers): error %.4g -> %.4g in %d steps, %.1f s", desc, len(layers), before, after, it + 1,
             time.perf_counter() - t0)
    return {"edited": [l.w_int for l in layers], "error_before": before, "error_after": min(after, before),
            "iters": it + 1}
