"""A bundle whose expert graph changed after the build is refused by every entry point a user
has: ``Runtime.load``, ``moqe_compile.load``, and the installed ``moqe-run`` and ``moqe-serve``
console scripts (run as a user runs them, in a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moqe_compile
from moqe_compile import Runtime
from moqe_compile.errors import BundleError, BundleIntegrityError

from ..models import CROP, ROUTED_EXPERTS


@pytest.fixture
def tampered(routed_bundle, tmp_path) -> Path:
    """A copy of the routed bundle with one weight of an expert's graph changed (same size)."""
    root = shutil.copytree(routed_bundle, tmp_path / "tampered")
    graph = root / f"experts/{ROUTED_EXPERTS[1]}/onnxruntime-cpu.onnx"
    data = bytearray(graph.read_bytes())
    data[-20] ^= 0x01
    graph.write_bytes(bytes(data))
    return root


def console_script(name: str) -> str:
    """The installed script beside this interpreter (where pip put it), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e . puts it beside the interpreter")
    return found


def _env() -> dict:
    # The checkout under test first, as for the rest of the suite.
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def test_runtime_load_refuses_it(tampered, routed_bundle):
    with Runtime.load(routed_bundle):  # the original loads
        pass
    with pytest.raises(BundleIntegrityError, match="onnxruntime-cpu.onnx"):
        Runtime.load(tampered)
    with pytest.raises(BundleIntegrityError):
        moqe_compile.load(tampered)


def test_moqe_run_refuses_it(tampered, routed_bundle, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, CROP, CROP), np.float32))
    ok = subprocess.run([console_script("moqe-run"), str(routed_bundle), "--input", str(x), "--json"],
                        capture_output=True, text=True, timeout=300, env=_env())
    assert ok.returncode == 0, ok.stderr
    res = subprocess.run([console_script("moqe-run"), str(tampered), "--input", str(x), "--json"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == BundleError.exit_code and res.stdout == ""
    assert "onnxruntime-cpu.onnx" in res.stderr and "Traceback" not in res.stderr


def test_moqe_serve_refuses_it(tampered):
    # It must exit with the error instead of serving (the timeout would end a server).
    res = subprocess.run([console_script("moqe-serve"), str(tampered), "--port", "0"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == BundleError.exit_code
    assert "onnxruntime-cpu.onnx" in res.stderr and "Traceback" not in res.stderr
