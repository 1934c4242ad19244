"""Weight quantization of a decoder's constant-weight MatMuls, by ONNX Runtime's quantizers.

- Dynamic W8A8 (:func:`quantize_dynamic_w8a8`): ``onnxruntime.quantization.quantize_dynamic``
  (int8 per-channel weights, activations quantized per tensor at run time), which ORT CPU runs
  as MatMulInteger / DynamicQuantizeMatMul / MatMulIntegerToFloat. Dynamic rather than static
  Q/DQ because language-model activation ranges vary per sequence; per-tensor scales also mean
  a score depends on what else is in the batch, so such experts are scored one sequence at a time.
- Weight-only MatMulNBits (:func:`quantize_matmulnbits`): ORT's
  ``matmul_nbits_quantizer.MatMulNBitsQuantizer`` with its offline RTN (the DEFAULT blockwise
  quantizer), HQQ or, as ``gptq-ort``, its GPTQ (vendored neural-compressor code, fed our
  calibration windows); float activations. Our own GPTQ into MatMulNBits is ``gptq.py``.
- :func:`check_kernels`: which kernels the ORT-optimized graph runs.

Also the MatMulNBits layout helpers shared with ``gptq.py`` (:func:`pack_nbits`) and a torch
fake-quant of that layout (:func:`rtn_blockwise`) for the search-based methods.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from moqe_compile.errors import ConfigError

INTEGER_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QGemm",
                   "QLinearMatMul")
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm")
NBITS_METHODS = ("rtn", "hqq", "gptq-ort")


# ---------------------------------------------------------------- graph and layout helpers

def const_matmuls(model, exclude: set[str]):
    """([MatMul nodes with a 2-D initializer weight, not in ``exclude``], {initializer name: tensor})."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and n.name not in exclude], inits


def lm_head_node(model_path: Path) -> str | None:
    """The float MatMul/Gemm writing ``logits``, or None."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    return next((n.name for n in g.node if "logits" in n.output and n.op_type in FLOAT_MATMULS), None)


# ONNX Runtime's MatMulNBits has kernels for 2, 4 and 8 bits. A 3-bit grid (codes 0..7, or
# -3..3 symmetric) is stored in 4-bit codes: the arithmetic is exactly 3-bit, the storage and
# speed those of 4 bits. The node's doc_string records the grid for the reports.
GRID_DOC = "grid_bits="


def storage_bits(bits: int) -> int:
    """The MatMulNBits width that holds a ``bits``-bit grid."""
    return 4 if bits == 3 else bits


def grid_doc(bits: int) -> str:
    return f"{GRID_DOC}{bits}: a {bits}-bit grid in {storage_bits(bits)}-bit MatMulNBits codes" \
        if storage_bits(bits) != bits else ""


def node_grid_bits(node) -> int:
    """The grid width of a MatMulNBits node: its ``bits``, or the narrower grid its doc_string names."""
    if node.doc_string.startswith(GRID_DOC):
        return int(node.doc_string[len(GRID_DOC):].split(":")[0])
    return next(a.i for a in node.attribute if a.name == "bits")


def graph_weight_bits(path: Path) -> dict:
    """Mean bits per weight over every MatMul/Gemm weight of the graph at ``path``, as stored:
    MatMulNBits at its grid's bits (:func:`node_grid_bits`), int8/uint8 initializers (dynamic
    W8A8) at 8, float ones at 32.
    Integer codes only (group scales and zero points are not counted); the embedding Gather is not a MatMul."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in g.initializer}
    per_bits: collections.Counter = collections.Counter()
    for n in g.node:
        if n.op_type == "MatMulNBits":
            at = {a.name: a.i for a in n.attribute}
            per_bits[node_grid_bits(n)] += at["K"] * at["N"]
        elif n.op_type in FLOAT_MATMULS + ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") \
                and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            bits = 8 if w.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) else 32
            per_bits[bits] += int(np.prod(w.dims))
    total = sum(per_bits.values())
    return {"mean_weight_bits": round(sum(b * c for b, c in per_bits.items()) / max(1, total), 4),
            "weights_per_bits": {str(b): c for b, c in sorted(per_bits.items())}}


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


def _pad_cols(w, pad: int):
    import torch.nn.functional as F

    return F.pad(w, (0, pad)) if pad else w


def rtn_blockwise(w, bits: int, block: int, symmetric: bool):
    """Fake-quantize torch (out, in) weights in blocks of ``block`` input channels (MatMulNBits' layout)."""
    out_f, in_f = w.shape
    pad = (-in_f) % block
    wp = _pad_cols(w, pad).reshape(out_f, -1, block)
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


