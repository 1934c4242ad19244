"""The README cannot rot: its first commands are what CI runs, every command it shows parses
with the real command-line parsers, the quick-start flow runs on the tiny bundle and prints what
the README says it prints, and every relative link in README.md and docs/*.md resolves."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import ROOT

README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent  # the venv's console scripts
CLIS = ("moqe-compile", "moqe-run", "moqe-serve")


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


QUICK_START = section("Quick start")


# --- (a) the first bash block is what .ci/run runs ------------------------------------------

def _ci_commands() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]


def _norm(cmd: str) -> list[str]:
    """A command's words, without pip's -q (CI installs quietly, the README loudly)."""
    words = shlex.split(cmd)
    return [w for w in words if not (words[:2] == ["pip", "install"] and w == "-q")]


def test_first_bash_block_is_what_ci_runs():
    lines = code_blocks(README, "bash")[0].strip().splitlines()
    assert len(lines) == 2, f"README's first bash block should be two lines (install + demo, tests), not {lines}"
    install, tests = (ln.split(" && ") for ln in lines)
    setup = [c for c in install if not c.startswith(CLIS)]
    ci = _ci_commands()
    assert [_norm(c) for c in setup] == [_norm(c) for c in ci[:len(setup)]], (
        f"README's install line runs {setup}; .ci/run runs {ci[:len(setup)]}")
    assert install[:len(setup)] == setup, "the install line must install before it runs moqe-compile/moqe-run"
    assert tests[0] == ". .venv/bin/activate", f"README's test line must start in the venv: {tests}"
    assert [_norm(c) for c in tests[1:]] == [_norm(c) for c in ci[len(setup):]], (
        f"README's test line {tests[1:]} vs .ci/run's {ci[len(setup):]}")
    assert tests[-1] == "python -m pytest -q"


# --- (b) every command shown parses with the real parser ------------------------------------

def _commands(text: str) -> list[str]:
    """Every moqe-compile / moqe-run / moqe-serve command in ``text``'s bash blocks and inline
    code, with ``$(...)`` substitutions taken out as commands of their own, a comment that lists
    options (``# [--data test|PATH] [--json]``) turned into those options, and ``&`` dropped.
    A program's bare name in prose (`moqe-run`) is not a command."""
    found = []  # (command, its comment)
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition(" #")
            parts = re.split(r"&&|\|", code)
            found += [(c, "") for c in parts[:-1]] + [(parts[-1], comment)]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [(re.sub(r"\s+", " ", c), "") for c in re.findall(r"`([^`]+)`", prose)]
    out = []
    for c, comment in found:
        out += [inner.strip() for inner in re.findall(r"\$\(([^()]*)\)", c)]
        c = re.sub(r"\$\([^()]*\)", "X", c)
        for opt, value in re.findall(r"\[(--[\w-]+)((?: [^\]]+)?)\]", comment):  # [--data test|PATH] -> --data test
            c += f" {opt}" + (f" {value.split('|')[0].strip()}" if value else "")
        out.append(c.strip().rstrip("&").strip())
    return [c for c in out if c.startswith(CLIS) and c not in CLIS]


class _Parsed(Exception):
    pass


def _parse(monkeypatch, cmd: str) -> argparse.Namespace:
    """``cmd`` through its console script's own parser (nothing runs: parsing stops it)."""
    from moqe_compile.cli import main as compile_cli
    from moqe_compile.cli import run as run_cli
    from moqe_compile.cli import serve as serve_cli

    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    prog, *argv = shlex.split(cmd)
    entry = {"moqe-compile": compile_cli.main, "moqe-run": run_cli.main, "moqe-serve": serve_cli.main}[prog]
    try:
        entry(argv)
    except _Parsed as p:
        return p.args[0]
    except SystemExit as e:
        pytest.fail(f"README command {cmd!r} does not parse (exit {e.code}; see stderr above)")
    pytest.fail(f"{prog} returned without parsing {cmd!r}")


def test_quick_start_shows_commands():
    cmds = _commands(QUICK_START)
    for c in ("moqe-compile build", "moqe-run", "moqe-compile inspect", "moqe-compile eval", "moqe-serve",
              "moqe-compile recipes", "moqe-compile data-path"):
        assert any(x.startswith(c) for x in cmds), f"Quick start no longer shows {c!r}: {cmds}"


@pytest.mark.parametrize("cmd", sorted(set(_commands(QUICK_START) + _commands(code_blocks(README, "bash")[0]))))
def test_readme_command_parses(cmd, monkeypatch):
    args = _parse(monkeypatch, cmd)
    if cmd.startswith("moqe-compile eval"):  # the options listed in the comment reached the parser
        assert "--no-latency" in cmd and args.latency is False and args.json


def test_a_renamed_option_would_fail(monkeypatch, capsys):
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(monkeypatch, "moqe-compile eval B --no-latencyy")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(monkeypatch, "moqe-compile evaluate B")


# --- (c) the quick-start flow on the tiny bundle prints what the README shows ----------------

def _cli(*args, cwd: Path | None = None) -> str:
    exe = BIN / args[0]
    assert exe.exists(), f"console script {exe} is not installed"
    r = subprocess.run([str(exe), *map(str, args[1:])], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _shown_output(after: str) -> list[str]:
    """The lines of the plain ``` block that follows the bash block containing ``after``."""
    m = re.search(rf"```bash\n[^`]*{re.escape(after)}[^`]*```\n```\n(.*?)```", QUICK_START, re.S)
    assert m, f"Quick start shows no output after {after!r}"
    return m.group(1).splitlines()


# The shapes of moqe-run's text output; README's shown lines must have them too.
RUN_SHAPES = [
    ("input", r"^\S.*\.(jpg|png)$"),
    ("expert", r"^  expert \S+ \(router confidence \d\.\d{3}\)$"),
    ("top-1", r"^ +\d+\.\d{2}%  \S.*$"),
    ("timing", r"^timing_ms router \d+\.\d{2}  experts \d+\.\d{2}  total \d+\.\d{2}"),
]


def test_run_prints_the_shown_lines(tiny_bundle, tiny_images):
    shown = _shown_output("moqe-run")
    image = sorted(tiny_images.rglob("*.png"))[0]
    real = _cli("moqe-run", tiny_bundle, "--input", image).splitlines()
    for what, shape in RUN_SHAPES:
        assert any(re.match(shape, ln) for ln in shown), f"README's shown moqe-run output lost its {what} line: {shown}"
        assert any(re.match(shape, ln) for ln in real), f"moqe-run prints no {what} line like {shape!r}:\n{real}"
    experts = [e["name"] for e in json.loads((tiny_bundle / "manifest.json").read_text())["experts"]]
    assert re.match(r"  expert (\S+) ", real[1]).group(1) in experts


def _schema(text: str):
    """README's pseudo-JSON ``{"a", "b": [{"c"}], "d": {...}}`` -> {"a": None, "b": [{"c": None}], "d": ...}."""
    tokens = re.findall(r'"[^"]*"|\.\.\.|[{}\[\]:,]', text)
    pos = 0

    def value():
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "...":
            return ...
        if t == "[":
            v = value()
            assert tokens[pos] == "]"
            pos += 1
            return [v]
        assert t == "{", f"unexpected {t!r} in {text!r}"
        out = {}
        while tokens[pos] != "}":
            if tokens[pos] == "...":
                out[...] = ...
                pos += 1
            else:
                key = tokens[pos].strip('"')
                pos += 1
                out[key] = None
                if tokens[pos] == ":":
                    pos += 1
                    out[key] = value()
            if tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    return value()


def _conforms(obj, schema, where="$"):
    if schema is None or schema is ...:
        return
    if isinstance(schema, list):
        assert isinstance(obj, list) and obj, f"{where} should be a non-empty list"
        for i, o in enumerate(obj):
            _conforms(o, schema[0], f"{where}[{i}]")
        return
    assert isinstance(obj, dict), f"{where} should be an object"
    keys = {k for k in schema if k is not ...}
    if ... in schema:
        assert keys <= obj.keys(), f"{where} lacks {sorted(keys - obj.keys())}"
    else:
        assert keys == obj.keys(), f"{where} has keys {sorted(obj)}, README says {sorted(keys)}"
    for k in keys:
        _conforms(obj[k], schema[k], f"{where}.{k}")


def test_run_json_has_the_documented_schema(tiny_bundle, tiny_images):
    m = re.search(r"`--json` prints\s+`(\{.*?\})`", QUICK_START, re.S)
    assert m, "Quick start no longer documents moqe-run --json's output"
    schema = _schema(m.group(1))
    assert set(schema) >= {"predictions", "timing_ms"}
    folder = tiny_images / "0"  # "a directory of images"
    out = json.loads(_cli("moqe-run", tiny_bundle, "--input", folder, "--json"))
    _conforms(out, schema)
    assert len(out["predictions"]) == len(list(folder.glob("*.png")))


def test_inspect_prints_the_gate_line(tiny_bundle):
    m = re.search(r"gate's\s+decision on one line \(`(gate +)(single)(: val gain) \.\.\.`\)", QUICK_START)
    assert m, "Quick start no longer shows inspect's gate line"
    out = _cli("moqe-compile", "inspect", tiny_bundle)
    gate = [ln for ln in out.splitlines() if ln.startswith("gate")]
    # The tiny bundle forces routing: its gate line says "routed FORCED" where the demo's says "single".
    shape = re.escape(m.group(1)) + r"(single|routed)( FORCED)?" + re.escape(m.group(3)) + " "
    assert len(gate) == 1 and re.match(shape, gate[0]), f"inspect's gate line {gate} is not like {shape!r}"
    # "experts, recipes, metrics, kernels, files"
    for e in json.loads((tiny_bundle / "manifest.json").read_text())["experts"]:
        assert re.search(rf"^  {re.escape(e['name'])} +calibration=", out, re.M), out
    assert "experts (metrics" in out and "kernels=" in out and "\nfiles:" in out, out


def test_eval_prints_the_table_and_writes_the_reports(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "tiny")
    out = _cli("moqe-compile", "eval", bundle, "--no-latency")
    # README: "a Markdown table of FP, each expert, the oracle and MoQE with bootstrap 95% intervals,
    # MoQE minus the best single expert with its paired test, the controls, expert usage".
    lines = out.splitlines()
    rows = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| ")]
    experts = [e["name"] for e in json.loads((bundle / "manifest.json").read_text())["experts"]]
    wanted = {"FP": r"FP", "oracle": r"oracle\b", "MoQE": r"\*\*MoQE\*\*", "a control": r"control: ",
              **{f"expert {e}": rf"expert {re.escape(e)}\b" for e in experts}}
    for what, row in wanted.items():
        assert any(re.match(row, r) for r in rows), f"eval's table has no {what} row: {rows}"
    assert any("95% CI" in ln for ln in lines if ln.startswith("| model"))
    assert any(re.match(r"\*\*MoQE vs best single expert \(\S+\)\*\*.*paired", ln) for ln in lines), out
    assert any(ln.startswith("| expert | router usage") for ln in lines), out
    written = tmp_path / "tiny-eval"  # README: default DIR-eval/ beside the bundle
    assert (written / "report.json").is_file() and (written / "report.md").is_file()
    assert list(written.rglob("*.png")), f"no plots in {sorted(p.name for p in written.iterdir())}"


def test_recipes_lists_the_shipped_recipes():
    out = _cli("moqe-compile", "recipes")
    shipped = sorted(p.stem for p in (ROOT / "moqe_compile/recipes").glob("*.toml"))
    assert shipped and all(name in out for name in shipped), f"recipes lists\n{out}\nshipped: {shipped}"
    for named in re.findall(r"moqe-compile build\s+([\w-]+) -o", README):  # names the README builds by
        assert named in shipped, f"README builds recipe {named!r}, which is not shipped"


def test_build_dry_run_writes_nothing(tmp_path):
    out = _cli("moqe-compile", "build", "--dry-run", "-o", tmp_path / "demo", cwd=tmp_path)
    assert re.match(r"recipe mobilenetv2-demo .*nothing written", out), out  # the default recipe's plan
    assert re.search(r"^  expert \S+", out, re.M), out
    assert not (tmp_path / "demo").exists() and list(tmp_path.iterdir()) == []


# --- (d) every relative link resolves --------------------------------------------------------

def github_anchor(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        a = github_anchor(h)
        out.add(a if a not in seen else f"{a}-{seen[a]}")
        seen[a] = seen.get(a, 0) + 1
    return out


def test_github_anchor():
    assert github_anchor("The strongest-single-expert ablation") == "the-strongest-single-expert-ablation"
    assert github_anchor("GPU: router `attention` kernel, and MoQE on ONNX Runtime CUDA") == (
        "gpu-router-attention-kernel-and-moqe-on-onnx-runtime-cuda")
    assert github_anchor("W2A8 experts [that](x.md) keep one layer_group at 8 bits") == (
        "w2a8-experts-that-keep-one-layer_group-at-8-bits")


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        rel, _, anchor = target.partition("#")
        dest = (doc.parent / rel).resolve() if rel else doc
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_results_index_lists_every_study():
    """Every top-level study of docs/results.md has a row in the index table at its top."""
    text = (ROOT / "docs" / "results.md").read_text()
    index = text.split("\n## ", 1)[0]
    linked = set(re.findall(r"\]\(#([^)]+)\)", index))
    studies = {github_anchor(h) for h in re.findall(r"^## +(.+?) *$", text, re.M)}
    assert studies - linked == set(), f"studies missing from the index of docs/results.md: {sorted(studies - linked)}"
