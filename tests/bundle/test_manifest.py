"""Malformed manifests are BundleErrors (exit 4) before any field is used; what runs is the
bytes that were verified; external data must be listed and hashed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

import moqe_compile
import moqe_compile.recipes
from moqe_compile.bundle import read_bundle
from moqe_compile.bundle import reader
from moqe_compile.bundle.manifest import is_safe_name
from moqe_compile.cli import run as run_cli
from moqe_compile.errors import BundleError, BundleIntegrityError, ConfigError


@pytest.fixture
def copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def put(root: Path, m) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def relist(root: Path, m: dict, rel: str) -> None:
    """Record ``rel``'s current size and sha256 in manifest ``m`` (as a builder would)."""
    data = (root / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def edit(root: Path, fn) -> None:
    m = manifest(root)
    fn(m)
    put(root, m)


def refused(root: Path, match: str) -> None:
    """Both the reader and moqe_compile.load refuse with a BundleError naming ``match``."""
    with pytest.raises(BundleError, match=match):
        read_bundle(root)
    with pytest.raises(BundleError, match=match):
        moqe_compile.load(root).close()


def _first_file(m: dict) -> str:
    return next(iter(m["files"]))


CASES = {
    "files entry without size": (lambda m: m["files"][_first_file(m)].pop("size"), "'size' is a required property"),
    "unknown default_expert": (lambda m: m["routing"].__setitem__("default_expert", "nope"),
                               "routing.default_expert 'nope' is not an expert"),
    "no experts": (lambda m: m.__setitem__("experts", []), r"\$.experts"),
    "duplicate experts": (lambda m: m["experts"].append(m["experts"][0]), "occur more than once"),
    "size is a string": (lambda m: m["files"][_first_file(m)].__setitem__("size", "12"), "is not of type 'integer'"),
    "NUL in a path": (lambda m: m["router"].__setitem__("path", "router/\x00.onnx"), "does not match|NUL|stay inside"),
    "experts is a dict": (lambda m: m.__setitem__("experts", {"a": 1}), r"\$.experts"),
    "backend without graph": (lambda m: m["backends"].append("tensorrt"), "has no graph for backends"),
    "fallback threshold a string": (lambda m: m["routing"].__setitem__("fallback_threshold", "x"), "fallback"),
    # export-triton made folders of expert names: this one wrote outside its output folder.
    "expert name escapes": (lambda m: m["experts"][0].__setitem__("name", "x/../../../escaped"),
                            r"expert name 'x/\.\./\.\./\.\./escaped' is not allowed"),
    "expert name is a parent": (lambda m: m["experts"][0].__setitem__("name", ".."), "expert name '..' is not allowed"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_manifest_is_a_bundle_error(copy, case):
    fn, match = CASES[case]
    edit(copy, fn)
    refused(copy, match)


@pytest.mark.parametrize("content, match", [
    (b"[1, 2, 3]", "holds a JSON list; a manifest is a JSON object"),
    (b'{"schema_version": 1, "name": "\xff\xfe"}', "is not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nests deeper than 64 levels"),
])
def test_unreadable_manifest_is_a_bundle_error(copy, content, match):
    (copy / "manifest.json").write_bytes(content)
    refused(copy, match)


def test_oversized_manifest_is_refused_before_parsing(copy, monkeypatch):
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 1000)
    refused(copy, "a manifest may have at most 1000")


def test_too_many_references_are_refused_quickly(copy):
    # 2M references once took minutes to refuse; the schema's limit refuses 100k+ files at once.
    m = manifest(copy)
    m["files"].update({f"x/{i}": {"sha256": "0" * 64, "size": 0} for i in range(100_001)})
    put(copy, m)
    with pytest.raises(BundleError, match="files"):
        read_bundle(copy)


def test_symlink_loop_is_a_bundle_error(copy):
    m = manifest(copy)
    (copy / "loop").symlink_to("loop2")
    (copy / "loop2").symlink_to("loop")
    m["files"]["loop"] = {"sha256": "0" * 64, "size": 1}
    put(copy, m)
    refused(copy, "loop")


def test_moqe_run_exits_4_on_a_manifest_list(copy, tmp_path, capsys):
    (copy / "manifest.json").write_text("[]")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 40, 40, 3), np.uint8))
    assert run_cli.main([str(copy), "--input", str(x)]) == BundleError.exit_code
    assert "Traceback" not in capsys.readouterr().err


def test_expert_output_width_must_match_the_class_count(copy, tiny_bundle):
    """An expert graph with 3 outputs in a 4-class bundle is refused when the runtime loads it,
    even though its hash is listed correctly."""
    import onnx

    m = manifest(copy)
    rel = m["experts"][0]["variants"]["onnxruntime-cpu"]["path"]
    g = onnx.load(str(copy / rel))
    g.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 3
    onnx.save(g, str(copy / rel))
    relist(copy, m, rel)
    put(copy, m)
    read_bundle(copy)  # the files are consistent: only the runtime knows what width it needs
    with pytest.raises(BundleError, match=f"graph '{rel}' outputs 3 columns; the bundle expects 4"):
        moqe_compile.load(copy)


def test_declared_output_width_must_match_the_class_count(copy):
    edit(copy, lambda m: m["io"]["output"].__setitem__("shape", ["batch", 1000]))
    with pytest.raises(BundleError, match="has 1000 columns but task.num_classes is 4"):
        moqe_compile.load(copy)


