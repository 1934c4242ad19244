"""The per-corpus table of a routed causal-LM bundle with every control, from its build report.

    python bench/lm_domain_table.py bundles/smollm2-domains-large [--split test] [--json PATH]

Reads ``report/report.json`` and the manifest (nothing is rescored): perplexity of FP, each
expert, the oracle, MoQE, and the controls (random router with MoQE's usage, copies oracle and
copies router, true-corpus router, per-corpus oracle, output-averaging mixture), overall and per
corpus; then the paired tests of MoQE against the best single expert (chosen on router_val),
the true-corpus router and the copies control, the gate's verdict on router_val and the
router's prefix choice. ``--json`` keeps the figures with the build's stage seconds (and an
accuracy-budget build's frontier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

CONTROLS = [("random_router", "random router (MoQE's usage, shuffled)"), ("true_corpus", "true-corpus router"),
            ("corpus_oracle", "per-corpus oracle"), ("mixture", "output-averaging mixture (runs every expert)")]


def ppl(entry: dict | None) -> str:
    return "" if not entry else f"{entry['ppl']:.2f}"


def rows(split: dict) -> list[tuple[str, list[str]]]:
    blocks = [split["overall"]] + list(split.get("per_corpus", {}).values())
    names = list(split["overall"]["experts"])
    out = [("FP", [ppl(b["fp"]) for b in blocks])]
    out += [(n, [ppl(b["experts"][n]) for b in blocks]) for n in names]
    out.append(("oracle of the experts", [ppl(b["oracle"]) for b in blocks]))
    usage = ", ".join(f"{n} {u:.0%}" for n, u in split["overall"]["usage"].items() if u)
    out.append((f"**MoQE** ({usage})", [ppl(b["moqe"]) for b in blocks]))
    for key, label in CONTROLS:
        out.append((label, [ppl((b.get("controls") or {}).get(key)) for b in blocks]))
    co = [(b.get("controls") or {}).get("copies_oracle") for b in blocks]
    if co[0]:
        out.append((f"oracle / router of {co[0]['copies']} copies of {co[0]['of']}",
                    [f"{ppl(c)} / {ppl(c.get('router'))}" if c else "" for c in co]))
    return out


def test_line(label: str, t: dict | None) -> str:
    if not t:
        return f"- {label}: n/a"
    return (f"- {label}: {t['diff']:+.4f} nats/token [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}], "
            f"p = {t['p_value']:.3g} (n = {t['n']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--split", default="test", choices=["test", "router_val"])
    add_json_option(ap)
    args = ap.parse_args()
    root = Path(args.bundle)
    rep = json.loads((root / "report/report.json").read_text())
    man = json.loads((root / "manifest.json").read_text())
    s = rep["splits"][args.split]
    o, ctl = s["overall"], s["overall"].get("controls") or {}
    corpora = list(s.get("per_corpus", {}))
    print(f"| {args.split} | all ({o['n']}) | " + " | ".join(f"{c} ({s['per_corpus'][c]['n']})" for c in corpora) + " |")
    print("|---|" + "---:|" * (1 + len(corpora)))
    for label, cells in rows(s):
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nbest single expert on router_val: {s['best_expert']}")
    print(test_line("MoQE - best single", o["moqe_vs_best"]))
    print(test_line("MoQE - true-corpus router", (ctl.get("true_corpus") or {}).get("moqe_vs_this")))
    print(test_line("MoQE - per-corpus oracle", (ctl.get("corpus_oracle") or {}).get("moqe_vs_this")))
    print(test_line("(MoQE - best) - (copies router - best copy)", (ctl.get("copies_oracle") or {}).get("moqe_vs_copies")))
    gate = man["router"]["gate"]
    print(f"- gate on router_val: {gate['decision']} ({gate.get('reason', '')})")
    choice = rep.get("router_training", {}).get("prefix_choice")
    if choice:
        print(f"- prefix chosen on router_val: {choice['chosen']} tokens (lowest loss at {choice['lowest']}); "
              + ", ".join(f"{n}: {r['val_loss']:.4f}" for n, r in choice["lengths"].items()))
    frontier = root / "report/frontier.json"  # an accuracy-budget build's search
    write_json(args.json, {"bundle": root.name, "split": args.split, "report": s, "gate": gate,
                           "frontier": json.loads(frontier.read_text()) if frontier.is_file() else None,
                           "prefix_choice": choice, "build": rep.get("build"),
                           "splits": man["splits"]})


if __name__ == "__main__":
    main()
