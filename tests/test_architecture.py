"""The package's shape: the import-linter contracts in pyproject.toml (one-way flow, task plug-ins
independent, evaluate builds nothing, runtimes on the base install) and no private-name imports."""

import ast
import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moqe_compile"


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``from moqe_compile.<module> import _name`` statements (a private name of another module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moqe_compile"):
            found += [f"{path.relative_to(root)}:{node.lineno} {node.module}.{a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_nothing_imports_a_private_name_of_another_module():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    assert files
    assert [hit for f in files for hit in _private_imports(f)] == []


def test_private_import_check_sees_one(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from moqe_compile.runtime.base import _hidden, public\nfrom os import _exit\nimport moqe_compile\n")
    assert _private_imports(f, tmp_path) == ["m.py:1 moqe_compile.runtime.base._hidden"]


def _unresolved_imports(path: Path) -> list[str]:
    """``from moqe_compile.x import name`` statements whose module or name does not exist."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moqe_compile")):
            continue
        try:
            module = importlib.import_module(node.module)
        except ImportError as e:
            missing.append(f"{path.name}:{node.lineno} {node.module} ({e})")
            continue
        for alias in node.names:
            if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    return missing


def test_bench_scripts_import_what_exists():
    """The benchmarks run by path, outside the suite: an import of a moved or renamed name would
    only show when someone runs them."""
    scripts = sorted((ROOT / "bench").rglob("*.py"))
    assert scripts
    assert [m for f in scripts for m in _unresolved_imports(f)] == []


def test_unresolved_import_check_sees_one(tmp_path):
    f = tmp_path / "s.py"
    f.write_text("from moqe_compile.quantize import no_such_name\nfrom moqe_compile.errors import ConfigError\n")
    assert _unresolved_imports(f) == ["s.py:1 moqe_compile.quantize.no_such_name"]