# ---------------------------------------------------------------- what runs is what was verified
def test_a_file_swapped_after_read_bundle_is_refused_not_run(copy, monkeypatch):
    """Swap an expert's graph for another valid graph right after read_bundle verified every file
    (the window another process could win before the runtime opened the path): the runtime hashes
    the bytes it loads, so it refuses the swapped file instead of running it."""
    import moqe_compile.tasks.image.runtime as image_runtime

    m = manifest(copy)
    rels = [e["variants"]["onnxruntime-cpu"]["path"] for e in m["experts"]]
    real = image_runtime.read_bundle

    def read_then_swap(path, verify=True):
        b = real(path, verify=verify)
        shutil.copyfile(copy / rels[1], copy / rels[0])  # now a different, valid model
        return b

    monkeypatch.setattr(image_runtime, "read_bundle", read_then_swap)
    with pytest.raises(BundleIntegrityError, match=f"'{rels[0]}' was changed"):
        moqe_compile.load(copy)


def test_bytes_read_are_the_bytes_run(tiny_bundle, tmp_path, monkeypatch):
    """Swap the file between the read of its bytes and the creation of the session: the session
    runs the verified bytes (before, ONNX Runtime re-opened the path and ran the swapped file)."""
    import moqe_compile.backends.onnxruntime_cpu as ort_cpu

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    m = manifest(dst)
    a, b = m["experts"][0], m["experts"][1]
    pa, pb = (dst / e["variants"]["onnxruntime-cpu"]["path"] for e in (a, b))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with moqe_compile.load(dst) as rt:
        want, other = rt.run_expert(a["name"], x), rt.run_expert(b["name"], x)
    assert not np.array_equal(want, other)

    real = ort_cpu.session

    def swap_then_open(model, **kw):
        shutil.copyfile(pb, pa)  # after verification, before ONNX Runtime opens anything
        return real(model, **kw)

    monkeypatch.setattr(ort_cpu, "session", swap_then_open)
    with moqe_compile.load(dst) as rt:
        got = rt.run_expert(a["name"], x)
    np.testing.assert_array_equal(got, want)


def _with_external_data(copy: Path, listed: bool) -> str:
    """Re-save the first expert with its weights in an external file beside it."""
    import onnx

    m = manifest(copy)
    rel = m["experts"][0]["variants"]["onnxruntime-cpu"]["path"]
    g = onnx.load(str(copy / rel))
    onnx.save(g, str(copy / rel), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.data", size_threshold=1024)
    relist(copy, m, rel)
    data_rel = str(Path(rel).parent / "weights.data")
    if listed:
        relist(copy, m, data_rel)
    put(copy, m)
    return data_rel


def test_unlisted_external_data_is_refused(copy):
    data_rel = _with_external_data(copy, listed=False)
    with pytest.raises(BundleIntegrityError, match="external data in 'weights.data', which is not listed"):
        moqe_compile.load(copy)
    assert data_rel not in manifest(copy)["files"]


def test_listed_external_data_is_verified_and_used(copy, tiny_bundle):
    data_rel = _with_external_data(copy, listed=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    name = manifest(copy)["experts"][0]["name"]
    with moqe_compile.load(tiny_bundle) as rt:
        want = rt.run_expert(name, x)
    with moqe_compile.load(copy) as rt:
        np.testing.assert_array_equal(rt.run_expert(name, x), want)
    p = copy / data_rel
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="was changed"):
        moqe_compile.load(copy, verify=True)


GOOD_NAMES = ["w4-gptq-g32.8bit-112", "percentile-99.999", "copy1", "budget-w4a8-mse.fp-3", "A_b-c.d", "x" * 128]
BAD_NAMES = ["", ".", "..", "..a", "a..b", ".hidden", "-x", "_x", "a/b", "x/../../../escaped", "a\\b", "a b", "é",
             "a\x00", "a\n", "x" * 129, None, 3]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_name_rule_accepts_the_names_builds_write(name):
    assert is_safe_name(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_name_rule_refuses_what_could_be_a_path(name):
    assert not is_safe_name(name)


def _shipped_expert_names() -> set[str]:
    from moqe_compile.tasks.causal_lm.presets import LM_EXPERT_PRESETS
    from moqe_compile.tasks.image.presets import EXPERT_PRESETS

    names = set(EXPERT_PRESETS) | set(LM_EXPERT_PRESETS)  # a preset's name is its expert's default name
    for toml in Path(moqe_compile.recipes.__file__).parent.glob("*.toml"):
        names |= {e["name"] for e in tomllib.loads(toml.read_text()).get("experts", []) if "name" in e}
    return names


def test_every_shipped_recipe_and_preset_name_follows_the_rule():
    names = _shipped_expert_names()
    assert {"percentile-99.999", "w4a8-mse-bc", "strongest"} <= names
    assert [n for n in sorted(names) if not is_safe_name(n)] == []


@pytest.mark.parametrize("name", ["..", "..a", "é", "x/../y", "-x"])
def test_recipes_refuse_the_names_the_reader_refuses(name):
    from moqe_compile.tasks.causal_lm.config import LMExpertRecipe
    from moqe_compile.tasks.image.config import ExpertRecipe

    for cls in (ExpertRecipe, LMExpertRecipe):
        with pytest.raises(ConfigError, match=f"name = {re.escape(repr(name))} is not allowed"):
            cls(name=name)
