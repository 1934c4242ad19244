#!/usr/bin/env python3
"""Mutation score of the modules that decide correctness, per module, within a time bound.

    python qa/mutation.py                 # every run group of qa/mutation.toml
    python qa/mutation.py --only dispatch --survivors

Each run group of ``qa/mutation.toml`` names source files and the fast unit tests that cover
them. For each group this script copies the package and the tests into a scratch directory
(``build/mutation/<group>``; ``--workdir`` moves it), runs ``mutmut run`` there under ``nice``
and a wall-clock limit, and prints per module: mutants, killed, survived, timeout, no tests,
other (suspicious, segfault, not checked), equivalent-excluded and the score,
killed / (mutants - excluded). Timeouts are reported apart and not counted as killed.

Equivalent mutants (no test can tell them from the original) are listed in
``qa/mutation-equivalent.toml``, each by module, function, the original and the mutated
source line, and the reason. An exclusion that matches no mutant, or whose mutant a test
kills, is an error: exclusions stay explicit and current.

Why mutmut (3.x) and not cosmic-ray: mutmut forks each mutant's test run from one process that
has already imported the package and the tests (torch, via tests/conftest.py, takes seconds to
import), and runs only the tests that call the mutated function; cosmic-ray starts a fresh test
command per mutant, which costs that import once per mutant (thousands of times).

Exit status: 0 when every module reaches ``min_score`` and every exclusion is current, 1
otherwise, 2 when a run could not be made (failed clean tests, time limit).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "qa" / "mutation.toml"
EQUIVALENT = ROOT / "qa" / "mutation-equivalent.toml"

# mutmut's exit codes of a mutant's test run -> the columns of the report.
KILLED, SURVIVED, TIMEOUT, NO_TESTS, OTHER = "killed", "survived", "timeout", "no tests", "other"
_STATUS = {1: KILLED, 3: KILLED, 0: SURVIVED, 5: NO_TESTS, 33: NO_TESTS, 36: TIMEOUT, 24: TIMEOUT, -24: TIMEOUT,
           152: TIMEOUT, 255: TIMEOUT}


# ------------------------------------------------------------------ configuration
@dataclass
class Group:
    name: str
    modules: list[str]
    tests: list[str]
    timeout_s: int


@dataclass
class Exclusion:
    module: str
    function: str
    original: str
    mutant: str
    reason: str
    matched: list[str] = field(default_factory=list)


def load_config(path: Path = CONFIG) -> tuple[dict, list[Group]]:
    cfg = tomllib.loads(path.read_text("utf-8"))
    groups = [Group(g["name"], list(g["modules"]), list(g["tests"]), int(g["timeout_s"])) for g in cfg["group"]]
    return cfg, groups


def load_exclusions(path: Path = EQUIVALENT) -> list[Exclusion]:
    data = tomllib.loads(path.read_text("utf-8"))
    return [Exclusion(e["module"], e["function"], e["original"].strip(), e["mutant"].strip(), e["reason"])
            for e in data.get("equivalent", [])]


# ------------------------------------------------------------------ what each mutant changes
@dataclass
class Mutant:
    key: str  # mutmut's name, e.g. moqe_compile.runtime.dispatch.x_scatter__mutmut_3
    module: str  # source path
    function: str  # "scatter" or "Bundle.read"
    line: int  # first changed line in the source file
    original: str  # changed source lines, stripped, joined by newlines
    mutant: str
    status: str = "not checked"


def function_of(key: str) -> tuple[str, str]:
    """(function as "name" or "Class.name", the generated-function prefix) of a mutmut key."""
    mangled = key.rpartition(".")[2].partition("__mutmut_")[0]
    if mangled.startswith("xǁ"):
        _, cls, name = mangled.split("ǁ")
        return f"{cls}.{name}", mangled
    return mangled[2:], mangled


def _def_lines(source: str) -> dict[str, int]:
    """Line of each function's ``def`` ("name" or "Class.name")."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{sub.name}"] = sub.lineno
    return out


