"""The package's shape: the import-linter contracts in pyproject.toml (one-way flow, task plug-ins
independent, evaluate builds nothing, runtimes on the base install) and no private-name imports."""

import ast
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
