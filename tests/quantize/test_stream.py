"""The sequential pass computes its tensors with :class:`TensorStream` (each node run once)
instead of one whole-graph session per tensor: same tensors, same experts."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from moqe_compile.backends.onnxruntime_cpu import session
from moqe_compile.quantize import prepare_for_quantization, sequential
from moqe_compile.quantize.stream import TensorStream
from moqe_compile.tasks.image import experts
from moqe_compile.tasks.image.config import ExpertRecipe

from ..models import CROP, write_cnn, write_residual_cnn

MODELS = {"cnn": write_cnn, "residual-cnn": write_residual_cnn}


@pytest.fixture(scope="module", params=sorted(MODELS))
def prepared(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    x = np.random.default_rng(5).normal(size=(40, 3, CROP, CROP)).astype(np.float32)
    return prepare_for_quantization(MODELS[request.param](d), d / "prep.onnx"), x, d


def _qdq(prepared):
    """A Q/DQ graph of the model (no sequential pass) to stream through."""
    prep, x, d = prepared
    out = d / "plain.onnx"
    experts.build_expert(prep, "input", x, ExpertRecipe(name="plain", calibration="mse"), ["onnxruntime-cpu"],
                         {"onnxruntime-cpu": out}, d / "plain.json", d)
    return onnx.load(str(out))


def _whole(model, name, x):
    """The oracle: ONNX Runtime on the whole graph with ``name`` as an extra output, every node
    evaluated as written (no Q/DQ fusion, which rounds differently)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(m.SerializeToString(), optimization="none")
    parts = [sess.run([name], {"input": x[i : i + 16]})[0] for i in range(0, len(x), 16)]  # 16, 16, 8 samples
    return parts[0] if parts[0].shape == parts[-1].shape else np.concatenate(parts)  # a constant once


def test_every_tensor_matches_the_whole_graph_and_each_node_runs_once(prepared):
    q = _qdq(prepared)
    x = prepared[1]
    st = TensorStream(q, "input", x, batch=16, optimization="none")
    held = []
    for n in q.graph.node:
        np.testing.assert_allclose(st.get(n.output[0]), _whole(q, n.output[0], x), rtol=0, atol=0)
        held.append(sum(t in st.varying for t in st.env))  # per-sample tensors held
    assert st.node_runs == len(q.graph.node)  # O(L) node runs, where one session per tensor is O(L^2)
    assert max(held) <= 3  # the frontier (with a skip branch), not every tensor computed so far


def test_an_edit_reaches_what_was_computed_from_it(prepared):
    q = _qdq(prepared)
    x = prepared[1]
    st = TensorStream(q, "input", x, optimization="none")
    k, act_q = [(k, n) for k, n in enumerate(q.graph.node) if n.op_type == "QuantizeLinear" and n.input[0] != "input"][0]
    st.pos = k  # the caller edits this node: what it reads stays
    dq_out = next(n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] == act_q.output[0])
    before = st.get(dq_out).copy()
    scale = next(i for i in q.graph.initializer if i.name == act_q.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
    st.changed([scale.name])
    after = st.get(dq_out)
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, _whole(q, dq_out, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["strongest", "w4a8-strongest"])
def test_stream_engine_writes_the_same_expert_as_the_whole_graph_engine(prepared, preset, monkeypatch):
    """Tolerance: integers (weights, biases, zero points) at most one grid step apart on at most
    0.5% of values, scales within 1e-4 relative (the two engines fuse differently, so float32
    activations differ in their last bits and so do the scales fitted to them); measured: integers
    identical, largest scale difference 3.0e-5 relative (the fitted CNN's logits scale)."""
    prep, x, d = prepared
    got = {}
    for engine in ("whole-graph", "stream"):
        monkeypatch.setattr(experts, "refine", functools.partial(sequential.refine, engine=engine))
        out = d / f"{preset}.{engine}.onnx"
        info = experts.build_expert(prep, "input", x, ExpertRecipe.from_preset("s", preset), ["onnxruntime-cpu"],
                                    {"onnxruntime-cpu": out}, d / f"{engine}.json", d)
        assert info["steps"]["gptq_layers"] >= 4 and info["steps"]["bias_corrected_layers"] >= 4
        got[engine] = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    old, new = got["whole-graph"], got["stream"]
    assert old.keys() == new.keys()
    ints = [k for k in old if np.issubdtype(old[k].dtype, np.integer)]
    floats = [k for k in old if k not in ints]
    steps = np.concatenate([np.abs(old[k].astype(np.int64) - new[k]).ravel() for k in ints])
    assert steps.max() <= 1 and (steps > 0).mean() <= 0.005
    for k in floats:
        np.testing.assert_allclose(new[k], old[k], rtol=1e-4, err_msg=k)


def test_activation_fit_is_the_same_in_chunks(monkeypatch):
    v = np.random.default_rng(2).standard_t(3, size=300_000).astype(np.float32)
    whole = sequential.fit_activation_mse(v, onnx.TensorProto.UINT8, symmetric=False)
    monkeypatch.setattr(sequential, "HIST_CHUNK", 7_001)
    assert sequential.fit_activation_mse(v, onnx.TensorProto.UINT8, symmetric=False) == whole