def describe(module: str, source: str, code: str, spans: dict[str, tuple[int, int]]) -> list[Mutant]:
    """Every mutant of ``module`` with the source lines it changes, from mutmut's mutated file
    ``code`` and its index of generated functions ``spans`` (name -> 1-based inclusive lines)."""
    lines, defs, out = code.split("\n"), _def_lines(source), []
    dotted = module[:-3].replace("/", ".")
    for name, (start, end) in spans.items():
        if name.endswith("__mutmut_orig"):
            continue
        key = f"{dotted}.{name}"
        function, prefix = function_of(key)
        o_start, o_end = spans[f"{prefix}__mutmut_orig"]
        orig = lines[o_start - 1:o_end]
        mut = [ln.replace(f"def {name}(", f"def {prefix}__mutmut_orig(", 1) for ln in lines[start - 1:end]]
        removed, added, first = [], [], None
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=orig, b=mut, autojunk=False).get_opcodes():
            if op != "equal":
                first = i1 if first is None else first
                removed += orig[i1:i2]
                added += mut[j1:j2]
        # The copy starts at the ``def`` line (decorators are not copied).
        def_offset = next(i for i, ln in enumerate(orig) if ln.lstrip().startswith(("def ", "async def ")))
        line = defs.get(function, 0) + (first or 0) - def_offset
        out.append(Mutant(key, module, function, line, "\n".join(s.strip() for s in removed),
                          "\n".join(s.strip() for s in added)))
    return out


def generate(module: str, root: Path = ROOT) -> list[Mutant]:
    """The mutants mutmut makes of ``module`` (no test run): for checking the exclusions."""
    import tempfile

    from mutmut import configuration
    from mutmut.mutation.file_mutation import mutate_file_contents

    source = (root / module).read_text("utf-8")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        # mutmut reads its configuration from the working directory.
        Path(tmp, "pyproject.toml").write_text('[tool.mutmut]\nsource_paths = ["moqe_compile"]\n')
        os.chdir(tmp)
        try:
            configuration.reset_config()
            mf = mutate_file_contents(module, source)
        finally:
            os.chdir(cwd)
            configuration.reset_config()
    spans = {k: (v.start, v.end) for k, v in mf.line_span_by_function_name.items()}
    return describe(module, source, mf.code, spans)


def match_exclusions(mutants: list[Mutant], exclusions: list[Exclusion]) -> dict[str, Exclusion]:
    """Mutant key -> the exclusion that names it (same module, function, original and mutated lines)."""
    out = {}
    for e in exclusions:
        for m in mutants:
            if (m.module, m.function, m.original, m.mutant) == (e.module, e.function, e.original, e.mutant):
                e.matched.append(m.key)
                out[m.key] = e
    return out


# ------------------------------------------------------------------ running mutmut
def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def prepare(group: Group, work: Path, keep: bool) -> Path:
    """A scratch copy of the package and tests, with the group's mutmut configuration."""
    d = work / group.name
    if d.exists() and not keep:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    for sub in ("moqe_compile", "tests"):
        if (d / sub).exists():
            shutil.rmtree(d / sub)
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    conf = (ROOT / "pyproject.toml").read_text("utf-8")
    conf += ("\n[tool.mutmut]\n"
             'source_paths = ["moqe_compile"]\n'
             f"only_mutate = {_toml_list(group.modules)}\n"
             f"pytest_add_cli_args_test_selection = {_toml_list(group.tests)}\n"
             'pytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
             "use_git_change_detection = false\n")
    (d / "pyproject.toml").write_text(conf)
    return d


