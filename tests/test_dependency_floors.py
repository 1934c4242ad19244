"""The declared minimum onnxruntime and onnx really work: install exactly those versions
into a folder, put it first on PYTHONPATH and run the calibration/quantization tests and a
runtime test in a subprocess. Skipped only when pip cannot reach a package index."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The code paths the floors were chosen for: ORT's calibrators and quantize_static
# (calibrate.py, qdq.py), and serving a bundle through the CPU Runtime and IOBinding sessions.
TESTS = ["tests/quantize/test_quantize.py", "tests/tasks/image/test_runtime_gpu.py",
         "-k", "test_quantize or matches_the_cpu_runtime or cpu_runtime_with_the_tensorrt"]
_OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                      r"resolution|Network is unreachable|ProxyError|ConnectTimeout|Read timed out", re.I)


def _floor(requirements: list[str], package: str) -> str:
    (spec,) = [r for r in requirements if re.fullmatch(rf"{re.escape(package)}\s*>=\s*[\d.]+", r)]
    return spec.split(">=")[1].strip()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared_floors() -> dict[str, str]:
    project = _project()
    return {"onnxruntime": _floor(project["dependencies"], "onnxruntime"),
            "onnx": _floor(project["optional-dependencies"]["build"], "onnx")}


def test_the_gpu_extra_declares_the_same_floors():
    # onnxruntime-gpu replaces the onnxruntime module, so the build code runs on it too.
    gpu = _project()["optional-dependencies"]["gpu"]
    assert {"onnxruntime": _floor(gpu, "onnxruntime-gpu"), "onnx": _floor(gpu, "onnx")} == declared_floors()


def test_unit_tests_pass_on_the_declared_minimum_versions(tmp_path):
    floors = declared_floors()
    target = tmp_path / "floor"
    pins = [f"{p}=={v}" for p, v in floors.items()]
    # --no-deps: only these two change; numpy, protobuf etc. stay the environment's.
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--retries", "1",
                          "--timeout", "20", "--target", str(target), *pins],
                         capture_output=True, text=True, timeout=240)
    if pip.returncode != 0:
        if _OFFLINE.search(pip.stderr):
            pytest.skip(f"pip cannot reach a package index to install {pins}: {pip.stderr.strip()[-300:]}")
        pytest.fail(f"pip install {pins} failed:\n{pip.stderr[-3000:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    seen = subprocess.run([sys.executable, "-c", "import onnx, onnxruntime; print(onnxruntime.__version__, "
                           "onnx.__version__, onnxruntime.__file__)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    ort_v, onnx_v, where = seen.stdout.split()
    assert (Version(ort_v), Version(onnx_v)) == (Version(floors["onnxruntime"]), Version(floors["onnx"]))
    assert where.startswith(str(target))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, f"on onnxruntime {ort_v} / onnx {onnx_v}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    assert re.search(r"\b[1-9]\d* passed", run.stdout)
