import pytest

from moqe_compile.tasks.image.config import BuildConfig, RouterConfig, load_recipe
from moqe_compile.errors import ConfigError


def test_default_preset_is_the_documented_router():
    c = RouterConfig()
    assert (c.preset, c.input_size, c.downsample, c.channels, c.se, c.heads, c.head_dim, c.quantize) == (
        "default", 32, "avgpool", [16, 32, 64], [True, True, True], 8, 8, "none")
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
    ({"preset": "tiny"}, "preset = 'tiny' is not one of"),
    ({"targets": "oracle"}, "targets = 'oracle' is not one of"),
    ({"stabilizers": ["dropout"]}, "stabilizers = 'dropout' is not one of"),
    ({"downsample": "max"}, "downsample = 'max' is not one of"),
    ({"quantize": "int4"}, "quantize = 'int4' is not one of"),
    ({"temperature": 0.0}, "temperature = 0.0 must be > 0"),
    ({"usage_bias_decay": 1.0}, "usage_bias_decay = 1.0 must be in"),
    ({"balance_weight": -1.0}, "balance_weight = -1.0 must be >= 0"),
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
