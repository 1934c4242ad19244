"""``moqe-run BUNDLE --input PATH``: route and classify images with a bundle."""

from __future__ import annotations

import argparse
import json
import sys

from moqe_compile.cli.common import guarded


def main(argv: list[str] | None = None) -> int:
    from moqe_compile.cli.run_lm import maybe_main

    rc = maybe_main(argv)  # causal-LM bundles have their own options (cli/run_lm.py)
    if rc is not None:
        return rc
    ap = argparse.ArgumentParser(prog="moqe-run", description="Run a MoQE bundle on images.")
    ap.add_argument("bundle", help="bundle directory written by moqe-compile build")
    ap.add_argument("--input", required=True, help="an image file, a directory of images, or a .npy batch")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--backend", default="auto", help="execution backend (default: auto)")
    ap.add_argument("--top", type=int, default=5, help="how many labels to show (default 5)")
    args = ap.parse_args(argv)
    return guarded(lambda: _run(args), "moqe-run")


def _run(args) -> int:
    from moqe_compile.errors import InputError
    from moqe_compile.runtime import Runtime

    if args.top < 1:
        raise InputError(f"--top {args.top} must be >= 1.")
    with Runtime.load(args.bundle, backend=args.backend) as rt:
        names, batch = rt.load_inputs(args.input)
        res = rt.run(batch)
        idx, prob = res.topk(min(args.top, res.logits.shape[-1]))
        preds = [{"input": n, "expert": res.experts[i], "router_confidence": float(res.confidence[i]),
                  "top5" if args.top == 5 else f"top{args.top}":
                      [[rt.labels[c], float(p)] for c, p in zip(idx[i], prob[i])]}
                 for i, n in enumerate(names)]
    timing = {k: round(v, 3) for k, v in res.timing_ms.items()}
    if args.json:
        print(json.dumps({"predictions": preds, "timing_ms": timing}))
        return 0
    for p, i in zip(preds, range(len(preds))):
        print(f"{p['input']}\n  expert {p['expert']} (router confidence {p['router_confidence']:.3f})")
        for label, pr in list(p.values())[-1]:
            print(f"    {pr:7.2%}  {label}")
    print(f"timing_ms router {timing['router']:.2f}  experts {timing['experts']:.2f}  total {timing['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
