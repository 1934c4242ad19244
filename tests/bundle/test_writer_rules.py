"""The writer's rules one by one, without a build: the file table it writes (checked with
hashlib), what reads as a bundle it may replace, the output paths it refuses and the words
it refuses them with, and the permissions and scratch space it leaves."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from moqe_compile.bundle import writer
from moqe_compile.bundle.writer import BundleWriter, check_destination, is_bundle
from moqe_compile.errors import BuildError


def test_commit_lists_every_file_with_its_sha256_and_size(tmp_path):
    data = {"a.txt": b"alpha", "sub/deeper/b.bin": bytes(range(200)), "empty": b""}
    with BundleWriter(tmp_path / "b") as w:
        for rel, b in data.items():
            w.path(rel).write_bytes(b)  # path() makes the parents
        out = w.commit({"router": {"path": "a.txt"}, "schema_version": 99})
    raw = (out / "manifest.json").read_text()
    m = json.loads(raw)
    assert m["files"] == {rel: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for rel, b in data.items()}
    assert m["schema_version"] == 99 and list(m)[0] == "schema_version"  # the caller's own version wins
    assert raw.startswith('{\n  "schema_version"')  # indented for people who read it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_commit_refuses_references_to_files_never_written(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        w.path("a.txt").write_text("x")
        with pytest.raises(BuildError, match=r"manifest references files that were not written: \['m/x', 'z'\]"):
            w.commit({"a": {"path": "z"}, "b": [{"path": "m/x"}], "c": {"path": "a.txt"}})
    assert list(tmp_path.iterdir()) == []  # the partial directory is gone


def test_path_outside_the_context_or_the_bundle(tmp_path):
    w = BundleWriter(tmp_path / "b")
    with pytest.raises(AssertionError, match="use BundleWriter as a context manager"):
        w.path("a")
    with w:
        p = w.path("x/y/z.txt")
        assert p.parent.is_dir() and p.parent.parent.name == "x"
        assert w.path("x/y/other.txt").parent == p.parent  # existing parents are fine
        from moqe_compile.errors import BundlePathError

        with pytest.raises(BundlePathError):
            w.path("../escape")


def test_work_dir_is_one_sibling_removed_on_exit(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        d = w.work_dir()
        assert w.work_dir() == d and d.parent == tmp_path and d.name.startswith(f".b.work-{os.getpid()}-")
        (d / "scratch").write_text("x")
        assert w.tmp.name.startswith(f".b.partial-{os.getpid()}-")
    assert not d.exists() and list(tmp_path.iterdir()) == []


def test_the_bundle_gets_the_users_permissions_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        with BundleWriter(tmp_path / "b") as w:
            out = w.commit({})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert os.umask(old) == old  # the writer put the process umask back


def test_the_output_parent_is_created(tmp_path):
    with BundleWriter(tmp_path / "p" / "q" / "b") as w:
        out = w.commit({})
    assert (out / "manifest.json").is_file()


# ---------------------------------------------------------------- what may be replaced
def _bundle_dir(root: Path, files: dict, manifest=None) -> Path:
    root.mkdir(parents=True)
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    m = {"schema_version": 1, "files": {rel: {} for rel in files}} if manifest is None else manifest
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_is_bundle_needs_a_version_a_file_table_and_nothing_unlisted(tmp_path):
    assert is_bundle(_bundle_dir(tmp_path / "ok", {"a/b/c.onnx": 1, "d": 1}))
    assert is_bundle(_bundle_dir(tmp_path / "empty-table", {}))
    assert not is_bundle(_bundle_dir(tmp_path / "list", {}, manifest=[1]))
    assert not is_bundle(_bundle_dir(tmp_path / "no-version", {}, manifest={"files": {}}))
    assert not is_bundle(_bundle_dir(tmp_path / "str-version", {}, manifest={"schema_version": "1", "files": {}}))
    assert not is_bundle(_bundle_dir(tmp_path / "no-files", {}, manifest={"schema_version": 1}))
    assert not is_bundle(_bundle_dir(tmp_path / "files-list", {}, manifest={"schema_version": 1, "files": []}))
    extra = _bundle_dir(tmp_path / "extra", {"a/b/c.onnx": 1})
    (extra / "a" / "mine.txt").write_text("keep")
    assert not is_bundle(extra)
    empty_dir = _bundle_dir(tmp_path / "dir", {"a/c.onnx": 1})
    (empty_dir / "a" / "sub").mkdir()  # a directory the table does not account for
    assert not is_bundle(empty_dir)
    (tmp_path / "nojson").mkdir()
    assert not is_bundle(tmp_path / "nojson")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{")
    assert not is_bundle(tmp_path / "bad")


def test_a_symlinked_directory_is_not_walked_into(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "c.onnx").write_text("x")
    b = _bundle_dir(tmp_path / "b", {"d": 1})
    (b / "a").symlink_to(target, target_is_directory=True)
    assert not is_bundle(b)  # "a" is an unlisted entry, not a directory of listed files


def test_parents_of_a_path():
    assert writer._parents("a/b/c.onnx") == ["a", "a/b"]
    assert writer._parents("x/y") == ["x"]
    assert writer._parents("top") == []


def test_unreadable_directory_is_not_a_bundle(tmp_path, monkeypatch):
    b = _bundle_dir(tmp_path / "b", {"d": 1})

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writer.os, "scandir", refuse)
    assert not is_bundle(b)


# ---------------------------------------------------------------- refused destinations
def test_destinations_that_are_files_or_under_files(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(BuildError, match=f"output {str(f)!r} exists and is not a directory; choose another -o or "
                                         "remove it"):
        check_destination(f)
    under = f / "a" / "b"
    with pytest.raises(BuildError, match=f"output {str(under)!r} is under {str(f)!r}, which is a file, not a "
                                         "directory; choose another -o"):
        check_destination(under)
    check_destination(tmp_path / "new" / "deep" / "b")  # missing parents are fine
    link = tmp_path / "link"
    (tmp_path / "real").mkdir()
    link.symlink_to(tmp_path / "real")
    with pytest.raises(BuildError, match="exists and is not a directory"):
        check_destination(link)


def test_a_foreign_directory_is_refused_with_the_way_out(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes").write_text("x")
    with pytest.raises(BuildError) as e:
        check_destination(d)
    assert str(e.value) == (f"output {str(d)!r} exists and is not a moqe bundle (no valid manifest.json, or files "
                            "the manifest does not list); building there would delete them. Choose another -o, or "
                            "pass --force (`moqe-compile build ... --force`) to replace the directory and everything "
                            "in it.")
    check_destination(d, force=True)
    (d / "notes").unlink()
    check_destination(d)  # empty


def test_an_unreadable_destination_is_a_build_error(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(BuildError, match=f"cannot read the output directory {str(d)!r}: Permission denied. Choose "
                                         "another -o or fix its permissions"):
        check_destination(d)


def test_failures_to_create_or_replace_name_the_path(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def refuse_mkdir(self, *a, **k):
        if self == tmp_path / "p":
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse_mkdir)
    with pytest.raises(BuildError, match=f"cannot create {str(tmp_path / 'p')!r}: Permission denied"):
        with BundleWriter(tmp_path / "p" / "b"):
            pass
    monkeypatch.undo()

    dest = tmp_path / "b"
    with BundleWriter(dest) as w:
        w.commit({"n": 1})
    real_replace = os.replace

    def refuse_second(a, b):  # moving the old bundle aside works, moving the new one in fails
        if ".partial-" in str(a):
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(writer.os, "replace", refuse_second)
    with pytest.raises(BuildError, match=f"cannot replace {str(dest)!r}: No space left on device"):
        with BundleWriter(dest) as w:
            w.commit({"n": 2})
    assert json.loads((dest / "manifest.json").read_text())["n"] == 1  # the old bundle went back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_old_copy_left_by_this_process_is_replaced(tmp_path):
    dest = tmp_path / "b"
    with BundleWriter(dest) as w:
        w.commit({"n": 1})
    stale = tmp_path / f".b.old-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with BundleWriter(dest) as w:
        w.commit({"n": 2})
    assert json.loads((dest / "manifest.json").read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_pid_alive():
    assert writer.pid_alive(os.getpid())
    assert not writer.pid_alive(2**22 + 12345)  # above the kernel's pid_max: no such process
