"""Causal-LM vertical slice on a tiny random Llama: data splits, export, experts,
bundle, runtime (score + KV-cache generation), moqe-run and moqe-compile eval (the recipe itself:
tests/tasks/causal_lm/test_config.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

from ...models import LM_EXPERTS as EXPERTS  # noqa: E402


def test_manifest_kernels_and_tokenizer(lm_bundle):
    from moqe_compile.bundle import read_bundle

    b = read_bundle(lm_bundle[0])
    m = b.manifest
    assert m["task"]["kind"] == "causal-lm" and m["routing"]["granularity"] == "per-sequence"
    assert b.file(m["task"]["tokenizer"]["path"]).is_file()
    for e in m["experts"]:
        k = e["variants"]["onnxruntime-cpu"]["kernels"]
        check = e["variants"]["onnxruntime-cpu"]["check"]
        assert check["ok"] and not check["float_weight_matmuls"]
        expected = "MatMulNBits" if e["recipe"]["scheme"] == "nbits" else "MatMulIntegerToFloat"
        assert k.get(expected, 0) > 0, (e["name"], k)
        if e["recipe"]["scheme"] == "nbits":  # the recipe's level (0: unset), the 8-bit head's own
            level, wide = str(e["recipe"].get("accuracy_level", 0)), str(e["recipe"].get("accuracy_level_8bit", 4))
            graph = onnx.load_from_string(b.graph(e["variants"]["onnxruntime-cpu"]["path"]).model).graph
            heads = [n for n in graph.node if n.op_type == "MatMulNBits"
                     and next(a.i for a in n.attribute if a.name == "bits") == 8]
            assert [n.output[0] for n in heads] == ["logits"]  # only the head is 8-bit here
            assert check["matmulnbits_accuracy_levels"] == {level: k["MatMulNBits"] - 1, wide: 1}, (e["name"], check)
            # q/k/v and gate/up of each layer as one kernel each (quantize/nbits_fuse.py)
            layers = m["model"]["decoder"]["layers"]
            assert e["fused_matmulnbits"] == 2 * layers and k["MatMulNBits"] == 4 * layers + 1, (e["name"], k)
        assert check["embedding_gathers"] >= 1  # the embedding stays an FP Gather
    awq = next(e for e in m["experts"] if e["name"] == "w4-awq")
    # One per scaling group: norm -> q/k/v, norm -> gate/up, up -> down (grouped-query: no v -> o).
    assert len(awq["awq_alphas"]) == 3 * m["model"]["decoder"]["layers"]
    rep = json.loads(b.file("report/report.json").read_text())
    t = rep["splits"]["test"]["overall"]
    assert t["fp"]["ppl_ci95"][0] <= t["fp"]["ppl"] <= t["fp"]["ppl_ci95"][1]
    assert t["oracle"]["ppl"] <= min(r["ppl"] for r in t["experts"].values()) + 1e-9
    assert m["splits"]["disjoint_by"] == "document"
    # Controls: copies of the first calibration-dependent expert (w4-awq), never shipped as experts.
    ctl = m["report"]["controls"]
    assert ctl["of"] == "w4-awq" and len(ctl["copies"]) == 2 and "copy0" not in [e["name"] for e in m["experts"]]
    co = t["controls"]["copies_oracle"]
    assert co["of"] == "w4-awq" and co["router"]["ppl"] > 0 and "p_value" in co["moqe_vs_copies"]
    assert co["ppl"] <= min(r["ppl"] for r in co["copies_metrics"].values()) + 1e-9
    assert t["controls"]["mixture"]["cost_experts_run"] == len(EXPERTS)
    assert m["router"]["gate"]["copies_control"] == "copies router"
    assert t["controls"]["cost_matched"]["applicable"]  # w8a8 (8 bits) beside 4-bit experts
    # The FP embedding table is stored once; every graph references it (never its own copy).
    sh = m["model"]["shared_initializers"]["embedding"]
    assert set(sh["graphs"]) == {"fp/model.onnx", m["router"]["path"],
                                 *(e["variants"]["onnxruntime-cpu"]["path"] for e in m["experts"])}
    assert b.file(sh["path"]).stat().st_size == np.prod(sh["shape"]) * 4
        # The export was checked against torch during the build; its dims must stay symbolic.
    g = onnx.load(str(b.file("fp/model.onnx")), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    d = m["model"]["decoder"]
    assert dims["past_key_values.0.key"] == ["batch", d["kv_heads"], "past_sequence", d["head_dim"]]


def test_cli_run_and_eval(lm_bundle, capsys):
    from moqe_compile.cli.main import main as compile_main
    from moqe_compile.cli.run import main as run_main

    bundle, tmp = lm_bundle
    assert run_main([str(bundle), "--input", "the dog ran .", "--score", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score"]["perplexity"] > 1 and out["generation"]["new_tokens"] <= 3
    assert run_main([str(bundle), "--input", "the dog"]) == 3  # nothing asked: an InputError
    capsys.readouterr()
    assert compile_main(["eval", str(bundle), "--data", str(tmp / "corpus.txt"), "--json", "--repeats", "1",
                         "--resamples", "200", "--out", str(tmp / "ev")]) == 0
    rep = json.loads(capsys.readouterr().out.split("\nreport written")[0])
    assert set(rep["overall"]["experts"]) == set(EXPERTS) and rep["latency_ms"]["median_ms"]["moqe"] > 0
    assert (tmp / "ev" / "report.md").is_file()
    # A text file the build never saw: the copies (not shipped) cannot score it, and it says so.
    assert rep["overall"]["controls"]["copies_oracle"] is None
    assert compile_main(["eval", str(bundle), "--data", "test", "--json", "--no-latency", "--resamples", "200",
                         "--out", str(tmp / "ev2")]) == 0
    rep = json.loads(capsys.readouterr().out.split("\nreport written")[0])
    assert rep["overall"]["controls"]["copies_oracle"]["copies"] == 2


def test_eval_refuses_a_bad_out_before_evaluating(lm_bundle, monkeypatch, capsys):
    """--out inside the bundle, or an existing file, fails at once: the evaluation never starts."""
    from moqe_compile.cli.main import main as compile_main
    from moqe_compile.tasks.causal_lm import eval as lm_eval

    def never(*a, **k):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(lm_eval, "evaluate_lm", never)
    bundle, tmp = lm_bundle
    assert compile_main(["eval", str(bundle), "--out", str(bundle / "report")]) == 3
    assert "inside the bundle" in capsys.readouterr().err
    (tmp / "a-file").write_text("x")
    assert compile_main(["eval", str(bundle), "--out", str(tmp / "a-file")]) == 3
    assert "is not a directory" in capsys.readouterr().err


def test_inspect_renders_lm_bundle(lm_bundle):
    from moqe_compile.cli.inspect import render

    text = render(str(lm_bundle[0]))
    assert "task causal-lm" in text and "MatMulNBits" in text and "w4-gptq" in text


def test_a_self_contained_graph_computes_what_the_bundle_session_computes(lm_bundle):
    """The shared embedding written into the graph: the same logits from one plain ONNX model."""
    import onnxruntime as ort

    from moqe_compile.bundle import read_bundle
    from moqe_compile.tasks.causal_lm.score import DecoderSession

    b = read_bundle(lm_bundle[0])
    m = b.manifest
    d = m["model"]["decoder"]
    rel = m["experts"][0]["variants"]["onnxruntime-cpu"]["path"]
    g = b.graph(rel)
    assert g.shared is not None  # the case that needs the tensor written in
    plain = onnx.load_from_string(g.self_contained())
    assert not any(t.external_data for t in plain.graph.initializer)
    ids = np.array([[1, 5, 7, 2, 9, 4]], np.int64)
    bundled = DecoderSession("bundled", g, d["layers"], d["kv_heads"], d["head_dim"]).logits(ids)
    sess = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past = [np.zeros((1, d["kv_heads"], 0, d["head_dim"]), np.float32) for _ in names[2:]]
    out = sess.run(None, dict(zip(names, [ids, np.ones_like(ids), *past])))[0]
    np.testing.assert_array_equal(out, bundled)
