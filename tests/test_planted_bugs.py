"""qa/planted_bugs.py stays runnable: every planted bug's old text occurs exactly once in
today's source and its test files exist (cheap: no suite is run here)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("planted_bugs", ROOT / "qa" / "planted_bugs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("planted_bugs", mod)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["planted_bugs"])
    mod = sys.modules["planted_bugs"]
    return mod


def test_every_planted_bug_applies_to_the_current_source():
    mod = _module()
    assert mod.check_edits() == []
    assert len(mod.BUGS) >= 13 and len({b.name for b in mod.BUGS}) == len(mod.BUGS)


def test_a_missing_old_text_is_reported(tmp_path):
    mod = _module()
    (tmp_path / "m.py").write_text("x = 1\n")
    (tmp_path / "t.py").write_text("")
    bug = mod.Bug("b", "", (("m.py", "y = 2", "y = 3"),), ("t.py",))
    assert mod.check_edits(tmp_path, [bug]) == ["b: 'y = 2' occurs 0 times in m.py (expected once)"]