# ---------------------------------------------------------------- ORT's quantizers

class CalibReader:
    """ORT's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        return iter(self.feeds)


def quantize_dynamic_w8a8(fp_onnx: Path, out: Path, exclude: list[str]) -> None:
    """int8 per-channel MatMul weights, activations quantized per tensor at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp_onnx), str(out), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=list(exclude),
                     extra_options={"MatMulConstBOnly": True})


def quantize_matmulnbits(fp_onnx: Path, out: Path, method: str, bits: int, block_size: int, symmetric: bool,
                         exclude: list[str], calib_feeds: list[dict] | None = None, damp: float = 0.01) -> None:
    """Every constant-weight MatMul but ``exclude`` as MatMulNBits by ORT's ``method``
    (one of ``NBITS_METHODS``; ``gptq-ort`` reads ``calib_feeds`` and ``damp``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method == "rtn":
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    elif method == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    elif method == "gptq-ort":
        if bits != 4:  # ORT's GPTQ path hardcodes 4 bits; refuse instead of writing the wrong width
            raise ConfigError(f"gptq-ort (ONNX Runtime's GPTQ) writes 4-bit weights only; got bits = {bits}.")
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=CalibReader(calib_feeds or []), percdamp=damp,
                                         block_size=128)
    else:
        raise ConfigError(f"MatMulNBits method {method!r} is not one of {list(NBITS_METHODS)}.")
    q = MatMulNBitsQuantizer(onnx.load(str(fp_onnx)), bits=bits, block_size=block_size, is_symmetric=symmetric,
                             nodes_to_exclude=list(exclude), algo_config=algo)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


def apply_accuracy_level(model, level: int, level_8bit: int = 0) -> int:
    """Set ``accuracy_level`` on every MatMulNBits node of an in-memory ``ModelProto``,
    ``level_8bit`` instead on the 8-bit nodes when it is not 0; returns how many nodes it set.
    0 removes the attribute (ORT's float compute)."""
    from onnx import helper

    count = 0
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
        keep = [a for a in n.attribute if a.name != "accuracy_level"]
        del n.attribute[:]
        n.attribute.extend(keep)
        node_level = level_8bit if bits == 8 and level_8bit else level
        if node_level:
            n.attribute.append(helper.make_attribute("accuracy_level", int(node_level)))
        count += 1
    return count


def set_accuracy_level(path: Path, level: int, level_8bit: int = 0) -> int:
    """:func:`apply_accuracy_level` on the model at ``path`` (rewritten in place). ORT's
    quantizers and our GPTQ write the nodes without it, so the level is one pass here."""
    import onnx

    model = onnx.load(str(path))
    count = apply_accuracy_level(model, level, level_8bit)
    if count:
        onnx.save(model, str(path))
    return count


# ---------------------------------------------------------------- the kernel check

def check_kernels(path: Path, allow_fp_head: bool = False, allow_fp=()) -> dict:
    """ORT-optimize the model (as the runtime will) and count its kernels; a float MatMul/Gemm
    left with a constant weight means a layer silently stayed FP. ``allow_fp``: node names
    meant to stay float (an MoE model's gates), listed as ``float_by_design``."""
    import onnx

    from moqe_compile.backends.onnxruntime_cpu import optimized_model_bytes

    g = onnx.load_from_string(optimized_model_bytes(path, "extended")).graph
    inits = {i.name for i in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    float_w = [n.name for n in g.node if n.op_type in FLOAT_MATMULS and len(n.input) > 1 and n.input[1] in inits
               and not (allow_fp_head and "logits" in n.output)]
    by_design = [n for n in float_w if n in set(allow_fp)]
    float_w = [n for n in float_w if n not in set(allow_fp)]
    kernels = {k: ops[k] for k in INTEGER_KERNELS if ops[k]}
    # MatMulNBits with float zero points (ORT's HQQ writes them) misses MLAS' fast 4-bit path
    # (docs/results.md#smollm2-135m-int8-and-int4), so the report says so.
    init_type = {i.name: i.data_type for i in g.initializer}
    slow = sum(1 for n in g.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]
               and init_type.get(n.input[3]) == 1)
    levels = collections.Counter(next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                                 for n in g.node if n.op_type == "MatMulNBits")
    out = {"ok": not float_w and bool(kernels), "kernels": kernels, "float_weight_matmuls": float_w,
           "embedding_gathers": ops["Gather"], "matmulnbits_float_zero_points": slow}
    if levels:
        out["matmulnbits_accuracy_levels"] = {str(k): v for k, v in sorted(levels.items())}
    if allow_fp:
        out["float_by_design"] = by_design
    return out
