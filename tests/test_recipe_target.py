"""The ``[target]`` recipe section: typed, checked, serialized to the manifest only when set."""

from __future__ import annotations

import json

import pytest

from moqe_compile.errors import ConfigError
from moqe_compile.recipe import TargetConfig
from moqe_compile.tasks.causal_lm.config import LMBuildConfig
from moqe_compile.tasks.image.config import BuildConfig, load_recipe


def test_target_round_trips_through_the_manifest():
    cfg = BuildConfig(target=TargetConfig(max_drop=0.3, cost="weight_bits", batch=8, search_minutes=2.5))
    blob = json.loads(json.dumps(cfg.to_manifest()))
    assert blob["_data"]["target"] == {"max_drop": 0.3, "cost": "weight_bits", "batch": 8, "search_minutes": 2.5}
    back = BuildConfig.from_manifest(blob)
    assert back.target == cfg.target and back.target.enabled


def test_a_recipe_without_target_keeps_its_manifest_unchanged():
    blob = BuildConfig().to_manifest()
    assert "target" not in blob["_data"]
    assert BuildConfig.from_manifest(blob).target == TargetConfig() and not TargetConfig().enabled
    assert "target" not in LMBuildConfig().to_manifest()["_data"]


def test_lm_recipe_carries_a_target_too():
    cfg = LMBuildConfig(target=TargetConfig(max_drop=5.0, cost="weight_bits"))
    assert LMBuildConfig.from_manifest(cfg.to_manifest()).target.max_drop == 5.0


def test_target_section_from_toml(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[target]\nmax_drop = 1\ncost = "size"\n')
    t = load_recipe(p).target
    assert (t.max_drop, t.cost, t.batch) == (1.0, "size", 1) and isinstance(t.max_drop, float)


@pytest.mark.parametrize("body, msg", [
    ('cost = "speed"', "cost"), ("max_drop = -0.1", "max_drop"), ("batch = 0", "batch"),
    ("search_minutes = 0", "search_minutes"), ("budget = 1", "unknown key"), ('max_drop = "0.5"', "type float"),
])
def test_bad_target_sections_are_refused(tmp_path, body, msg):
    p = tmp_path / "r.toml"
    p.write_text(f"[target]\n{body}\n")
    with pytest.raises(ConfigError, match=msg):
        load_recipe(p)
