"""The wheel carries the shipped recipes, and the installed copy finds them without the checkout.

Built with ``pip wheel --no-deps`` (non-editable), installed with ``pip install --target T``, run
from a directory outside the repository with ``PYTHONPATH=T``: every check asserts that the
imported ``moqe_compile`` is the installed copy, so a lookup through the source tree (the old
``Path(__file__).parents[2] / "bundles"``) fails here.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from . import ROOT, build_wheel, clean_env, pip, run

SHIPPED = sorted(p.stem for p in (ROOT / "moqe_compile" / "recipes").glob("*.toml"))
DEFAULT = "mobilenetv2-demo"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a bare folder (``--target``): put it on PYTHONPATH to use it."""
    target = tmp_path_factory.mktemp("target")
    pip(sys.executable, "install", "-q", "--no-deps", "--target", str(target), str(wheel), cwd=target.parent)
    return target


def _python(installed: Path, cwd: Path, *args: str) -> tuple[int, str, str]:
    """``python ARGS`` with only the installed copy of moqe_compile importable, from ``cwd``."""
    r = run([sys.executable, *args], cwd=cwd, env=clean_env(PYTHONPATH=str(installed)), timeout=300)
    return r.returncode, r.stdout, r.stderr


def test_wheel_lists_the_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert DEFAULT in SHIPPED
    for stem in SHIPPED:
        assert f"moqe_compile/recipes/{stem}.toml" in names, stem
    assert "moqe_compile/recipes/__init__.py" in names
    assert not [n for n in names if n.startswith(("bundles/", "tests/", "bench/", "docs/"))]


def test_installed_copy_finds_its_recipes(installed, tmp_path):
    code = f"""
import json, tomllib
from pathlib import Path
import moqe_compile
from moqe_compile import recipes
from moqe_compile.errors import ConfigError

target = Path({str(installed)!r}).resolve()
assert Path(moqe_compile.__file__).resolve().is_relative_to(target), moqe_compile.__file__
p = recipes.path(recipes.DEFAULT)
assert p.resolve().is_relative_to(target), p
assert recipes.path(recipes.DEFAULT + ".toml") == p
doc = tomllib.loads(p.read_text())
try:
    recipes.path("no-such-recipe")
except ConfigError as e:
    err = str(e)
else:
    raise AssertionError("no ConfigError for an unknown recipe")
print(json.dumps({{"names": recipes.names(), "default": recipes.DEFAULT, "model": doc["model"], "err": err}}))
"""
    rc, out, err = _python(installed, tmp_path, "-c", code)
    assert rc == 0, out + err
    res = json.loads(out)
    assert res["names"] == SHIPPED and res["default"] == DEFAULT
    assert res["model"]["arch"] == "mobilenet_v2"
    assert "'no-such-recipe'" in res["err"] and DEFAULT in res["err"]


def test_cli_lists_recipes(installed, tmp_path):
    # `moqe-compile recipes`: one shipped recipe per line, its name first, then its task.
    rc, out, err = _python(installed, tmp_path, "-m", "moqe_compile.cli.main", "recipes")
    assert rc == 0, out + err
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert sorted(lines) == SHIPPED, out
    assert "image-classification" in lines[DEFAULT]
    assert "causal-lm" in lines["smollm2-135m"]


def test_cli_dry_run_uses_the_shipped_default(installed, tmp_path):
    # `moqe-compile build --dry-run` with no recipe: loads and validates the default from package data,
    # prints its name, task and expert names, and writes nothing.
    out_dir = tmp_path / "out"
    rc, out, err = _python(installed, tmp_path, "-m", "moqe_compile.cli.main", "build", "--dry-run",
                           "-o", str(out_dir))
    assert rc == 0, out + err
    for s in (DEFAULT, "image-classification", "minmax", "percentile", "entropy", "strongest"):
        assert s in out, (s, out)
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
