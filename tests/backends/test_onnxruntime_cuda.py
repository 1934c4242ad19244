"""The ONNX Runtime CUDA session's IOBinding path, run under the CPU provider with a
host-memory device (tests/backends/fakes.py): buffer reuse, binding shapes, one stream per
session and one sync per run. The CUDA provider itself runs in tests/gpu."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from moqe_compile.backends import OrtCpuSession
from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession, cuda_provider_available, fp16_model
from moqe_compile.errors import BackendError, InputError

from .fakes import HostDevice


def host_session(path, device=None):
    return OrtCudaSession("e", path, device=device or HostDevice(), providers=["CPUExecutionProvider"],
                          device_type="cpu")


def test_iobinding_path_matches_plain_session_and_reuses_buffers(tiny_onnx):
    dev = HostDevice()
    s = host_session(tiny_onnx, dev)
    ref = OrtCpuSession("ref", tiny_onnx)
    rng = np.random.default_rng(0)
    for n in (3, 1, 5, 2, 5):
        x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
        np.testing.assert_allclose(s.run(x), ref.run(x), rtol=1e-5, atol=1e-5)
    # buffers grow to the largest batch (3, then 5) and are reused otherwise: 4 tensors x 2 sizes
    assert dev.count("malloc") + dev.count("malloc_host") == 8
    assert dev.count("sync") == 5 and dev.count("stream") == 1
    assert {e[3] for e in dev.log if e[0] == "copy"} == {s.stream}
    s.close()
    assert dev.live() == 0 and dev.count("destroy_stream") == 1


def test_enqueue_binds_device_pointers_with_the_batch_shape(tiny_onnx):
    dev = HostDevice()
    s = host_session(tiny_onnx, dev)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)
    d_in, d_out = dev.malloc(x.nbytes), dev.malloc(s.output_nbytes(4))
    dev.copy(d_in, x.ctypes.data, x.nbytes, "h2d", s.stream)
    with s.lock:
        s.enqueue(d_in, 4, d_out)
    out = np.empty((4, *s.output_tail), np.float32)
    dev.copy(out.ctypes.data, d_out, out.nbytes, "d2h", s.stream)
    np.testing.assert_allclose(out, OrtCpuSession("ref", tiny_onnx).run(x), rtol=1e-5, atol=1e-5)


def test_wrong_shape_is_an_input_error(tiny_onnx):
    with pytest.raises(InputError, match=r"expected \(N, 3, 32, 32\)"):
        host_session(tiny_onnx).run(np.zeros((1, 3, 16, 16), np.float32))


@pytest.mark.skipif(cuda_provider_available(), reason="checks the message without onnxruntime-gpu")
def test_without_onnxruntime_gpu_the_message_says_what_to_install(tiny_onnx):
    with pytest.raises(BackendError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        OrtCudaSession("e", tiny_onnx, device=HostDevice())


def test_fp16_model_keeps_float32_io(tiny_onnx, tmp_path):
    out = fp16_model(tiny_onnx, tmp_path / "fp16.onnx")
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)


def test_graph_mode_keys_graphs_by_size_and_buffers(tiny_onnx):
    dev = HostDevice()
    s = OrtCudaSession("e", tiny_onnx, device=dev, providers=["CPUExecutionProvider"], device_type="cpu",
                       cuda_graph=True, max_graphs=3)
    ref = OrtCpuSession("ref", tiny_onnx)
    rng = np.random.default_rng(2)
    for n in (3, 1, 3, 1):  # run() keeps fixed buffers per graphed size: two graphs, replayed
        x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
        np.testing.assert_allclose(s.run(x), ref.run(x), rtol=1e-5, atol=1e-5)
    assert s.graph_sizes == [1, 3] and s.graph_count == 2
    # other buffers for a size are another graph (a replay reads the addresses bound now)
    x = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    d_in, d_out = dev.malloc(x.nbytes), dev.malloc(s.output_nbytes(3))
    dev.copy(d_in, x.ctypes.data, x.nbytes, "h2d", s.stream)
    s.enqueue(d_in, 3, d_out, graph=True)
    assert s.graph_count == 3 and not s.wants_graph(5)
    s.enqueue(d_in, 2, d_out, graph=True)  # no slot left: runs without a graph
    assert s.graph_count == 3
    out = np.empty((3, *s.output_tail), np.float32)
    dev.copy(out.ctypes.data, d_out, out.nbytes, "d2h", s.stream)
    np.testing.assert_allclose(out[:2], ref.run(x[:2]), rtol=1e-5, atol=1e-5)
    s.close()


def test_folding_constant_dequantize_is_exact_and_leaves_activation_qdq(tiny_bundle):
    import json

    from moqe_compile.backends.onnxruntime_cuda import fold_constant_dequantize

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    path = tiny_bundle / m["experts"][0]["variants"]["onnxruntime-cpu"]["path"]
    model = onnx.load(str(path))
    folded, n = fold_constant_dequantize(model)
    inits = {t.name for t in folded.graph.initializer}
    dq = [nd for nd in folded.graph.node if nd.op_type == "DequantizeLinear"]
    # every Conv/Gemm weight and bias DQ is gone; the activations' Q/DQ pairs remain
    assert n == sum(1 for nd in model.graph.node if nd.op_type == "DequantizeLinear" and nd.input[0] in
                    {t.name for t in model.graph.initializer})
    assert n > 0 and dq and not any(nd.input[0] in inits for nd in dq)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    import onnxruntime as ort

    def run(proto):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no integer kernels
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    np.testing.assert_allclose(run(folded), run(model), rtol=1e-5, atol=1e-5)
    s = host_session(path)
    assert s.folded == n
    s.close()
