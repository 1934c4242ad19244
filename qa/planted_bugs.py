"""Plant known bugs, one at a time, in a copy of the package and check that the tests catch each.

    python qa/planted_bugs.py                 # every bug
    python qa/planted_bugs.py --only ray-one-handle,gate-p-equals-alpha
    python qa/planted_bugs.py --list

Each bug is a list of exact text replacements in ``moqe_compile/`` plus the test files that
must fail with it. The script copies the repository (without .git) to a temporary folder,
applies one bug there, runs ``pytest -x`` on its test files with that copy first on
``PYTHONPATH`` (the installed console scripts then import the copy too), and records whether
pytest reported failing tests (exit code 1). It refuses to run when a replacement's old text
is not found exactly once, so a refactoring cannot silently turn a bug into a no-op:
tests/test_planted_bugs.py checks that on every test run. Prints a table (bug, tests,
caught, seconds) and exits 1 if any bug survived.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]  # (file under the repository, old text, new text)
    tests: tuple[str, ...]


BUGS = [
    Bug("load-skips-verify", "Runtime.load opens the bundle without checking its hashes",
        (("moqe_compile/tasks/image/runtime.py", "b = read_bundle(path, verify=verify)",
          "b = read_bundle(path, verify=False)"),
         ("moqe_compile/tasks/image/runtime.py", "only_expert, route_only, verify, all_experts)",
          "only_expert, route_only, False, all_experts)")),
        ("tests/runtime/test_tamper.py",)),
    Bug("ray-one-handle", "the Ray ingress sends every expert group to the first expert's handle",
        (("moqe_compile/serving/ray_serve.py", "self.handles[k].remote(", "self.handles[0].remote("),),
        ("tests/serving/test_ray.py",)),
    Bug("lm-no-kv-cache", "LM generation drops its KV cache: each step sees only the newest token",
        (("moqe_compile/tasks/causal_lm/runtime.py",
          "logits, past = sess.step(x, np.ones((1, n_total), np.int64), past)",
          "logits, past = sess.step(x, np.ones((1, x.shape[1]), np.int64), sess.empty_past(1))"),),
        ("tests/tasks/causal_lm/test_oracle.py",)),
    Bug("sensitivity-all-layers", "layer sensitivity quantizes every layer in every run",
        (("moqe_compile/quantize/sensitivity.py", 'method="minmax", only=[l.node])', 'method="minmax", only=None)'),),
        ("tests/quantize/test_sensitivity.py",)),
    Bug("gate-p-equals-alpha", "the significance gate accepts p == alpha",
        (("moqe_compile/gate.py", "return p is not None and p < alpha", "return p is not None and p <= alpha"),),
        ("tests/test_gate.py",)),
    Bug("route-ignores-router", "the image runtime serves every sample with the default expert",
        (("moqe_compile/tasks/image/runtime.py", "        idx, conf = self.route(batch)\n",
          "        idx, conf = np.full(len(batch), self.default_expert), np.ones(len(batch), np.float32)\n"),),
        ("tests/runtime/test_routed.py", "tests/serving/test_server.py")),
    Bug("scatter-swaps-groups", "outputs go back to the samples of the next expert group",
        (("moqe_compile/runtime/dispatch.py", "for (_, members), y in zip(groups, outputs):",
          "for (_, members), y in zip(groups, outputs[1:] + outputs[:1]):"),),
        ("tests/runtime/test_routed.py", "tests/serving/test_server.py")),
    Bug("batcher-one-worker", "the batcher starts one worker whatever ``workers`` says",
        (("moqe_compile/runtime/batcher.py", "for i in range(workers)]", "for i in range(1)]"),),
        ("tests/runtime/test_routed.py",)),
    Bug("batcher-ignores-delay", "the batcher waits an hour for a batch to fill",
        (("moqe_compile/runtime/batcher.py", "deadline = first.t_enqueued + self.max_delay",
          "deadline = first.t_enqueued + 3600.0"),),
        ("tests/runtime/test_routed.py",)),
    Bug("batcher-split-first-rows", "every merged request gets the first request's rows",
        (("moqe_compile/runtime/batcher.py", "self._split(res, start, start + len(r.x))",
          "self._split(res, 0, len(r.x))"),),
        ("tests/runtime/test_routed.py",)),
    Bug("fallback-to-default", "low-confidence inputs go to the default expert, not the fallback expert",
        (("moqe_compile/runtime/base.py", "self.fallback_threshold, self.fallback_expert)",
          "self.fallback_threshold, self.default_expert)"),),
        ("tests/runtime/test_routed.py",)),
    Bug("bls-no-fallback", "the Triton BLS model ignores the fallback threshold",
        (("moqe_compile/serving/triton_bls/model.py", "_fallback.apply_fallback(probs, self.threshold, self.fallback)",
          "_fallback.apply_fallback(probs, 0.0, self.fallback)"),),
        ("tests/serving/test_triton.py",)),
    Bug("reader-no-digest-check", "the bundle reader accepts a file whose sha256 differs",
        (("moqe_compile/bundle/reader.py", "    if digest != expected:\n", "    if digest != expected and False:\n"),),
        ("tests/runtime/test_tamper.py",)),
    Bug("lm-score-shifted", "LM scoring compares each position's prediction with its own token",
        (("moqe_compile/tasks/causal_lm/score.py", "ids[:, 1:, None]", "ids[:, :-1, None]"),),
        ("tests/tasks/causal_lm/test_oracle.py",)),
]


def check_edits(root: Path = ROOT, bugs: list[Bug] = BUGS) -> list[str]:
    """Problems with the bugs' old texts in ``root``: each must occur exactly once."""
    problems = []
    for bug in bugs:
        for rel, old, _ in bug.edits:
            n = (root / rel).read_text().count(old)
            if n != 1:
                problems.append(f"{bug.name}: {old!r} occurs {n} times in {rel} (expected once)")
        for t in bug.tests:
            if not (root / t).is_file():
                problems.append(f"{bug.name}: test file {t} does not exist")
    return problems


