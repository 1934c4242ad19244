import json
import shutil

import pytest

from moqe_compile.bundle import BundleWriter, read_bundle
from moqe_compile.errors import (BuildError, BundleError, BundleIntegrityError, BundlePathError,
                                 SchemaVersionError)
from moqe_compile.build import build

from ..models import tiny_config


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_bundle_layout_and_hashes(tiny_bundle):
    b = read_bundle(tiny_bundle)
    m = b.manifest
    assert m["schema_version"] == 1
    assert {"fp/model.onnx", "router/router.onnx", "router/router.safetensors", "report/report.json",
            "report/loss_matrix.npz", "task/labels.json"} <= set(m["files"])
    for e in m["experts"]:
        assert e["variants"]["onnxruntime-cpu"]["path"] == f"experts/{e['name']}/onnxruntime-cpu.onnx"
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in m["files"].values())
    assert not any(p.endswith(".data") for p in m["files"])  # every ONNX file is self-contained


def test_missing_file_is_named(copy):
    (copy / "router" / "router.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match="'router/router.onnx' is missing"):
        read_bundle(copy)


def test_changed_file_names_both_hashes(copy):
    p = copy / "experts" / "minmax" / "onnxruntime-cpu.onnx"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    expected = json.loads((copy / "manifest.json").read_text())["files"]["experts/minmax/onnxruntime-cpu.onnx"]
    with pytest.raises(BundleIntegrityError) as e:
        read_bundle(copy)
    msg = str(e.value)
    assert "'experts/minmax/onnxruntime-cpu.onnx' was changed" in msg and expected["sha256"] in msg


def test_path_escaping_bundle(copy):
    def escape(m):
        m["files"]["../outside.onnx"] = m["files"].pop("router/router.onnx")
        m["router"]["path"] = "../outside.onnx"
    _edit_manifest(copy, escape)
    with pytest.raises(BundlePathError, match="'../outside.onnx' must be relative and stay inside"):
        read_bundle(copy)


def test_absolute_path(copy):
    _edit_manifest(copy, lambda m: m["router"].__setitem__("path", "/etc/passwd"))
    with pytest.raises(BundlePathError, match="'/etc/passwd'"):
        read_bundle(copy)


def test_symlink_escape(copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(copy / "router" / "router.onnx", outside)
    (copy / "router" / "router.onnx").unlink()
    (copy / "router" / "router.onnx").symlink_to(outside)
    with pytest.raises(BundlePathError, match="outside the bundle"):
        read_bundle(copy)


def test_unlisted_reference(copy):
    _edit_manifest(copy, lambda m: m["router"].__setitem__("path", "router/other.onnx"))
    with pytest.raises(BundleIntegrityError, match="'router/other.onnx', which is not listed"):
        read_bundle(copy)


def test_unknown_schema_version(copy):
    _edit_manifest(copy, lambda m: m.__setitem__("schema_version", 2))
    with pytest.raises(SchemaVersionError, match="schema_version 2; this moqe-compile reads version 1"):
        read_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a moqe bundle"):
        read_bundle(tmp_path)


def test_failed_build_leaves_nothing(tiny_onnx, tiny_images, tmp_path, monkeypatch):
    import moqe_compile.tasks.image.steps as steps

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(steps, "train_router", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_config(tiny_onnx, tiny_images), tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []  # no bundle, no .partial directory


def test_failed_rebuild_keeps_previous_bundle(tiny_bundle, tiny_onnx, tiny_images, tmp_path, monkeypatch):
    import moqe_compile.tasks.image.steps as steps

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    before = (dst / "manifest.json").read_text()
    monkeypatch.setattr(steps, "train_router", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        build(tiny_config(tiny_onnx, tiny_images), dst, quiet=True)
    assert (dst / "manifest.json").read_text() == before
    read_bundle(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_writer_refuses_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="exists and is not a moqe bundle"):
        BundleWriter(tmp_path / "x")


def test_report_carries_expert_diversity(tiny_bundle):
    rep = json.loads((tiny_bundle / "report" / "report.json").read_text())
    d = rep["splits"]["test"]["diversity"]
    assert set(d["pairwise_disagreement"]) == {"minmax|pct", "minmax|entropy", "pct|entropy"}
    assert d["oracle_value"] >= d["best_single_value"] and d["best_single"] in {"minmax", "pct", "entropy"}


def test_a_signal_during_the_commit_renames_waits_until_they_are_done():
    """Stopped between its two renames, a commit would leave the path without a bundle."""
    import os
    import signal

    from moqe_compile.bundle.writer import signals_held

    got = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held
        assert got == [signal.SIGTERM]  # delivered once the block is done
    finally:
        signal.signal(signal.SIGTERM, previous)
