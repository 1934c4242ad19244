"""The LM head's width (``head_bits``), read off the written graph whatever quantizer wrote it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from ...models import make_tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from moqe_compile.tasks.causal_lm.model import export_decoder, load_causal_lm
    from moqe_compile.tasks.causal_lm.steps import calib_feeds

    tmp = tmp_path_factory.mktemp("lm")
    model, _ = load_causal_lm("transformers", str(make_tiny_lm(tmp / "model")))
    spec = export_decoder(model, tmp / "fp.onnx")
    ids = np.random.default_rng(0).integers(3, 64, (4, 32))
    return tmp / "fp.onnx", calib_feeds(ids, spec)


def _matmul_weights(path):
    """{node writing logits or not: [(op, bits)]} from the graph alone: MatMulNBits' bits
    attribute, 32 for a float MatMul with a constant weight."""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}
    head, body = [], []
    for n in g.node:
        if n.op_type == "MatMulNBits":
            bits = next(a.i for a in n.attribute if a.name == "bits")
        elif n.op_type == "MatMul" and n.input[1] in inits:
            bits = 32
        else:
            continue
        (head if "logits" in n.output else body).append(bits)
    return head, body


@pytest.mark.parametrize("weights", ["rtn", "hqq", "gptq"])
@pytest.mark.parametrize("head_bits", [None, 4, 32])
def test_the_head_has_its_own_width(exported, tmp_path, weights, head_bits):
    from moqe_compile.quantize.nbits import check_kernels, graph_weight_bits
    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx

    fp, feeds = exported
    spec = {"name": "e", "preset": f"w4-{weights}"} | ({} if head_bits is None else {"head_bits": head_bits})
    r = expert_from_dict(spec)
    quantize_onnx(fp, r, tmp_path / "q.onnx", feeds)
    head, body = _matmul_weights(tmp_path / "q.onnx")
    want = 8 if head_bits is None else head_bits  # the default keeps the head at 8 bits
    assert head == [want]
    assert body and set(body) == {4}  # 2 layers x 7 projections
    assert len(body) == 14
    # The mean counts the head (64 x 64) at its width beside the 14 body matrices.
    d, ffn, kv = 64, 128, 32
    body_w = 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn)
    assert graph_weight_bits(tmp_path / "q.onnx")["mean_weight_bits"] == pytest.approx(
        (4 * body_w + want * d * 64) / (body_w + d * 64), abs=1e-4)
    assert check_kernels(tmp_path / "q.onnx", allow_fp_head=want == 32)["ok"]


def test_w8a8_head_is_int8_or_float(exported, tmp_path):
    import onnx

    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx

    fp, feeds = exported
    for hb, op in ((8, "MatMulInteger"), (32, "MatMul")):
        quantize_onnx(fp, expert_from_dict({"name": "e", "preset": "w8a8-rtn", "head_bits": hb}),
                      tmp_path / "q.onnx", feeds)
        g = onnx.load(str(tmp_path / "q.onnx")).graph
        writer = {o: n for n in g.node for o in n.output}
        node = writer["logits"]
        while node.op_type not in ("MatMul", "MatMulInteger"):  # through the dequantizing Mul/Cast
            node = next(writer[i] for i in node.input if i in writer and writer[i].op_type != "DynamicQuantizeLinear")
        assert node.op_type == op


def test_true_sequential_gptq_sees_the_quantized_inputs(exported, tmp_path):
    """Layer 0's q/k/v read the FP stream in both orders, so their codes equal the one-pass
    (FP-graph Hessian) ones; o_proj reads the output of quantized q/k/v, so its codes change."""
    import onnx
    from onnx import numpy_helper

    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx
    from moqe_compile.tasks.causal_lm.model import load_causal_lm

    fp, feeds = exported
    model, _ = load_causal_lm("transformers", str(fp.parent / "model"))
    ids = np.concatenate([f["input_ids"] for f in feeds])
    codes = {}
    for seq in (False, True):
        r = expert_from_dict({"name": "e", "preset": "w4-gptq", "gptq_sequential": seq})
        quantize_onnx(fp, r, tmp_path / f"q{seq}.onnx", feeds, model=model, calib_ids=ids)
        g = onnx.load(str(tmp_path / f"q{seq}.onnx")).graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        nodes = [n for n in g.node if n.op_type == "MatMulNBits"]
        codes[seq] = {n.name: inits[n.input[1]] for n in nodes}
    # Read the roles off the graph: layer 0's q/k/v share the first projection's input; o and
    # down each read an input of their own (down's is the MLP width, K = 128); the head writes logits.
    K = {n.name: next(a.i for a in n.attribute if a.name == "K") for n in nodes}
    readers = {}
    for n in nodes:
        readers.setdefault(n.input[0], []).append(n.name)
    qkv0 = set(readers[nodes[0].input[0]])
    alone = {n.name for n in nodes if len(readers[n.input[0]]) == 1 and "logits" not in n.output}
    o_and_down = {n for n in alone if K[n] in (64, 128)}
    assert len(codes[True]) == 15 and len(qkv0) == 3 and len(o_and_down) == 4 and sum(K[n] == 128 for n in alone) == 2
    same = {k for k in codes[True] if np.array_equal(codes[True][k], codes[False][k])}
    assert qkv0 <= same
    assert not o_and_down & same


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_three_bit_experts_run_in_four_bit_codes_and_count_as_three_bits(exported, tmp_path, weights):
    import onnxruntime as ort

    from moqe_compile.quantize.nbits import check_kernels, graph_weight_bits
    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx

    fp, feeds = exported
    quantize_onnx(fp, expert_from_dict({"name": "e", "preset": f"w4-{weights}", "bits": 3}), tmp_path / "q3.onnx", feeds)
    quantize_onnx(fp, expert_from_dict({"name": "e", "preset": f"w4-{weights}"}), tmp_path / "q4.onnx", feeds)
    head, body = _matmul_weights(tmp_path / "q3.onnx")
    assert head == [8] and set(body) == {4} and len(body) == 14  # the kernel's storage width
    d, ffn, kv = 64, 128, 32
    body_w = 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn)
    assert graph_weight_bits(tmp_path / "q3.onnx")["mean_weight_bits"] == pytest.approx(
        (3 * body_w + 8 * d * 64) / (body_w + d * 64), abs=1e-4)
    assert check_kernels(tmp_path / "q3.onnx")["ok"]
    logits = {}
    for b in ("q3", "q4"):
        sess = ort.InferenceSession(str(tmp_path / f"{b}.onnx"), providers=["CPUExecutionProvider"])
        logits[b] = sess.run(["logits"], feeds[0])[0]
    ref = ort.InferenceSession(str(fp), providers=["CPUExecutionProvider"]).run(["logits"], feeds[0])[0]
    # A coarser grid: further from FP than 4 bits on the same windows, but still the same model.
    e3, e4 = (float(np.abs(logits[b] - ref).mean()) for b in ("q3", "q4"))
    assert e4 < e3 < 10 * e4


@pytest.mark.parametrize("weights", ["rtn", "hqq", "gptq"])
@pytest.mark.parametrize("head_bits", [8, 32])
def test_high_precision_nodes_are_written_at_8_bits(exported, tmp_path, weights, head_bits):
    import onnx

    from moqe_compile.quantize.nbits import check_kernels, const_matmuls
    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx

    fp, feeds = exported
    body = [n.name for n in const_matmuls(onnx.load(str(fp)), set())[0] if "logits" not in n.output]
    kept = [body[0], body[-1]]  # the first layer's first projection and the last down projection
    r = expert_from_dict({"name": "e", "preset": f"w4-{weights}", "head_bits": head_bits, "high_precision_nodes": kept})
    quantize_onnx(fp, r, tmp_path / "q.onnx", feeds)
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    width = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in g.node if n.op_type == "MatMulNBits"}
    # MatMulNBits node names carry the source MatMul's name first.
    at = {b: next(w for n, w in width.items() if n.startswith(b)) for b in body}
    assert {b: at[b] for b in kept} == {b: 8 for b in kept}
    assert set(at[b] for b in body if b not in kept) == {4}
    head, _ = _matmul_weights(tmp_path / "q.onnx")
    assert head == [head_bits]
    assert check_kernels(tmp_path / "q.onnx", allow_fp_head=head_bits == 32)["ok"]


def test_high_precision_nodes_must_name_body_matmuls(exported, tmp_path):
    from moqe_compile.errors import BuildError
    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx

    fp, feeds = exported
    r = expert_from_dict({"name": "e", "preset": "w4-gptq", "high_precision_nodes": ["no_such_matmul"]})
    with pytest.raises(BuildError, match=r"high_precision_nodes \['no_such_matmul'\] are not quantized MatMuls"):
        quantize_onnx(fp, r, tmp_path / "q.onnx", feeds)
