"""``moqe_compile.load``: the bundle's task picks its runtime; ``moqe_compile.runtime`` is task-free."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import moqe_compile
from moqe_compile.errors import BundleError
from moqe_compile.runtime import BundleRuntime


def test_load_gives_the_image_runtime(tiny_bundle):
    with moqe_compile.load(tiny_bundle, verify=False) as rt, moqe_compile.Runtime.load(tiny_bundle) as ref:
        assert type(rt) is moqe_compile.Runtime and isinstance(rt, BundleRuntime)
        x = np.random.default_rng(0).normal(size=(3, *rt.input_shape)).astype(np.float32)
        a, b = rt.run(x), ref.run(x)
        assert np.array_equal(a.logits, b.logits) and a.experts == b.experts
        assert rt.router_session is not None and rt.routed


def test_load_names_a_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a moqe bundle"):
        moqe_compile.load(tmp_path)


def test_runtime_package_imports_no_task():
    # runtime/ sits below the task plug-ins: they build on it, never the other way round.
    code = ("import sys, moqe_compile.runtime\n"
            "print(sorted(m for m in sys.modules if m.startswith('moqe_compile.tasks') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