def plant(copy: Path, bug: Bug) -> None:
    for rel, old, new in bug.edits:
        p = copy / rel
        text = p.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{bug.name}: {old!r} is not in {rel} exactly once; update the bug.")
        p.write_text(text.replace(old, new))


def run_one(bug: Bug, timeout: float) -> tuple[str, float]:
    """("yes" / "NO" / "error: ..."), seconds."""
    with tempfile.TemporaryDirectory(prefix=f"moqe-bug-{bug.name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv", "*.egg-info"))
        plant(copy, bug)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"error: timed out after {timeout:.0f} s", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
    if res.returncode == 1:
        return "yes", seconds
    if res.returncode == 0:
        return "NO", seconds
    tail = (res.stdout + res.stderr).strip().splitlines()[-1:] or [""]
    return f"error: pytest exit {res.returncode}: {tail[0][:80]}", seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated bug names")
    ap.add_argument("--list", action="store_true", help="list the bugs and exit")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per bug (default 1800)")
    args = ap.parse_args(argv)
    if args.list:
        for b in BUGS:
            print(f"{b.name:<26} {b.what}")
        return 0
    problems = check_edits()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    bugs = BUGS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {b.name for b in BUGS})
        if unknown:
            print(f"unknown bug(s) {unknown}; see --list", file=sys.stderr)
            return 2
        bugs = [b for b in BUGS if b.name in names]
    rows = []
    for bug in bugs:
        caught, seconds = run_one(bug, args.timeout)
        rows.append((bug.name, " ".join(bug.tests), caught, seconds))
        print(f"{bug.name}: caught {caught} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print("| bug | tests run | caught | seconds |\n|---|---|---|---|")
    for name, tests, caught, seconds in rows:
        print(f"| `{name}` | {tests} | {caught} | {seconds:.0f} |")
    return 0 if all(r[2] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