def run_mutmut(d: Path, group: Group, max_children: int) -> tuple[int | None, float]:
    """Run mutmut in ``d``; (exit code or None on the time limit, seconds)."""
    t0 = time.monotonic()
    with open(d / "mutmut.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                             cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": "", "MOQE_MUTATION": "1"})
        try:
            code = p.wait(timeout=group.timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # a time limit, Ctrl-C or SIGTERM: stop mutmut and its workers too
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return code, time.monotonic() - t0


def results(d: Path, module: str) -> list[Mutant]:
    source = (ROOT / module).read_text("utf-8")
    mutated = d / "mutants" / module
    spans = {k: tuple(v) for k, v in json.loads(Path(f"{mutated}.spans").read_text())["spans"].items()}
    mutants = describe(module, source, mutated.read_text("utf-8"), spans)
    codes = json.loads(Path(f"{mutated}.meta").read_text())["exit_code_by_key"]
    for m in mutants:
        code = codes.get(m.key)
        m.status = "not checked" if code is None else _STATUS.get(code, OTHER)
    return mutants


# ------------------------------------------------------------------ report
COLUMNS = ("mutants", KILLED, SURVIVED, TIMEOUT, NO_TESTS, OTHER, "excluded", "score")


def tally(mutants: list[Mutant], excluded: dict[str, Exclusion]) -> dict:
    row = {c: 0 for c in COLUMNS}
    row["mutants"] = len(mutants)
    for m in mutants:
        if m.key in excluded:
            row["excluded"] += 1
        elif m.status in (KILLED, SURVIVED, TIMEOUT, NO_TESTS):
            row[m.status] += 1
        else:
            row[OTHER] += 1
    judged = row["mutants"] - row["excluded"]
    row["score"] = row[KILLED] / judged if judged else 1.0
    return row


def table(rows: dict[str, dict]) -> str:
    head = "| module | " + " | ".join(COLUMNS) + " |"
    out = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for mod, r in rows.items():
        cells = [str(r[c]) for c in COLUMNS[:-1]] + [f"{100 * r['score']:.1f}%"]
        out.append(f"| `{mod}` | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=CONFIG, help="run groups (default: qa/mutation.toml)")
    ap.add_argument("--only", nargs="+", metavar="GROUP", help="run only these groups of qa/mutation.toml")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutation")
    ap.add_argument("--max-children", type=int, default=None, help="parallel mutants (default: the config's)")
    ap.add_argument("--keep", action="store_true", help="reuse the scratch directories (mutmut's cached results)")
    ap.add_argument("--survivors", action="store_true", help="print every surviving mutant with its line")
    ap.add_argument("--json", type=Path, help="also write the per-module rows and survivors as JSON")
    args = ap.parse_args(argv)

    cfg, groups = load_config(args.config)
    exclusions = load_exclusions()
    if args.only:
        unknown = set(args.only) - {g.name for g in groups}
        if unknown:
            ap.error(f"no group {sorted(unknown)} in {CONFIG.name}")
        groups = [g for g in groups if g.name in args.only]
    os.nice(int(cfg.get("nice", 10)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in run_mutmut
    children = args.max_children or int(cfg.get("max_children", 2))
    min_score = float(cfg.get("min_score", 0.85))

    rows, survivors, failed, run_failed, t_all = {}, [], False, False, time.monotonic()
    for g in groups:
        d = prepare(g, args.workdir, args.keep)
        code, secs = run_mutmut(d, g, children)
        print(f"[{g.name}] mutmut {'timed out' if code is None else f'exit {code}'} after {secs:.0f} s "
              f"(log: {d / 'mutmut.log'})", flush=True)
        if code != 0:
            run_failed = True
            if code is not None:  # a time limit keeps what was tested; anything else has no results
                print((d / "mutmut.log").read_text(errors="replace")[-3000:])
                continue
        for mod in g.modules:
            mutants = results(d, mod)
            excluded = match_exclusions(mutants, [e for e in exclusions if e.module == mod])
            rows[mod] = tally(mutants, excluded)
            survivors += [m for m in mutants if m.key not in excluded and m.status != KILLED]
            for key, e in excluded.items():
                m = next(x for x in mutants if x.key == key)
                if m.status == KILLED:
                    print(f"exclusion killed by a test (not equivalent): {mod}:{m.line} {e.function}: {e.mutant}")
                    failed = True
    ran = {m for g in groups for m in g.modules}
    for e in exclusions:
        if e.module in ran and not e.matched:
            print(f"stale exclusion (matches no mutant): {e.module} {e.function}: {e.original!r} -> {e.mutant!r}")
            failed = True
    print(table(rows))
    print(f"wall time {time.monotonic() - t_all:.0f} s, {children} parallel mutants")
    if args.survivors:
        for m in survivors:
            print(f"{m.status:9} {m.module}:{m.line} {m.function}\n    - {m.original}\n    + {m.mutant}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "survivors": [vars(m) for m in survivors]}, indent=1))
    low = [mod for mod, r in rows.items() if r["score"] < min_score]
    if low:
        print(f"below {100 * min_score:.0f}% killed: {low}")
    return 2 if run_failed else 1 if failed or low else 0


if __name__ == "__main__":
    sys.exit(main())
