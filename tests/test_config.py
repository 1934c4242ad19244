from pathlib import Path

import pytest

from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe, load_recipe
from moqe_compile.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


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
    ('[router]\nheads = 4\n', "heads \\* head_dim = 32"),
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
