import importlib
import pkgutil
import subprocess
import sys

import moqe_compile


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(moqe_compile.__path__, "moqe_compile.")]
    assert "moqe_compile.runtime.base" in names
    for name in names:
        importlib.import_module(name)


def test_runtime_import_does_not_pull_torch():
    # Services embed the runtime; it must not cost a torch import.
    code = "import sys, moqe_compile.runtime, moqe_compile.cli.run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
