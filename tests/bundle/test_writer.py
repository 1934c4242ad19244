"""The writer replaces only what it wrote, refuses paths it cannot use with a BuildError, and
cleans up after builds that were killed (their leftovers carry the dead process's id)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moqe_compile.bundle import BundleWriter
from moqe_compile.cli import main as compile_cli
from moqe_compile.errors import BuildError

from ..models import write_tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


def write(dest: Path, note: str, **kw) -> Path:
    """A minimal bundle (one file) written through the writer."""
    with BundleWriter(dest, **kw) as w:
        w.path("data/a.txt").write_text(note)
        return w.commit({"note": note})


def note(dest: Path) -> str:
    return json.loads((dest / "manifest.json").read_text())["note"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def recipe(tiny_onnx, tiny_images, tmp_path) -> Path:
    r = tmp_path / "tiny.toml"
    write_tiny_recipe(r, tiny_onnx, tiny_images)
    return r


def test_build_keeps_a_directory_that_only_has_a_manifest_json(recipe, tmp_path, capsys):
    # mkdir -p X/src && echo '{"name":"app"}' > X/manifest.json && echo code > X/src/app.js
    x = tmp_path / "X"
    (x / "src").mkdir(parents=True)
    (x / "manifest.json").write_text('{"name":"app"}\n')
    (x / "src" / "app.js").write_text("code\n")
    code = compile_cli.main(["build", str(recipe), "-o", str(x), "-q"])
    err = capsys.readouterr().err
    assert code == BuildError.exit_code
    assert str(x) in err and "--force" in err and "Traceback" not in err
    assert (x / "src" / "app.js").read_text() == "code\n"
    assert (x / "manifest.json").read_text() == '{"name":"app"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "tiny.toml"]  # no leftovers


def test_rebuild_replaces_a_bundle(tmp_path):
    dest = tmp_path / "b"
    write(dest, "one")
    write(dest, "two")
    assert note(dest) == "two" and (dest / "data" / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_bundle_with_an_unlisted_file_is_not_replaced(tmp_path):
    dest = tmp_path / "b"
    write(dest, "one")
    (dest / "data" / "mine.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not a moqe bundle.*--force"):
        write(dest, "two")
    assert (dest / "data" / "mine.txt").read_text() == "keep me"


def test_force_replaces_a_foreign_directory(tmp_path):
    dest = tmp_path / "X"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    write(dest, "one", force=True)
    assert note(dest) == "one" and not (dest / "notes.txt").exists()


def test_cli_passes_force_to_the_build(recipe, tmp_path, monkeypatch):
    import moqe_compile.build as build_mod

    seen = {}
    monkeypatch.setattr(build_mod, "build", lambda cfg, out, quiet=False, force=False: seen.update(force=force) or out)
    assert compile_cli.main(["build", str(recipe), "-o", str(tmp_path / "o"), "-q", "--force"]) == 0
    assert seen == {"force": True}


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_output_that_is_or_is_under_a_file(recipe, tmp_path, capsys, where):
    f = tmp_path / "f.txt"
    f.write_text("not a directory")
    out = f if where == "file" else f / "sub" / "b"
    assert compile_cli.main(["build", str(recipe), "-o", str(out), "-q"]) == BuildError.exit_code
    err = capsys.readouterr().err
    assert str(f) in err and "Traceback" not in err
    assert f.read_text() == "not a directory"


def test_unwritable_parent_is_a_build_error(tmp_path, monkeypatch):
    # Root ignores permission bits, so the refusal of the file system is simulated here; the
    # next test makes a real read-only directory where the suite does not run as root.
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(BuildError, match="cannot write into .*Permission denied"):
        write(tmp_path / "b", "one")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_a_build_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(BuildError, match="Permission denied"):
            write(ro / "b", "one")
    finally:
        ro.chmod(0o755)


def test_stale_siblings_of_dead_builds_are_removed(tmp_path):
    write(tmp_path / "b", "one")
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".b.partial-{dead}-x1", tmp_path / f".b.work-{dead}-x2", tmp_path / f".b.old-{dead}"]
    live = [tmp_path / f".b.partial-{alive}-x3", tmp_path / f".other.partial-{dead}-x4"]
    for d in stale + live:
        d.mkdir()
        (d / "f").write_text("x")
    write(tmp_path / "b", "two")  # b exists, so the dead build's .old copy is not restored
    assert note(tmp_path / "b") == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", *(d.name for d in live)])


def test_crash_between_the_two_renames_keeps_the_old_bundle(tmp_path):
    """A process killed after moving the old bundle aside and before moving the new one in leaves
    no bundle at the path; the next build to it puts the old one back first."""
    dest = tmp_path / "b"
    write(dest, "one")
    crash = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from moqe_compile.bundle import writer
calls = []
real = os.replace
def replace(a, b):
    calls.append(a)
    if len(calls) == 2:
        os._exit(9)  # killed between the renames
    real(a, b)
writer.os.replace = replace
with writer.BundleWriter({str(dest)!r}) as w:
    w.path("data/a.txt").write_text("two")
    w.commit({{"note": "two"}})
"""
    r = subprocess.run([sys.executable, "-c", crash], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert not dest.exists() and any(p.name.startswith(".b.old-") for p in tmp_path.iterdir())
    BundleWriter(dest)  # the next build to that path (here: only its start)
    assert note(dest) == "one" and (dest / "data" / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the dead build's partial is gone too
