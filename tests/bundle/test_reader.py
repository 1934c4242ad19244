"""The bundle reader on bundles written here by hand (files, sizes and sha256 from hashlib,
not from the writer), so each refusal is the reader's own: hash and size mismatches, the
manifest's limits at and one past each bound, schema and name checks, path confinement, and
the verified bytes and external data handed to ONNX Runtime. No model is built: seconds."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from moqe_compile.bundle import manifest as manifest_mod
from moqe_compile.bundle import reader
from moqe_compile.bundle.reader import Bundle, Graph, load_manifest, parse_manifest, read_bundle
from moqe_compile.errors import BundleError, BundleIntegrityError, BundlePathError, SchemaVersionError

FILES = {"fp/model.onnx": b"fp-bytes", "router/router.onnx": b"router!", "experts/a/cpu.onnx": b"expert a",
         "experts/b/cpu.onnx": b"expert bb"}


def base_manifest() -> dict:
    return {"schema_version": 1, "task": {"kind": "custom"}, "model": {"fp": {"path": "fp/model.onnx"}},
            "experts": [{"name": "a", "variants": {"cpu": {"path": "experts/a/cpu.onnx"}}},
                        {"name": "b", "variants": {"cpu": {"path": "experts/b/cpu.onnx"}}}],
            "routing": {"enabled": True, "default_expert": "a"}, "router": {"path": "router/router.onnx"},
            "backends": ["cpu"]}


def listing(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def make(root: Path, files: dict[str, bytes] | None = None, edit=None) -> Path:
    """A bundle at ``root``: ``files`` written and listed, then ``edit(manifest)``."""
    files = FILES if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    m = base_manifest()
    m["files"] = {rel: listing(data) for rel, data in files.items()}
    if edit:
        edit(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_a_consistent_bundle_reads_and_serves_its_bytes(tmp_path):
    b = read_bundle(make(tmp_path / "b"))
    assert isinstance(b, Bundle) and b.verify and b.root == tmp_path / "b"
    assert b.manifest["routing"]["default_expert"] == "a"
    assert b.read("experts/b/cpu.onnx") == b"expert bb"
    assert b.file("fp/model.onnx") == (tmp_path / "b" / "fp" / "model.onnx").resolve()
    assert read_bundle(tmp_path / "b", verify=False).verify is False


# ---------------------------------------------------------------- files against their listing
def test_a_changed_file_names_both_digests(tmp_path):
    root = make(tmp_path / "b")
    (root / "router" / "router.onnx").write_bytes(b"router?")  # same size, other bytes
    want, got = listing(b"router!")["sha256"], hashlib.sha256(b"router?").hexdigest()
    with pytest.raises(BundleIntegrityError, match=f"'router/router.onnx' was changed: sha256 {got}, manifest "
                                                   f"expects {want}"):
        read_bundle(root)
    b = read_bundle(root, verify=False)  # sizes still checked, digests not
    assert b.read("router/router.onnx") == b"router?"
    with pytest.raises(BundleIntegrityError, match="was changed"):
        Bundle(root, b.manifest).read("router/router.onnx")


def test_a_file_of_another_size_is_refused_with_both_sizes(tmp_path):
    root = make(tmp_path / "b")
    (root / "fp" / "model.onnx").write_bytes(b"fp-bytes+")
    with pytest.raises(BundleIntegrityError, match="'fp/model.onnx' has size 9, manifest says 8"):
        read_bundle(root, verify=False)
    b = Bundle(root, json.loads((root / "manifest.json").read_text()), verify=False)
    with pytest.raises(BundleIntegrityError, match="'fp/model.onnx' has size 9, manifest says 8"):
        b.read("fp/model.onnx")
    (root / "fp" / "model.onnx").write_bytes(b"fp-byte")
    with pytest.raises(BundleIntegrityError, match="has size 7, manifest says 8"):
        b.read("fp/model.onnx")


def test_reading_an_unlisted_or_missing_file(tmp_path):
    root = make(tmp_path / "b")
    b = read_bundle(root)
    with pytest.raises(BundleIntegrityError, match=f"'notes.txt' is not listed under 'files' of {str(root)!r}"):
        b.read("notes.txt")
    (root / "experts" / "a" / "cpu.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match=f"'experts/a/cpu.onnx' is missing from {str(root)!r}"):
        read_bundle(root)
    with pytest.raises(BundleIntegrityError, match="'experts/a/cpu.onnx' cannot be read: No such file"):
        b.read("experts/a/cpu.onnx")


def test_a_listed_directory_or_device_is_not_read(tmp_path):
    root = make(tmp_path / "b")
    b = read_bundle(root)
    b.manifest["files"]["experts"] = {"sha256": "0" * 64, "size": 0}
    with pytest.raises(BundleIntegrityError, match="'experts' cannot be read"):
        b.read("experts")
    os.symlink("/dev/zero", root / "zero")
    b.manifest["files"]["zero"] = {"sha256": "0" * 64, "size": 4}
    with pytest.raises(BundlePathError):  # outside the bundle: refused before it is opened
        b.read("zero")
    with pytest.raises(BundleIntegrityError, match="'dev' is not a regular file"):
        reader._read_regular(Path("/dev/zero"), "dev", 4)
    with pytest.raises(BundleIntegrityError, match="'x' cannot be read"):
        reader._read_regular(tmp_path / "nope", "x", 4)


def test_read_reads_at_most_one_byte_more_than_listed(tmp_path):
    root = make(tmp_path / "b")
    (root / "fp" / "model.onnx").write_bytes(b"fp-bytes" + b"x" * 10_000)
    assert reader._read_regular(root / "fp" / "model.onnx", "fp/model.onnx", 8) == b"fp-bytesx"
    assert reader._read_regular(root / "fp" / "model.onnx", "fp/model.onnx", 0) == b"f"


def test_hash_failure_while_reading_is_an_integrity_error(tmp_path, monkeypatch):
    root = make(tmp_path / "b")

    def unreadable(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(reader, "sha256_file", unreadable)
    with pytest.raises(BundleIntegrityError, match="'fp/model.onnx' cannot be read: Permission denied"):
        read_bundle(root)
    read_bundle(root, verify=False)  # no hashing, no read


def test_sha256_file_over_several_chunks_matches_hashlib(tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)
    (tmp_path / "big").write_bytes(data)
    assert manifest_mod.sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert manifest_mod.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- where a bundle is
def test_not_a_directory_or_no_manifest(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BundleError, match=f"bundle {str(tmp_path / 'f')!r} is not a directory"):
        read_bundle(tmp_path / "f")
    with pytest.raises(BundleError, match=f"{str(tmp_path / 'manifest.json')!r} is missing: .* is not a moqe "
                                          "bundle"):
        read_bundle(tmp_path)
    (tmp_path / "d" / "manifest.json").mkdir(parents=True)
    with pytest.raises(BundleError, match="is missing"):
        read_bundle(tmp_path / "d")


# ---------------------------------------------------------------- the manifest's limits
def test_manifest_size_limit_is_inclusive(tmp_path, monkeypatch):
    p = tmp_path / "manifest.json"
    p.write_bytes(b'["' + b"x" * 96 + b'"]')  # exactly 100 bytes
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 100)
    assert parse_manifest(p) == ["x" * 96]
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 99)
    with pytest.raises(BundleError, match=f"{str(p)!r} is 100 bytes; a manifest may have at most 99"):
        parse_manifest(p)


def test_a_manifest_that_grows_after_its_size_was_checked_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "manifest.json"
    p.write_bytes(b"[" + b"1," * 60 + b"1]")
    real = os.fstat

    def stale_fstat(fd):  # the size as it was before another process appended
        st = list(real(fd))
        st[6] = 10
        return os.stat_result(st)

    monkeypatch.setattr(reader.os, "fstat", stale_fstat)
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 50)
    with pytest.raises(BundleError, match=f"{str(p)!r} is larger than 50 bytes"):
        parse_manifest(p)
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 123)  # the file's size: read whole, accepted
    assert len(parse_manifest(p)) == 61


def test_a_manifest_that_is_no_regular_file_or_unreadable(tmp_path):
    with pytest.raises(BundleError, match="'/dev/null' is not a regular file"):
        parse_manifest(Path("/dev/null"))
    with pytest.raises(BundleError, match=f"{str(tmp_path)!r} cannot be read: Is a directory"):
        parse_manifest(tmp_path)


def test_nesting_limit_is_inclusive_and_ignores_brackets_in_strings(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("[" * 64 + "]" * 64)
    assert parse_manifest(p) is not None
    p.write_text("[" * 65 + "]" * 65)
    with pytest.raises(BundleError, match=f"{str(p)!r} nests deeper than 64 levels; not a moqe manifest"):
        parse_manifest(p)
    p.write_text(json.dumps({"s": "[" * 500, "t": "\\\"{" * 100, "u": ["[{" * 50]}))
    assert parse_manifest(p)["s"] == "[" * 500
    p.write_text("[" + "[[]]," * 1000 + "[]]")  # wide, not deep: closing brackets count down
    assert len(parse_manifest(p)) == 1001
    p.write_text("{" + ", ".join(f'"k{i}": {{"a": [1]}}' for i in range(100)) + "}")
    assert len(parse_manifest(p)) == 100


@pytest.mark.parametrize("raw,match", [
    (b'{"a": 1,}', "is not valid JSON"),
    (b'{"a": "\xff"}', r"is not UTF-8 \(invalid start byte at byte 7\)"),
])
def test_unparsable_manifests(tmp_path, raw, match):
    (tmp_path / "manifest.json").write_bytes(raw)
    with pytest.raises(BundleError, match=match):
        parse_manifest(tmp_path / "manifest.json")


# ---------------------------------------------------------------- version, schema, names
def _write(tmp_path, m) -> Path:
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(m))
    return p


@pytest.mark.parametrize("version", [2, 0, "1", True, None, 1.5])
def test_only_schema_version_1_is_read(tmp_path, version):
    m = {**base_manifest(), "files": {}}
    if version is None:
        del m["schema_version"]
    else:
        m["schema_version"] = version
    with pytest.raises(SchemaVersionError, match=f"has schema_version {version!r}; this moqe-compile reads "
                                                 "version 1. Rebuild the bundle"):
        load_manifest(_write(tmp_path, m))


def test_schema_version_1_point_0_is_1(tmp_path):
    m = {**base_manifest(), "files": {}, "schema_version": 1.0}
    assert load_manifest(_write(tmp_path, m))["schema_version"] == 1


def test_a_json_value_that_is_no_object(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('"text"')
    with pytest.raises(BundleError, match="holds a JSON str; a manifest is a JSON object"):
        load_manifest(p)


def test_schema_errors_name_the_place_and_long_messages_are_cut(tmp_path):
    m = {**base_manifest(), "files": {"fp/model.onnx": {"sha256": "0" * 64, "size": "x" * 400}}}
    with pytest.raises(BundleError) as e:
        load_manifest(_write(tmp_path, m))
    msg = str(e.value)
    assert "does not match the manifest schema at $.files['fp/model.onnx'].size:" in msg
    assert msg.endswith("x... (docs/bundle-format.md).") and "x" * 190 in msg and "x" * 300 not in msg
    m["files"]["fp/model.onnx"]["size"] = "12"
    with pytest.raises(BundleError, match=r"'12' is not of type 'integer' \(docs/bundle-format.md\)\.$"):
        load_manifest(_write(tmp_path, m))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["experts"].append({"name": "a", "variants": {"cpu": {"path": "x"}}}),
     r"expert names \['a'\] occur more than once"),
    (lambda m: m["experts"].extend([{"name": n, "variants": {"cpu": {"path": "x"}}} for n in "bba"]),
     r"expert names \['a', 'b'\] occur more than once"),
    (lambda m: m["routing"].update(default_expert="c"),
     r"routing\.default_expert 'c' is not an expert; the experts are \['a', 'b'\]"),
    (lambda m: m["routing"].update(fallback_expert="z"), r"routing\.fallback_expert 'z' is not an expert"),
    (lambda m: m["backends"].append("gpu"), r"expert 'a' has no graph for backends \['gpu'\] that 'backends' lists"),
    (lambda m: m["experts"][1]["variants"].update(gpu={"path": "g"}) or m["backends"].append("gpu"),
     r"expert 'a' has no graph for backends \['gpu'\]"),
    (lambda m: m["experts"][0]["variants"].update(gpu={"path": "g"}) or m["backends"].append("gpu"),
     r"expert 'b' has no graph for backends \['gpu'\]"),
])
def test_what_the_schema_cannot_say(tmp_path, edit, match):
    m = {**base_manifest(), "files": {}}
    edit(m)
    with pytest.raises(BundleError, match=match):
        load_manifest(_write(tmp_path, m))


def test_a_known_fallback_expert_and_extra_variants_pass(tmp_path):
    m = {**base_manifest(), "files": {}}
    m["routing"]["fallback_expert"] = "b"
    m["experts"][0]["variants"]["gpu"] = {"path": "g"}  # a variant no backend lists is allowed
    assert load_manifest(_write(tmp_path, m))["routing"]["fallback_expert"] == "b"


# ---------------------------------------------------------------- references and paths
def test_references_are_every_path_outside_the_build_config_and_file_table():
    m = {"a": {"path": "x"}, "b": [{"path": "y"}, [{"c": {"path": "z"}}]], "build_config": {"path": "/home/u"},
         "files": {"path": "w"}, "n": {"path": 5}, "deep": {"path": {"path": "v"}}}
    assert manifest_mod.referenced_paths(m) == ["x", "y", "z", "v"]
    assert manifest_mod.referenced_paths([{"path": "p"}, "path"]) == ["p"]
    assert manifest_mod.referenced_paths("path") == []


def test_an_unlisted_reference_is_named(tmp_path):
    root = make(tmp_path / "b", edit=lambda m: m.update(report={"plot": {"path": "report/plot.png"}}))
    with pytest.raises(BundleIntegrityError, match="manifest references 'report/plot.png', which is not listed "
                                                   "under 'files'"):
        read_bundle(root)


def test_the_reference_count_limit_is_inclusive(tmp_path, monkeypatch):
    root = make(tmp_path / "b")  # 4 references: fp, router, two experts
    monkeypatch.setattr(reader, "MAX_FILES", 4)
    read_bundle(root)
    monkeypatch.setattr(reader, "MAX_FILES", 3)
    with pytest.raises(BundleError, match="the manifest references 4 paths; at most 3 are allowed"):
        read_bundle(root)


def test_unlisted_paths_too_long_with_nul_or_escaping_are_path_errors(tmp_path):
    at_limit = "r/" + "a" * 1022
    root = make(tmp_path / "b", edit=lambda m: m.update(report={"x": {"path": at_limit}}))
    with pytest.raises(BundleIntegrityError, match="which is not listed"):
        read_bundle(root)
    for bad in ("r/" + "a" * 1023, "r/\x00x"):
        make(root, edit=lambda m: m.update(report={"x": {"path": bad}}))
        with pytest.raises(BundlePathError, match=r"manifest path .*\.\.\. is not a valid bundle path"):
            read_bundle(root)
    make(root, edit=lambda m: m.update(report={"x": {"path": "../../etc/passwd"}}))
    with pytest.raises(BundlePathError, match="must be relative and stay inside the bundle"):
        read_bundle(root)


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "a\\b", "a\x00b", "../x", "a/../../x", "a/.."])
def test_safe_join_refuses_paths_that_leave_or_are_malformed(tmp_path, rel):
    with pytest.raises(BundlePathError, match="must be relative and stay inside the bundle"):
        manifest_mod.safe_join(tmp_path, rel)


def test_safe_join_confines_symlinks_and_names_loops(tmp_path):
    assert manifest_mod.safe_join(tmp_path, "a/b.onnx") == tmp_path.resolve() / "a" / "b.onnx"
    assert manifest_mod.safe_join(tmp_path, "./a") == tmp_path.resolve() / "a"
    with pytest.raises(BundlePathError, match="manifest path 5 is not a string"):
        manifest_mod.safe_join(tmp_path, 5)
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(BundlePathError, match=f"'out/passwd' resolves to '/etc/passwd', outside the bundle "
                                              f"{str(tmp_path)!r}"):
        manifest_mod.safe_join(tmp_path, "out/passwd")
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    with pytest.raises(BundlePathError, match=f"'l1' cannot be resolved in {str(tmp_path)!r}"):
        manifest_mod.safe_join(tmp_path, "l1")


# ---------------------------------------------------------------- graphs: verified bytes, external data
def _onnx(external: str | None = None, outputs=(("y", ["batch", 4]),)) -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    if external:
        w.ClearField("float_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", external), ("offset", "0"), ("length", "16")):
            w.external_data.add(key=k, value=v)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], [outputs[0][0]])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], outs, [w])
    return helper.make_model(g).SerializeToString()


def test_graph_is_the_verified_bytes_with_its_output_shapes(tmp_path):
    model = _onnx(outputs=(("y", ["batch", 4]), ("z", [None, 7])))
    root = make(tmp_path / "b", {**FILES, "experts/a/cpu.onnx": model})
    g = read_bundle(root).graph("experts/a/cpu.onnx")
    assert g.model == model and g.rel == "experts/a/cpu.onnx" and g.external == {} and g.shared is None
    assert g.outputs == {"y": ["batch", 4], "z": [None, 7]} and g.output_width() == 4


def test_output_width_is_the_first_outputs_fixed_last_dimension():
    assert Graph("g", b"", {"a": ["n", 10], "b": [3]}).output_width() == 10
    assert Graph("g", b"", {"a": ["n", "classes"]}).output_width() is None
    assert Graph("g", b"", {"a": []}).output_width() is None
    assert Graph("g", b"", {}).output_width() is None


def test_external_data_must_be_listed_and_is_passed_verified(tmp_path):
    weights = bytes(range(16))
    model = _onnx(external="w.bin")
    unlisted = make(tmp_path / "u", {**FILES, "experts/a/cpu.onnx": model})
    with pytest.raises(BundleIntegrityError, match="graph 'experts/a/cpu.onnx': initializer 'w' has external data "
                                                   "in 'w.bin', which is not listed"):
        read_bundle(unlisted).graph("experts/a/cpu.onnx")
    root = make(tmp_path / "b", {**FILES, "experts/a/cpu.onnx": model, "experts/a/w.bin": weights})
    g = read_bundle(root).graph("experts/a/cpu.onnx")
    assert g.external == {"w.bin": weights}
    (root / "experts" / "a" / "w.bin").write_bytes(bytes(16))
    unverified = read_bundle(root, verify=False)  # the file table was not hashed: graph() hashes what it reads
    with pytest.raises(BundleIntegrityError, match="'experts/a/w.bin' was changed"):
        Bundle(root, unverified.manifest).graph("experts/a/cpu.onnx")


def test_a_shared_tensor_supplies_the_initializer_instead_of_its_location(tmp_path):
    model = _onnx(external="emb.bin")
    table = bytes(16)

    def share(m):
        m["model"]["shared_initializers"] = {"emb": {"path": "shared/emb.bin", "dtype": "float32", "shape": [4],
                                                     "location": "emb.bin",
                                                     "graphs": {"experts/a/cpu.onnx": ["w"]}}}

    root = make(tmp_path / "b", {**FILES, "experts/a/cpu.onnx": model, "shared/emb.bin": table}, share)
    b = read_bundle(root)
    g = b.graph("experts/a/cpu.onnx")
    assert g.external == {} and g.shared is not None and g.shared.names_for("experts/a/cpu.onnx") == {"w"}
    assert b.graph("experts/a/cpu.onnx").shared is g.shared  # one copy for every graph of the bundle



def _initializer(model: bytes, name: str):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    m = onnx.load_from_string(model)
    t = next(t for t in m.graph.initializer if t.name == name)
    assert not t.external_data and t.data_location == onnx.TensorProto.DEFAULT
    return numpy_helper.to_array(t)


def test_self_contained_writes_the_shared_tensor_into_the_graph(tmp_path):
    import numpy as np

    table = np.array([5.0, 6.0, 7.0, 8.0], "<f4").tobytes()

    def share(m):
        m["model"]["shared_initializers"] = {"emb": {"path": "shared/emb.bin", "dtype": "float32", "shape": [4],
                                                     "location": "emb.bin",
                                                     "graphs": {"experts/a/cpu.onnx": ["w"]}}}

    root = make(tmp_path / "b", {**FILES, "experts/a/cpu.onnx": _onnx(external="emb.bin"),
                                 "shared/emb.bin": table}, share)
    model = read_bundle(root).graph("experts/a/cpu.onnx").self_contained()
    assert _initializer(model, "w").tolist() == [5.0, 6.0, 7.0, 8.0]


def test_self_contained_writes_a_listed_data_file_into_the_graph_at_its_offset(tmp_path):
    import numpy as np

    onnx = pytest.importorskip("onnx")
    m = onnx.load_from_string(_onnx(external="w.bin"))
    next(e for e in m.graph.initializer[0].external_data if e.key == "offset").value = "4"
    weights = np.arange(5, dtype="<f4").tobytes()  # the tensor is the last 16 of these 20 bytes
    root = make(tmp_path / "b", {**FILES, "experts/a/cpu.onnx": m.SerializeToString(), "experts/a/w.bin": weights})
    model = read_bundle(root).graph("experts/a/cpu.onnx").self_contained()
    assert _initializer(model, "w").tolist() == [1.0, 2.0, 3.0, 4.0]

def test_a_graph_that_is_not_onnx_is_a_bundle_error(tmp_path):
    root = make(tmp_path / "b", {**FILES, "experts/a/cpu.onnx": b"\xff\xff\xff"})
    with pytest.raises(BundleError, match="graph 'experts/a/cpu.onnx' is not a valid ONNX model"):
        read_bundle(root).graph("experts/a/cpu.onnx")


def test_configure_hands_external_data_and_shared_tensors_to_the_session_options():
    calls = []

    class Options:
        def add_external_initializers_from_files_in_memory(self, names, buffers, lengths):
            calls.append(("external", names, [bytes(b) for b in buffers], lengths))

    class Shared:
        def add_to(self, so, rel):
            calls.append(("shared", rel))

    Graph("g.onnx", b"", external={"a.bin": b"abc", "b.bin": b"de"}, shared=Shared()).configure(Options())
    assert calls == [("shared", "g.onnx"), ("external", ["a.bin", "b.bin"], [b"abc", b"de"], [3, 2])]
    calls.clear()
    Graph("g.onnx", b"").configure(Options())
    assert calls == []


# ---------------------------------------------------------------- every place a tensor can keep external data
def _external(name: str, location: str | None, mark_location: bool = True):
    from onnx import TensorProto, helper

    t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    if mark_location:
        t.data_location = TensorProto.EXTERNAL
    if location is not None:
        t.external_data.add(key="offset", value="0")
        t.external_data.add(key="location", value=location)
    return t


def test_external_data_is_found_in_nodes_subgraphs_and_functions():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from moqe_compile.bundle import onnx_refs

    const = helper.make_node("Constant", [], ["c"], value=_external("c", "const.bin"))
    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "then", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
                              [_external("sub", "sub.bin")])
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)
    fn_const = helper.make_node("Constant", [], ["f"], value=_external("fn", "fn.bin"))
    fn = helper.make_function("local", "F", [], ["f"], [fn_const], [helper.make_opsetid("", 17)])
    g = helper.make_graph([const, branch], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [_external("listed_only", "w.bin", mark_location=False), _external("no_location", None),
                           helper.make_tensor("inline", TensorProto.FLOAT, [1], [1.0])])
    model = helper.make_model(g, functions=[fn])
    got = onnx_refs.external_data(onnx_refs.parse(model.SerializeToString(), "m.onnx"))
    assert sorted(got) == sorted([("listed_only", "w.bin"), ("no_location", ""), ("c", "const.bin"),
                                  ("sub", "sub.bin"), ("sub", "sub.bin"), ("fn", "fn.bin")])  # both branches
    assert onnx_refs.output_shapes(onnx_refs.parse(model.SerializeToString(), "m.onnx")) == {"y": [1]}
