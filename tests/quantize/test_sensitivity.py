"""Layer sensitivity quantizes exactly one weight layer per run: the graph of each run has
Q/DQ around that Conv/Gemm and nowhere else."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from moqe_compile.evaluate.losses import kl_to_fp
from moqe_compile.quantize import prepare_for_quantization, sensitivity
from moqe_compile.quantize.graph import weight_layers

from ..models import CROP


@pytest.fixture
def runs(tiny_onnx, tmp_path, monkeypatch):
    """(the prepared FP graph, the ranking, the graph of every quantized run in order)."""
    prepared = prepare_for_quantization(tiny_onnx, tmp_path / "prepared.onnx")
    graphs, run = [], sensitivity._run

    def recording_run(path, input_name, x):
        graphs.append(onnx.load(str(path)))
        return run(path, input_name, x)

    monkeypatch.setattr(sensitivity, "_run", recording_run)
    x = np.random.default_rng(0).normal(size=(16, 3, CROP, CROP)).astype(np.float32)
    fp = onnx.load(str(prepared))
    ranking = sensitivity.layer_sensitivity(prepared, fp.graph.input[0].name, x, tmp_path, kl_to_fp, n=16,
                                            show_progress=False)
    return fp, ranking, graphs[1:]  # the first run is the FP model's


def test_each_run_quantizes_one_weight_layer_and_nothing_else(runs):
    fp, ranking, graphs = runs
    layers = weight_layers(fp)
    assert len(graphs) == len(layers) == len(ranking) == 4
    for layer, g in zip(layers, graphs):
        ops = Counter(n.op_type for n in g.graph.node)
        # One activation in, one out (Q + DQ each), the weight and the bias (DQ each).
        assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 4, (layer.node, ops)
        # ORT renames a quantized graph output's producer side to keep the output's name.
        q_inputs = [n.input[0].removesuffix("_QuantizeLinear_Input") for n in g.graph.node
                    if n.op_type == "QuantizeLinear"]
        assert sorted(q_inputs) == sorted([layer.input, layer.output]), layer.node
        # Every DequantizeLinear feeds the layer or what read the layer's output in FP.
        readers = {n.name for n in fp.graph.node if layer.output in n.input} | {layer.node}
        dq_out = {o for n in g.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        assert {n.name for n in g.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                and set(n.input) & dq_out} <= readers, layer.node


def test_ranking_is_sorted_and_names_every_layer(runs):
    fp, ranking, _ = runs
    assert sorted(r["node"] for r in ranking) == sorted(l.node for l in weight_layers(fp))
    kls = [r["kl_to_fp"] for r in ranking]
    assert kls == sorted(kls, reverse=True) and all(k >= 0 for k in kls)
    assert all(0 <= r["fp_top1_agreement"] <= 1 for r in ranking)


def test_each_kl_equals_one_layer_quantized_by_onnxruntime_directly(tiny_onnx, tmp_path):
    """The oracle: for each weight layer, ORT's ``quantize_static`` called here with that one
    node and its op type (U8S8, MinMax, per-channel symmetric weights: the CPU expert's
    settings) on the same samples, run in a plain session, KL to FP computed in numpy."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from moqe_compile.quantize.qdq import reduce_range_for

    from ..models import class_batch

    prepared = prepare_for_quantization(tiny_onnx, tmp_path / "prepared.onnx")
    x = class_batch(16, seed=4)[0]  # inputs the model tells apart: layers matter differently
    name = onnx.load(str(prepared)).graph.input[0].name
    ranking = {r["node"]: r for r in sensitivity.layer_sensitivity(prepared, name, x, tmp_path, kl_to_fp, n=16,
                                                                 show_progress=False)}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x}])

        def get_next(self):
            return next(self.it, None)

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]

    def log_softmax(z):
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    fp = log_softmax(run(prepared))
    kls = {}
    for layer in weight_layers(onnx.load(str(prepared))):
        q = tmp_path / f"{layer.node}.onnx"
        quantize_static(str(prepared), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range_for("onnxruntime-cpu"), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=[layer.node], op_types_to_quantize=[layer.op],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        y = log_softmax(run(q))
        kls[layer.node] = float((np.exp(fp) * (fp - y)).sum(-1).mean())
    assert set(kls) == set(ranking)
    # The layers' KLs differ by orders of magnitude, which a run quantizing more than its
    # one layer would blur; the same quantizer on the same data differs only in how the KL
    # is summed (float32 there, float64 here): 1e-3 of each KL, plus 1e-7 for KLs near zero.
    for node, kl in kls.items():
        assert ranking[node]["kl_to_fp"] == pytest.approx(kl, rel=1e-3, abs=1e-7), node
    assert len({round(np.log10(k + 1e-12)) for k in kls.values()}) > 1
