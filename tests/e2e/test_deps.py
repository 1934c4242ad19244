"""The runtime runs image bundles with the base dependencies only (numpy, onnxruntime, pillow,
jsonschema).

One fresh virtualenv per session holds the declared base dependencies and the project's wheel
(``--no-deps``): no torch, onnx, scipy, tqdm or safetensors. Any import of a non-base package
on the runtime path fails here with ``ModuleNotFoundError``. The bundle itself is built in the
test environment (``tiny_bundle``, tests/conftest.py) and only *run* in the base venv.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest

from . import ROOT, build_wheel, pip, run

BASE = {"numpy", "onnxruntime", "pillow", "jsonschema"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _base_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_base_dependencies_are_the_runtimes():
    # The install split: `pip install moqe-compile` is the runtime; building needs [build].
    assert {_name(r) for r in _base_requirements()} == BASE


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A virtualenv with the base dependencies and the project (``--no-deps``); its ``bin``."""
    tmp = tmp_path_factory.mktemp("base_venv")
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=sys.platform != "win32").create(env)
    python = env / "bin" / "python"
    pip(python, "install", "-q", *_base_requirements(), cwd=tmp)
    pip(python, "install", "-q", "--no-deps", str(build_wheel(tmp)), cwd=tmp)
    return env / "bin"


def test_runtime_imports_without_torch(base_venv, tmp_path):
    code = ("import importlib.util\n"
            "extra = [m for m in ('torch', 'onnx', 'scipy', 'tqdm', 'safetensors') if importlib.util.find_spec(m)]\n"
            "assert not extra, f'the base venv has {extra}'\n"
            "import sys, moqe_compile, moqe_compile.runtime, moqe_compile.cli.run\n"
            "torch = sorted(m for m in sys.modules if m.startswith('torch'))\n"
            "assert not torch, torch\n"
            "assert 'site-packages' in moqe_compile.__file__, moqe_compile.__file__\n"
            "print(moqe_compile.Runtime.__name__)")
    r = run([base_venv / "python", "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "Runtime"


def test_moqe_run_with_base_dependencies(base_venv, tiny_bundle, tmp_path):
    rng = np.random.default_rng(0)
    x = tmp_path / "x.npy"
    np.save(x, rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8))  # raw HWC images: preprocessed by the runtime
    r = run([base_venv / "moqe-run", tiny_bundle, "--input", x, "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    manifest = json.loads((Path(tiny_bundle) / "manifest.json").read_text())
    experts = {e["name"] for e in manifest["experts"]}
    assert len(res["predictions"]) == 3
    for p in res["predictions"]:
        assert p["expert"] in experts
        assert 0.0 <= p["router_confidence"] <= 1.0
        probs = [t["prob"] for t in p["topk"]]  # the tiny model has 4 classes: all of them
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1.0) < 1e-4
    assert set(res["timing_ms"]) >= {"router", "experts", "total"}
