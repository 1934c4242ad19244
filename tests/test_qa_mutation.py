"""The mutation-score script's configuration stays valid without running it (the run takes
minutes; qa/README.md#mutation-score): every module and test it names exists, and every
equivalent-mutant exclusion names a mutant that mutmut really makes of today's source."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What decides correctness (docs/results.md#mutation-score-of-the-core): each must be mutated.
CORE = {"moqe_compile/bundle/reader.py", "moqe_compile/bundle/writer.py", "moqe_compile/bundle/manifest.py",
        "moqe_compile/runtime/dispatch.py", "moqe_compile/gate.py", "moqe_compile/evaluate/controls.py",
        "moqe_compile/evaluate/stats.py", "moqe_compile/serving/protocol.py", "moqe_compile/router/fallback.py"}


@pytest.fixture(scope="module")
def qa():
    spec = importlib.util.spec_from_file_location("qa_mutation", ROOT / "qa" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qa_mutation"] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def _test_paths(args: list[str]) -> tuple[list[str], list[str]]:
    """(test files, deselected node ids) of a group's pytest arguments."""
    files, deselected = [], []
    it = iter(args)
    for a in it:
        if a == "--deselect":
            deselected.append(next(it))
        elif not a.startswith("-"):
            files.append(a)
    return files, deselected


def test_every_core_module_is_in_exactly_one_group(qa):
    cfg, groups = qa.load_config()
    modules = [m for g in groups for m in g.modules]
    assert len(modules) == len(set(modules))
    assert CORE <= set(modules)
    assert all((ROOT / m).is_file() and m.endswith(".py") for m in modules)
    assert 0 < cfg["min_score"] <= 1 and cfg["max_children"] >= 1
    assert len({g.name for g in groups}) == len(groups) and all(g.timeout_s > 0 for g in groups)


def test_every_named_test_exists(qa):
    _, groups = qa.load_config()
    for g in groups:
        files, deselected = _test_paths(g.tests)
        assert files, g.name
        for f in files:
            assert (ROOT / f).is_file(), f
        for node in deselected:
            path, _, name = node.partition("::")
            assert path in files, node
            defs = {n.name for n in ast.parse((ROOT / path).read_text()).body if isinstance(n, ast.FunctionDef)}
            assert name in defs, node


def test_mutant_lines_point_at_the_source_they_change(qa):
    """The report's line numbers: each mutant's first original line is that line of the file."""
    module = "moqe_compile/runtime/dispatch.py"
    lines = (ROOT / module).read_text().split("\n")
    mutants = qa.generate(module)
    assert len(mutants) > 20
    for m in mutants:
        assert m.original and m.original != m.mutant
        assert lines[m.line - 1].strip() == m.original.split("\n")[0], (m.key, m.line)
    assert {m.function for m in mutants} == {"group_by_expert", "scatter", "split_requests"}


def test_every_exclusion_names_a_mutant_of_todays_source(qa):
    _, groups = qa.load_config()
    modules = {m for g in groups for m in g.modules}
    exclusions = qa.load_exclusions()
    by_module: dict[str, list] = {}
    for e in exclusions:
        assert e.module in modules, e
        assert len(e.reason) > 20, e  # a reason a reviewer can check
        by_module.setdefault(e.module, []).append(e)
    for module, excl in by_module.items():
        qa.match_exclusions(qa.generate(module), excl)
        stale = [(e.function, e.original, e.mutant) for e in excl if not e.matched]
        assert not stale, f"exclusions in {module} that match no mutant: {stale}"
