"""The benchmark scripts run by path, outside the suite: each one at least starts (``--help``),
so a moved module or a wrong ``sys.path`` line shows here and not when someone runs a study."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# The scripts in sub-folders find bench/common.py through their own sys.path line.
NESTED = sorted(p for p in BENCH.rglob("*.py") if p.parent != BENCH and "from common import" in p.read_text())


@pytest.mark.parametrize("script", NESTED, ids=lambda p: str(p.relative_to(BENCH)))
def test_nested_bench_script_starts(script):
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_there_are_nested_scripts_to_check():
    assert NESTED


def _compare(before, after):
    return subprocess.run([sys.executable, str(BENCH / "build_compare.py"), str(before), str(after)],
                          capture_output=True, text=True, timeout=120)


def test_build_compare_passes_a_bundle_against_itself(tiny_bundle):
    res = _compare(tiny_bundle, tiny_bundle)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "same results within tolerance" in res.stdout
    assert "quantize" in res.stdout  # the build's stage table was read


def test_build_compare_names_a_loss_that_moved(tiny_bundle, tmp_path):
    import numpy as np

    moved = tmp_path / "moved"
    shutil.copytree(tiny_bundle, moved)
    path = moved / "report" / "loss_matrix.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.endswith("_loss") and arrays[k].dtype.kind == "f")
    arrays[key] = arrays[key] + 1e-3
    np.savez(path, **arrays)
    res = _compare(tiny_bundle, moved)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"DIFFERENT: {key}" in res.stdout


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instruction_counts_finds_the_dispatch_on_top_of_the_bare_session(tiny_bundle, tmp_path):
    out = tmp_path / "counts.json"
    res = subprocess.run([sys.executable, str(BENCH / "instruction_counts.py"), str(tiny_bundle), "--batches", "1",
                          "--calls", "2", "--repeats", "1", "--candidates", "bare", "gated", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    row = json.loads(out.read_text())["batches"]["1"]
    # The tiny bundle routes: Runtime.run adds the router and the dispatch to the expert's session.
    assert row["gated"]["per_call"] > row["bare"]["per_call"] > 0
    assert row["gated"]["over_bare"] > 1
