"""The manifest format, pinned: one golden skeleton per task (``golden/<task>.json``).

A skeleton is a manifest's format without its values: dict keys recursively, a list by its first
element, every leaf as its type name. The golden files were generated ONCE from the tiny bundles
that the code before the task restructure (commit 9c1f27d) built with that code's own test
fixtures (in a worktree of 9c1f27d, a scratch test wrote ``skeleton(manifest)`` of its conftest's
``tiny_bundle`` and of tests/lm/test_lm_build.py's ``lm_bundle``, ``json.dumps(indent=1,
sort_keys=True)``). Today's tiny bundles (the suite's ``tiny_bundle`` and ``lm_bundle``) must have
the same skeleton, except for the differences listed in ALLOWED below, each with its reason.
Regenerate a golden file only for a deliberate format change (and bump the schema version if
readers break).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def skeleton(obj):
    """The format of a JSON value: dicts by their keys, lists by their first element, leaves as type names."""
    if isinstance(obj, dict):
        return {k: skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [skeleton(obj[0])] if obj else []
    return {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}[type(obj)]


def differences(old, new, path: str = "") -> list[str]:
    """Every place where skeleton ``new`` differs from ``old``, one line each:
    ``+path`` (only in new), ``-path`` (only in old), ``~path: old -> new`` (changed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys()):
            p = f"{path}.{k}" if path else k
            if k not in new:
                out.append(f"-{p}")
            elif k not in old:
                out.append(f"+{p}")
            else:
                out += differences(old[k], new[k], p)
        return out
    if isinstance(old, list) and isinstance(new, list) and old and new:
        return differences(old[0], new[0], f"{path}[0]")
    if old != new:
        return [f"~{path}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []


# Differences from the golden (pre-restructure) skeletons that were made on purpose. Each entry:
# the exact line that ``differences`` prints -> why it is allowed; anything else fails, and so does
# an entry that no longer occurs. None so far: the restructured code writes the same skeletons
# (build_seconds' stage names included). The LM gate's "single-expert" -> "single" is a value,
# not format: test_both_tasks_spell_the_gate_decision_alike and the old-spelling test cover it.
ALLOWED: dict[str, dict[str, str]] = {
    "image-classification": {
        "+routing.default_rule": "which rule chose the served single expert (the gated choice among single "
                                 "experts); an added key, older readers ignore it",
        "+experts[0].steps.peak_rss_mb": "each expert's peak resident memory while it was built; an added key, "
                                         "older readers ignore it"},
    "causal-lm": {
        "+routing.default_rule": "which rule chose the served single expert; an added key, older readers ignore it",
        **{f"{s}{where}.{key}": why for where in ("build_config._data.experts[0]", "experts[0].recipe")
           for s, key, why in (
               ("+", "head_bits", "the LM head's width (4, 8 or 32) replaced the boolean; recipes and "
                                  "manifests that still say quantize_lm_head read as before (tests/tasks/causal_lm)"),
               ("-", "quantize_lm_head", "replaced by head_bits, still read"))},
        "+experts[0].mean_weight_bits": "the expert's mean weight bits read off its graph (the head at its own "
                                        "width); an added key, older readers ignore it",
        "+experts[0].fused_matmulnbits": "how many groups of sibling MatMulNBits (q/k/v, gate/up) the build "
                                         "merged into one kernel each; an added key, older readers ignore it"},
}


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _check(task: str, manifest: dict):
    golden = json.loads((GOLDEN / f"{task}.json").read_text())
    found = differences(golden, skeleton(manifest))
    unexplained = [d for d in found if d not in ALLOWED[task]]
    stale = [d for d in ALLOWED[task] if d not in found]
    assert not unexplained, f"{task} manifest format changed (not in ALLOWED):\n" + "\n".join(unexplained)
    assert not stale, f"ALLOWED lists differences that no longer occur for {task}:\n" + "\n".join(stale)


def test_skeleton_and_differences():
    m = {"a": [{"b": 1, "c": [0.5, "x"]}], "d": None, "e": [], "f": True}
    s = skeleton(m)
    assert s == {"a": [{"b": "int", "c": ["float"]}], "d": "null", "e": [], "f": "bool"}
    t = json.loads(json.dumps(s))
    t["a"][0]["b"] = "str"
    del t["d"]
    t["g"] = {"h": "int"}
    assert differences(s, t) == ['~a[0].b: "int" -> "str"', "-d", "+g"]


def test_image_manifest_format_is_golden(tiny_bundle):
    _check("image-classification", _manifest(tiny_bundle))


def test_causal_lm_manifest_format_is_golden(lm_bundle):
    _check("causal-lm", _manifest(lm_bundle[0]))


def test_both_tasks_spell_the_gate_decision_alike(tiny_bundle, lm_bundle):
    """A value, not format (so not in the skeletons): LM bundles wrote "single-expert" before the
    two tasks shared one gate; every bundle now writes "routed" or "single"."""
    from moqe_compile.gate import SINGLE

    assert SINGLE == "single"
    for root in (tiny_bundle, lm_bundle[0]):
        assert _manifest(root)["router"]["gate"]["decision"] in ("routed", SINGLE)


def test_a_manifest_with_the_old_single_expert_gate_loads_and_inspects(lm_bundle, tmp_path, capsys):
    """LM bundles built before the restructure wrote ``"single-expert"``; readers still take it."""
    from moqe_compile import load
    from moqe_compile.bundle import read_bundle
    from moqe_compile.cli.main import main as compile_cli

    root = shutil.copytree(lm_bundle[0], tmp_path / "old")
    m = _manifest(root)
    m["router"]["gate"]["decision"] = "single-expert"
    m["routing"]["enabled"] = False
    (root / "manifest.json").write_text(json.dumps(m))
    assert read_bundle(root).manifest["router"]["gate"]["decision"] == "single-expert"
    assert compile_cli(["inspect", str(root)]) == 0
    gate = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gate")]
    assert len(gate) == 1 and gate[0].startswith("gate        single:"), gate
    with load(root) as rt:
        assert not rt.routing_enabled
