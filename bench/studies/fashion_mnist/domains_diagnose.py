"""Why routing does or does not pay on the visible-domains bundle: per-domain figures.

    python bench/studies/fashion_mnist/domains_diagnose.py WORK/domains \\
        --json bench/results/epyc-2core/fmnist-domains-diagnosis.json

(``domains.sh`` builds ``WORK/domains`` and runs this.) For a bundle built from
``moqe_compile/recipes/fmnist-domains.toml`` (``[data] source =
"fashion-mnist-domains"``), on router_val and on test (the splits the bundle stores; each
sample's domain recomputed from its image index, as the data option assigns it):

- top-1 per domain of FP, every expert, the three copies, the deployed MoQE route (through
  ``Runtime``: exported router + fallback), the oracle of the experts and of the copies;
- **the domain router**: each input sent to the expert calibrated on *its true domain* (what
  a router that identifies the domain perfectly would do with these experts), against the
  best single expert (chosen on val) with a paired test, and its own-domain experts'
  oracle vs the copies' oracle;
- how the deployed router routes each domain (share of each domain's inputs per expert), and
  how often it picks the input's own-domain expert; the same for the router network alone
  (its argmax, without the confidence fallback);
- whether the domain is visible at all: a nearest-centroid classifier on two numbers per image
  (border brightness and high-frequency energy), fitted on router_train, scored on each split;
- the oracle of the per-domain experts minus the oracle of the copies (3 each, each calibrated
  on about a third of the calibration split), paired bootstrap.

Nothing is selected here: the figures describe a bundle whose every choice was made on val.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moqe_compile import Runtime
from moqe_compile.bundle import read_bundle
from moqe_compile.tasks.image.config import BuildConfig
from moqe_compile.tasks.image.data import build_splits
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.evaluate.controls import CONTROLS_FILE, Copies
from moqe_compile.evaluate.stats import paired_bootstrap, paired_compare
from moqe_compile.tasks.image.score import run_batched
from moqe_compile.backends import OrtCpuSession

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def pct(v: float) -> float:
    return round(100.0 * float(v), 2)


def pixel_stats(x: np.ndarray) -> np.ndarray:
    """Two numbers per image: the mean of its border pixels (the background) and the mean
    absolute difference of horizontally adjacent pixels (high-frequency energy)."""
    img = x[:, 0]
    border = np.concatenate([img[:, 0], img[:, -1], img[:, 1:-1, 0], img[:, 1:-1, -1]], 1).mean(1)
    return np.stack([border, np.abs(np.diff(img, axis=2)).mean((1, 2))], 1)


def fit_domain_probe(x: np.ndarray, dom: np.ndarray, domains: list[str]):
    """Nearest centroid on standardized (pixel mean, pixel std): returns x -> domain names."""
    f = pixel_stats(x)
    mu, sd = f.mean(0), f.std(0) + 1e-12
    cent = np.stack([((f - mu) / sd)[dom == d].mean(0) for d in domains])
    names = np.asarray(domains)

    def probe(xs: np.ndarray) -> np.ndarray:
        z = (pixel_stats(xs) - mu) / sd
        return names[((z[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)]

    return probe


def split_figures(rt: Runtime, man: dict, bundle: Path, x: np.ndarray, y: np.ndarray, dom: np.ndarray,
                  copies: dict | None, domains: list[str], best: str, probe) -> dict:
    names = [e["name"] for e in man["experts"]]
    own = {e["recipe"].get("calibration_domain", ""): e["name"] for e in man["experts"]}
    fp = run_batched(OrtCpuSession("fp", bundle / man["model"]["fp"]["path"]), x)
    logits = {e["name"]: run_batched(OrtCpuSession(e["name"], bundle / e["variants"]["onnxruntime-cpu"]["path"]), x)
              for e in man["experts"]}
    correct = {n: (logits[n].argmax(1) == y) for n in names}
    correct["fp"] = fp.argmax(1) == y
    route = np.concatenate([rt.run(x[i : i + 256]).expert_index for i in range(0, len(x), 256)])
    correct["moqe"] = np.stack([correct[n] for n in names], 1)[np.arange(len(x)), route]
    raw = run_batched(OrtCpuSession("router", bundle / man["router"]["path"]), x).argmax(1)  # no fallback
    correct["router_without_fallback"] = np.stack([correct[n] for n in names], 1)[np.arange(len(x)), raw]
    ce = np.stack([-(l - l.max(1, keepdims=True) - np.log(np.exp(l - l.max(1, keepdims=True)).sum(1, keepdims=True)))
                   [np.arange(len(y)), y] for l in (logits[n] for n in names)], 1)
    correct["oracle"] = np.stack([correct[n] for n in names], 1)[np.arange(len(x)), ce.argmin(1)]
    dom_route = np.array([names.index(own.get(d, best)) for d in dom])
    correct["domain_router"] = np.stack([correct[n] for n in names], 1)[np.arange(len(x)), dom_route]
    per_domain_experts = [own[d] for d in domains if d in own]
    if per_domain_experts:
        k = [names.index(n) for n in per_domain_experts]
        correct["oracle_of_domain_experts"] = np.stack([correct[names[j]] for j in k], 1)[
            np.arange(len(x)), ce[:, k].argmin(1)]
    if copies is not None:
        for j, n in enumerate(copies["names"]):
            correct[f"copy:{n}"] = copies["pred"][:, j] == y
        correct["copies_oracle"] = copies["pred"][np.arange(len(y)), copies["loss"].argmin(1)] == y
        if copies.get("route") is not None:
            correct["copies_router"] = copies["pred"][np.arange(len(y)), copies["route"]] == y
    rows = {r: {"all": pct(c.mean()), **{d: pct(c[dom == d].mean()) for d in domains}} for r, c in correct.items()}

    def share(r: np.ndarray) -> dict:
        return {d: {n: round(float((r[dom == d] == j).mean()), 4) for j, n in enumerate(names)} for d in domains}

    out = {"n": int(len(y)), "n_per_domain": {d: int((dom == d).sum()) for d in domains}, "top1": rows,
           "route_share_by_domain": share(route),
           "routed_to_own_domain_expert": round(float((route == dom_route).mean()), 4),
           "router_without_fallback": {"route_share_by_domain": share(raw),
                                       "routed_to_own_domain_expert": round(float((raw == dom_route).mean()), 4)},
           "domain_probe_accuracy": round(float((probe(x) == dom).mean()), 4),
           "domain_router_vs_best_single": {
               "best_single": best, **{k: (v if k != "ci95" else [pct(c) for c in v]) for k, v in
                                       paired_compare(correct["domain_router"].astype(float),
                                                      correct[best].astype(float)).items()}},
           }
    out["domain_router_vs_best_single"]["diff"] = pct(out["domain_router_vs_best_single"]["diff"])
    if copies is not None and "oracle_of_domain_experts" in correct:
        pb = paired_bootstrap(correct["oracle_of_domain_experts"].astype(float), correct["copies_oracle"].astype(float))
        out["domain_experts_oracle_minus_copies_oracle"] = {"diff": pct(pb["diff"]),
                                                            "ci95": [pct(c) for c in pb["ci95"]],
                                                            "p_value": pb["p_value"], "test": pb["test"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    add_json_option(ap)
    args = ap.parse_args(argv)
    man = read_bundle(args.bundle).manifest
    cfg = BuildConfig.from_manifest(man["build_config"])
    if not cfg.data.domains:
        raise SystemExit(f"{args.bundle} was not built with [data] source = 'fashion-mnist-domains'.")
    splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
    ctl = Copies.load(args.bundle / CONTROLS_FILE) if (args.bundle / CONTROLS_FILE).is_file() else None
    best = man["routing"]["default_expert"]  # the best single expert, chosen on router_val
    out = {"bundle": str(args.bundle), "domains": cfg.data.domains, "best_single_chosen_on_val": best,
           "gate": man["router"]["gate"], "splits": {}}
    # The deployed router, even where the gate refused it (a --force-routing build routes anyway).
    probe = fit_domain_probe(splits["router_train"].x, splits["router_train"].domains, cfg.data.domains)
    with Runtime.load(args.bundle) as rt:
        for s in ("router_val", "test"):
            d = splits[s]
            out["splits"][s] = split_figures(rt, man, args.bundle, d.x, d.labels, d.domains,
                                             ctl.for_split(s) if ctl else None, cfg.data.domains, best, probe)
            print(f"[diagnose] {s}: domain router vs {best}: "
                  f"{out['splits'][s]['domain_router_vs_best_single']['diff']:+.2f} points", file=sys.stderr)
    if args.json:
        write_json(args.json, out)
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
