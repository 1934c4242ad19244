"""``moqe-run BUNDLE --input TEXT`` for ``causal-lm`` bundles: score (perplexity) or generate.

``moqe-run`` hands over here when the bundle's manifest says ``task.kind = "causal-lm"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moqe_compile.cli.common import guarded


def is_lm_bundle(path: str) -> bool:
    m = Path(path) / "manifest.json"
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text()).get("task", {}).get("kind") == "causal-lm"
    except (json.JSONDecodeError, AttributeError, OSError):
        return False  # the image runtime's reader reports what is wrong with it


def maybe_main(argv: list[str] | None) -> int | None:
    """Run the LM CLI if the first positional argument is an LM bundle, else None."""
    args = sys.argv[1:] if argv is None else argv
    first = next((a for a in args if not a.startswith("-")), None)
    return main(args) if first and is_lm_bundle(first) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moqe-run", description="Run a MoQE causal-LM bundle on text.")
    ap.add_argument("bundle", help="bundle directory written by moqe-compile build (task causal-lm)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="the text (a prompt, or the sequence to score)")
    src.add_argument("--input-file", help="a UTF-8 text file holding the text")
    ap.add_argument("--score", action="store_true", help="score the text: perplexity, chosen expert, router confidence")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="generate up to N tokens (greedy, KV cache)")
    ap.add_argument("--expert", default=None, help="bypass the router: an expert name, or 'fp'")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text (no streaming)")
    ap.add_argument("--no-verify", action="store_true", help="skip the bundle's sha256 checks")
    args = ap.parse_args(argv)
    return guarded(lambda: _run(args), "moqe-run")


def _run(args) -> int:
    from moqe_compile.errors import InputError
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    if not args.score and args.max_new_tokens <= 0:
        raise InputError("say what to do: --score and/or --max-new-tokens N (N >= 1).")
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be >= 1.")
    if args.input_file:
        p = Path(args.input_file)
        if not p.is_file():
            raise InputError(f"--input-file {args.input_file!r} does not exist.")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--input-file {args.input_file!r} is not UTF-8 text: {e}.") from e
    else:
        text = args.input
    out: dict = {}
    with LMRuntime.load(args.bundle, verify=not args.no_verify) as rt:
        if args.expert is not None and args.expert != "fp" and args.expert not in rt.expert_names:
            raise InputError(f"--expert {args.expert!r} is not one of {rt.expert_names + ['fp']}.")
        if args.score:
            (res,), ms = rt.score([text], expert=args.expert)
            out["score"] = {"tokens": res.tokens, "mean_nll": res.mean_nll, "perplexity": res.perplexity,
                            "expert": res.expert, "router_confidence": res.router_confidence,
                            "routing": "router" if rt.routing_enabled and args.expert is None else
                            ("forced" if args.expert else "gate: single expert"),
                            "timing_ms": {k: round(v, 2) for k, v in ms.items()}}
            if not args.json:
                conf = "router off" if res.router_confidence is None else f"router confidence {res.router_confidence:.3f}"
                print(f"expert {res.expert} ({conf})\n  perplexity {res.perplexity:.3f}  "
                      f"(mean NLL {res.mean_nll:.4f} over {res.tokens} tokens)")
        if args.max_new_tokens:
            stream = None if args.json else (lambda s: print(s, end="", flush=True))
            if stream is not None:
                print(text, end="", flush=True)
            g = rt.generate(text, args.max_new_tokens, on_text=stream, expert=args.expert)
            out["generation"] = {"text": g.text, "new_tokens": len(g.new_tokens), "expert": g.expert,
                                 "router_confidence": g.router_confidence, "stopped": g.stopped,
                                 "timing_ms": {k: round(v, 2) for k, v in g.timing_ms.items()}}
            if not args.json:
                conf = "router off" if g.router_confidence is None else f"router confidence {g.router_confidence:.3f}"
                print(f"\n[expert {g.expert} ({conf}); {len(g.new_tokens)} tokens, stopped: {g.stopped}; "
                      f"{g.timing_ms['tokens_per_s']:.1f} tokens/s, first token {g.timing_ms['first_token']:.0f} ms]")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
