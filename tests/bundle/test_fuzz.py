"""Manifest fuzzer: whatever a manifest holds, ``read_bundle`` and ``moqe_compile.load`` either
succeed or raise a ``MoqeError`` (the CLI turns it into one line and an exit code).

Mutations of the tiny bundle's manifest: a value replaced by one of another type, a key
removed, a path rewritten (absolute, escaping, NUL, backslash, very long, another listed
file), a size changed, and raw bytes flipped, inserted or cut. CI runs a few dozen examples
(a few seconds); a longer run:

    MOQE_FUZZ_EXAMPLES=5000 python -m pytest -q tests/bundle/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moqe_compile
from moqe_compile.bundle import read_bundle
from moqe_compile.errors import MoqeError

EXAMPLES = int(os.environ.get("MOQE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=20), st.just([]), st.just({}), st.lists(st.integers(), max_size=3))
PATHS = st.sampled_from(["/etc/passwd", "../x.onnx", "a/../../x", "a\\b", "x\x00y", "", "a" * 5000,
                         "manifest.json", "fp/model.onnx", "router/router.safetensors", "task/labels.json",
                         "report/report.json", ".", "experts"])


def _locations(obj, prefix=()):
    """Every (container path, key) in a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix, k
            yield from _locations(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix, i
            yield from _locations(v, prefix + (i,))


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def mutated(draw, original: dict):
    m = json.loads(json.dumps(original))
    locs = list(_locations(m))
    for _ in range(draw(st.integers(1, 3))):
        where, key = draw(st.sampled_from(locs))
        try:
            parent = _at(m, where)
            kind = draw(st.sampled_from(["type", "delete", "path", "size"]))
            if kind == "delete" and isinstance(parent, dict):
                parent.pop(key, None)
            elif kind == "path":
                parent[key] = draw(PATHS)
            elif kind == "size":
                parent[key] = draw(st.integers(-1, 2**64))
            else:
                parent[key] = draw(LEAVES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this place
    return m


def _outcome(root: Path) -> None:
    try:
        read_bundle(root)
    except MoqeError:
        pass
    try:
        moqe_compile.load(root).close()
    except MoqeError:
        pass


@pytest.fixture(scope="module")
def base(tiny_bundle, tmp_path_factory) -> tuple[Path, bytes]:
    """A copy of the tiny bundle whose manifest each example overwrites, and the original bytes."""
    root = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(tiny_bundle, root)
    return root, (root / "manifest.json").read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_values_give_success_or_a_moqe_error(base, data):
    root, raw = base
    m = data.draw(mutated(json.loads(raw)))
    (root / "manifest.json").write_bytes(json.dumps(m).encode())
    _outcome(root)


@FUZZ
@given(data=st.data())
def test_mutated_bytes_give_success_or_a_moqe_error(base, data):
    root, raw = base
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        op = data.draw(st.sampled_from(["flip", "insert", "cut"]))
        if op == "flip" and buf:
            buf[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i:i + data.draw(st.integers(1, 64))]
    (root / "manifest.json").write_bytes(bytes(buf))
    _outcome(root)
