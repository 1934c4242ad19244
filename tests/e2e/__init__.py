"""End-to-end tests: the installed package as a user gets it (wheel, base dependencies, CLI).

The helpers build from a copy of the sources (``pyproject.toml``, ``README.md``, ``moqe_compile/``)
so a build never writes ``build/`` or ``*.egg-info`` into the checkout, and stale files there
(setuptools does not clean ``build/lib``) can never reach the wheel under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What pip prints when it cannot reach a package index (or the index lacks the release).
_NO_INDEX = ("No matching distribution found", "Could not find a version that satisfies",
             "Failed to establish a new connection", "Network is unreachable",
             "Temporary failure in name resolution", "Max retries exceeded", "ConnectTimeoutError")


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without anything that would let the checkout or the test venv leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def pip(python: str | Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pip ARGS``; skips the test when pip cannot reach an index, fails on any other error."""
    r = run([python, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd, timeout=timeout)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        if any(s in out for s in _NO_INDEX):
            pytest.skip(f"pip cannot reach a package index (pip {' '.join(args[:2])} ...): "
                        f"{out.strip().splitlines()[-1]}")
        pytest.fail(f"pip {' '.join(args)} exited {r.returncode}:\n{out[-4000:]}")
    return r


def source_copy(dest: Path) -> Path:
    """The files a wheel is built from, copied to ``dest`` (no caches, egg-info or build output)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "moqe_compile", dest / "moqe_compile",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so", ".ortchunks*"))
    return dest


def build_wheel(tmp: Path) -> Path:
    """``pip wheel --no-deps`` of a fresh copy of the sources (a regular, non-editable build)."""
    src = source_copy(tmp / "src")
    out = tmp / "wheel"
    pip(sys.executable, "wheel", "--no-deps", "-q", str(src), "-w", str(out), cwd=tmp)
    wheels = sorted(out.glob("moqe_compile-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in out.iterdir()]}"
    return wheels[0]
