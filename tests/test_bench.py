"""The benchmark scripts run by path, outside the suite: each one at least starts (``--help``),
so a moved module or a wrong ``sys.path`` line shows here and not when someone runs a study."""

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
