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
