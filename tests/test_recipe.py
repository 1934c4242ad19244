"""The shared recipe layer: sections built from plain data, presets, the shared sections, manifests."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import moqe_compile.recipe
from moqe_compile.errors import ConfigError
from moqe_compile.recipe import (ControlsConfig, GateConfig, Recipe, SplitConfig, build_section, check_experts,
                                 read_recipe_toml)


@dataclass
class Part:
    PRESETS = {"big": {"size": 8, "tags": ["x"]}}

    name: str = ""
    preset: str = ""
    size: int = 1
    scale: float = 1.0
    tags: list[str] = field(default_factory=list)


@dataclass
class Whole(Recipe):
    MANIFEST_TYPE = "Whole"
    VERSION = 3
    WRITTEN_WHEN_SET = ("controls.copies_of",)

    parts: list[Part] = field(default_factory=list)
    controls: ControlsConfig = field(default_factory=ControlsConfig)


def test_unknown_keys_name_the_key_and_the_sections_keys():
    with pytest.raises(ConfigError) as e:
        build_section(Part, {"sise": 2}, "parts")
    assert "[parts] unknown key(s) ['sise']" in str(e.value) and "valid keys: ['name', 'preset', 'scale'" in str(e.value)
    with pytest.raises(ConfigError, match=r"\[recipe\] unknown key\(s\) \['partz'\]"):
        Whole.from_dict({"partz": []})


def test_types_are_checked_and_ints_widen_to_floats():
    assert build_section(Part, {"scale": 2}, "p").scale == 2.0
    with pytest.raises(ConfigError, match="p.size = 'two' must be of type int"):
        build_section(Part, {"size": "two"}, "p")
    with pytest.raises(ConfigError, match="must be a list"):
        build_section(Part, {"tags": "x"}, "p")
    with pytest.raises(ConfigError, match=r"\[p\] must be a table"):
        build_section(Part, [1], "p")


def test_a_section_class_with_presets_applies_them_first():
    # The builder reads the class's PRESETS: any section class, not one hard-wired class.
    p = build_section(Part, {"preset": "big", "tags": ["y"]}, "p")
    assert (p.size, p.tags) == (8, ["y"])
    with pytest.raises(ConfigError, match=r"\[p\] preset = 'huge' is not one of \['big'\]"):
        build_section(Part, {"preset": "huge"}, "p")
    assert Whole.from_dict({"parts": [{"preset": "big"}]}).parts[0].size == 8


def test_manifest_round_trip_and_version():
    w = Whole(parts=[Part(name="a")])
    blob = w.to_manifest()
    assert (blob["_type"], blob["_version"]) == ("Whole", 3)
    assert Whole.from_manifest(blob) == w
    with pytest.raises(ConfigError, match="'Whole' version 2; this release reads Whole version 3"):
        Whole.from_manifest({**blob, "_version": 2})


def test_keys_written_only_when_set():
    assert "copies_of" not in Whole().to_dict()["controls"]
    set_ = Whole(controls=ControlsConfig(copies_of="a"))
    assert set_.to_dict()["controls"]["copies_of"] == "a"
    assert Whole.from_manifest(set_.to_manifest()) == set_


@pytest.mark.parametrize("p", [0.0, 1.0, 7.0, -0.05])
def test_gate_p_value_must_be_a_probability(p):
    with pytest.raises(ConfigError, match=f"p_value = {p!r} must be in \\(0, 1\\)"):
        GateConfig(p_value=p)


def test_gate_and_controls_defaults():
    assert (GateConfig().p_value, GateConfig().force_routing) == (0.05, False)
    c = ControlsConfig()
    assert (c.copies, c.copies_of, c.copies_router, c.seed) == (3, "", True, 0)
    with pytest.raises(ConfigError, match="copies = 1 must be 0"):
        ControlsConfig(copies=1)


def test_copies_of_must_name_an_expert():
    experts = [Part(name="a"), Part(name="b")]
    ControlsConfig(copies_of="b").check_copies_of(experts)
    ControlsConfig(copies=0, copies_of="zz").check_copies_of(experts)  # no copies: nothing to check
    with pytest.raises(ConfigError, match="copies_of = 'zz' is not an expert name; experts: \\['a', 'b'\\]"):
        ControlsConfig(copies_of="zz").check_copies_of(experts)


def test_at_least_two_experts_with_unique_names():
    check_experts([Part(name="a"), Part(name="b")])
    with pytest.raises(ConfigError, match="lists 1 expert\\(s\\); MoQE needs at least 2"):
        check_experts([Part(name="a")])
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        check_experts([Part(name="a"), Part(name="b"), Part(name="a")])


def test_split_fractions_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1.35"):
        SplitConfig(test=0.5)


def test_read_recipe_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_recipe_toml(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('task = "x"\n')
    assert read_recipe_toml(ok) == ({"task": "x"}, tmp_path.resolve())


def test_recipe_is_the_bottom_layer():
    # It imports moqe_compile.errors, the bundle's name rule (bundle.manifest: a lower layer,
    # torch-free) and the standard library, never a task plug-in.
    tree = ast.parse(Path(moqe_compile.recipe.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {m for m in imported if m.split(".")[0] == "moqe_compile"}
    assert ours == {"moqe_compile.errors", "moqe_compile.bundle.manifest"}
    assert all(m.split(".")[0] in sys.stdlib_module_names or m == "__future__" for m in imported - ours)
