"""Sparse MoE causal LMs through the LM build: ONNX export of the Mixtral / Qwen2-MoE / OLMoE
layouts (dense export form, checked against the sparse torch model), gates left FP by every
recipe, and a bundle with ``moe-expert-bits`` experts whose allocation the manifest records and
``inspect`` shows."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from ...models import MOE_LAYOUTS as LAYOUTS  # noqa: E402
from ...models import make_tiny_moe, write_corpus  # noqa: E402


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_keeps_gates_fp_and_experts_quantizable(layout, tmp_path):
    import onnx

    from moqe_compile.tasks.causal_lm.config import expert_from_dict
    from moqe_compile.tasks.causal_lm.model import export_decoder, load_causal_lm
    from moqe_compile.tasks.causal_lm.moe import find_moe, gate_nodes, onnx_moe_nodes
    from moqe_compile.quantize.nbits import check_kernels
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx

    model, _ = load_causal_lm("transformers", str(make_tiny_moe(tmp_path / "m", layout, steps=5, layers=1)))
    moe = find_moe(model)
    fp = tmp_path / "fp.onnx"
    export_decoder(model, fp)  # raises unless the ONNX graph matches the sparse torch model
    where = onnx_moe_nodes(onnx.load(str(fp)), moe)
    assert len(where["experts"]) == 4 and len(where["gates"]) == (2 if layout == "qwen2_moe" else 1)
    gates = gate_nodes(fp, moe)
    q = tmp_path / "q.onnx"
    quantize_onnx(fp, expert_from_dict({"name": "a", "preset": "w4-rtn"}), q, [], exclude_nodes=gates)
    check = check_kernels(q, allow_fp=gates)
    assert check["ok"] and sorted(check["float_by_design"]) == sorted(gates)
    assert not check_kernels(q)["ok"]  # without the allowance the FP gates are reported


def _cfg(tmp, experts, history=""):
    from moqe_compile.tasks.causal_lm.config import LMBuildConfig

    return LMBuildConfig.from_dict({
        "task": "causal-lm", "model": {"source": "transformers", "path": str(tmp / "model"), "gate_history": history},
        "data": {"corpora": [str(tmp / "corpus.txt")], "seq_len": 32, "calibration_sequences": 4,
                 "max_sequences": 12},
        "experts": experts, "controls": {"copies": 0},
        "router": {"prefix_tokens": 8, "epochs": 1}})


MOE_EXPERTS = [
    {"name": "moe-combined", "preset": "moe-expert-bits", "moe_bits": 6.0},  # GPTQ, 2 of 4 experts at 8 bits
    {"name": "moe-frequency", "preset": "moe-expert-bits", "moe_bits": 3.0, "weights": "rtn",  # 2 at 2 bits
     "moe_allocation": "frequency", "moe_widths": [2, 4]},
    {"name": "w4-rtn", "preset": "w4-rtn"},
]


@pytest.fixture(scope="module")
def moe_bundle(tmp_path_factory):
    from moqe_compile.build import build as build_lm

    tmp = tmp_path_factory.mktemp("moe-lm")
    make_tiny_moe(tmp / "model", "mixtral", steps=30)
    write_corpus(tmp / "corpus.txt")
    return build_lm(_cfg(tmp, MOE_EXPERTS), tmp / "bundle", quiet=True), tmp


def test_manifest_records_the_allocation(moe_bundle):
    from moqe_compile.bundle import read_bundle

    m = read_bundle(moe_bundle[0]).manifest
    assert m["model"]["moe"]["layout"] == "mixtral" and m["model"]["moe"]["num_experts"] == 4
    ex = {e["name"]: e for e in m["experts"]}
    a = ex["moe-combined"]["moe_bits"]
    assert a["criterion"] == "combined" and a["fallback"] is None and a["gate_history"]["sha256"]
    assert a["mean_bits"] == 6.0 and [sorted(r["bits"]) for r in a["per_layer"]] == [[4, 4, 8, 8]] * 2
    assert len(a["per_layer"][0]["gate_norm_change"]) == 4 and len(a["per_layer"][0]["maxvar"]) == 4
    assert a["matmuls_per_width"] == {"4": 2 * (4 + 2 * 3) + 1, "8": 2 * 2 * 3}  # attention + head at 4 bits
    f = ex["moe-frequency"]["moe_bits"]
    assert f["criterion"] == "frequency" and len(f["per_layer"][0]["frequency"]) == 4
    assert f["matmuls_per_width"]["2"] == 2 * 2 * 3 and f["mean_weight_bits"] < a["mean_weight_bits"]
    usage = np.asarray(f["per_layer"][0]["frequency"])
    assert f["per_layer"][0]["bits"][int(usage.argmax())] == 4  # most routed -> the wider width
    for e in m["experts"]:
        check = e["variants"]["onnxruntime-cpu"]["check"]
        assert check["ok"] and len(check["float_by_design"]) == 2  # the two layers' gates
        assert e["variants"]["onnxruntime-cpu"]["kernels"].get("MatMulNBits", 0) > 0


def test_experts_differ_and_inspect_shows_bits(moe_bundle):
    from moqe_compile.bundle import read_bundle
    from moqe_compile.cli.inspect import render

    b = read_bundle(moe_bundle[0])
    rep = json.loads(b.file("report/report.json").read_text())
    ppl = {k: v["ppl"] for k, v in rep["splits"]["test"]["overall"]["experts"].items()}
    assert len(set(ppl.values())) == 3 and all(np.isfinite(list(ppl.values())))
    text = render(str(moe_bundle[0]))
    assert "moe         mixtral: 2 MoE layers x 4 experts (top-2)" in text
    assert "moe bits combined: mean 6.000 (target 6.0)" in text and "layer  0:" in text


def test_no_history_falls_back_to_maxvar(tmp_path):
    """A checkpoint without gate history (a download): the build's hook says so, allocates by
    MaxVar and records why; an explicit gate_history that does not exist is a recipe error."""
    from moqe_compile.tasks.causal_lm.inspect import _moe_bits_lines
    from moqe_compile.errors import ConfigError
    from moqe_compile.tasks.causal_lm.config import LMModelConfig, expert_from_dict
    from moqe_compile.tasks.causal_lm.steps import calib_feeds
    from moqe_compile.tasks.causal_lm.model import export_decoder, load_causal_lm
    from moqe_compile.tasks.causal_lm.moe import find_moe
    from moqe_compile.tasks.causal_lm.moe_bits import build_moe_expert

    d = make_tiny_moe(tmp_path / "model", "olmoe", steps=0, history=False, layers=1)
    model, _ = load_causal_lm("transformers", str(d))
    moe, fp = find_moe(model), tmp_path / "fp.onnx"
    spec = export_decoder(model, fp)
    ids = np.random.default_rng(0).integers(3, 33, (2, 16))
    r = expert_from_dict({"name": "g", "preset": "moe-expert-bits", "weights": "rtn", "moe_allocation": "gate-norm"})
    cfg = LMModelConfig(source="transformers", path=str(d))
    said = []
    rec = build_moe_expert(model, moe, r, cfg, ids, fp, tmp_path / "q.onnx", calib_feeds(ids, spec), said.append)
    assert rec["requested"] == "gate-norm" and rec["criterion"] == "maxvar" and "not found" in rec["fallback"]
    assert any("max intra-neuron variance" in m for m in said) and (tmp_path / "q.onnx").is_file()
    assert any(line.strip().startswith("FALLBACK") for line in _moe_bits_lines(rec))
    cfg.gate_history = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="gate_history"):
        build_moe_expert(model, moe, r, cfg, ids, fp, tmp_path / "q2.onnx", calib_feeds(ids, spec))
