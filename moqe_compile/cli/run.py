"""``moqe-run BUNDLE --input ...``: classify images, or score and generate text, with a bundle.

The bundle's manifest names its task; the registry (``moqe_compile.tasks``) picks the runner.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from moqe_compile.cli.common import guarded

EPILOG = """\
--json output, image-classification bundles (the same keys whatever --top is):
  {"predictions": [{"input": str, "expert": str, "router_confidence": float,
                    "topk": [{"label": str, "prob": float}, ...]}, ...],
   "timing_ms": {"router": float, "experts": float, "total": float}}
  "topk" holds min(--top, number of classes) entries, most probable first.

--json output, causal-LM bundles (each key present when asked for):
  {"score": {"tokens", "mean_nll", "perplexity", "expert", "router_confidence", "routing", "timing_ms"},
   "generation": {"text", "new_tokens", "expert", "router_confidence", "stopped", "timing_ms"}}
  router_confidence is null where the router did not run.
"""

# What one moqe-run may decode (tasks/image/preprocess.InputLimits); None: the default.
LIMITS = (
    ("--max-image-pixels", int, "width x height of one image, read from its header before decoding "
                                "(default 50000000)"),
    ("--max-aspect-ratio", float, "long side / short side of one image, checked before the resize "
                                  "(default 20)"),
    ("--max-images", int, "images in one --input: files of a directory or samples of a .npy (default 256)"),
    ("--max-total-pixels", int, "width x height summed over the images of one --input (default 200000000)"),
    ("--max-array-bytes", int, "data bytes of a .npy, read from its header before the data "
                               "(default 1073741824, 1 GiB)"),
)

LIMIT_ATTRS = tuple(flag[2:].replace("-", "_") for flag, _, _ in LIMITS)  # InputLimits' field names

# Options of one task that another task's bundle must not be given (flag, attribute, default).
IMAGE_ONLY = (("--backend", "backend", "auto"), ("--top", "top", 5),
              *((flag, attr, None) for (flag, _, _), attr in zip(LIMITS, LIMIT_ATTRS)))
LM_ONLY = (("--input-file", "input_file", None), ("--score", "score", False),
           ("--max-new-tokens", "max_new_tokens", 0), ("--expert", "expert", None))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moqe-run", description="Run a MoQE bundle: classify images, or score "
                                 "and generate text with a causal-LM bundle.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="bundle directory written by moqe-compile build")
    ap.add_argument("--input", help="an image file, a directory of images or a .npy batch; for a causal-LM "
                                    "bundle, the text (a prompt, or the sequence to score)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text (schema below)")
    ap.add_argument("--no-verify", action="store_true", help="skip the bundle's sha256 checks")
    image = ap.add_argument_group("image-classification bundles")
    image.add_argument("--backend", default="auto", help="execution backend (default: auto)")
    image.add_argument("--top", type=int, default=5, help="how many labels to show (default 5)")
    limits = ap.add_argument_group(
        "input limits (image-classification bundles)",
        "Bounds on what one --input may decode, checked before the memory is allocated;\n"
        "an input beyond one exits 3 naming the limit. Raise one only for inputs you trust.")
    for flag, kind, text in LIMITS:
        limits.add_argument(flag, type=_positive(kind), default=None, metavar="X" if kind is float else "N",
                            help=text)
    lm = ap.add_argument_group("causal-LM bundles")
    lm.add_argument("--input-file", help="a UTF-8 text file holding the text (instead of --input)")
    lm.add_argument("--score", action="store_true", help="score the text: perplexity, chosen expert, router confidence")
    lm.add_argument("--max-new-tokens", type=int, default=0, help="generate up to N tokens (greedy, KV cache)")
    lm.add_argument("--expert", default=None, help="bypass the router: an expert name, or 'fp'")
    return ap


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return v

    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return guarded(partial(_dispatch, args), "moqe-run")


def _dispatch(args) -> int:
    from moqe_compile import task_of_bundle

    from moqe_compile.errors import BundleError

    kind = task_of_bundle(args.bundle).KIND
    if kind not in RUNNERS:
        raise BundleError(f"moqe-run does not run {kind!r} bundles; it runs {sorted(RUNNERS)}.")
    return RUNNERS[kind](args)


def _refuse_other_task(args, options, kind: str) -> None:
    from moqe_compile.errors import InputError

    given = [flag for flag, attr, default in options if getattr(args, attr) != default]
    if given:
        raise InputError(f"{', '.join(given)} do(es) not apply to this {kind} bundle {args.bundle!r}; "
                         f"see moqe-run --help.")


# ------------------------------------------------------------------ image classification
def _input_limits(args):
    from dataclasses import replace

    from moqe_compile.tasks.image.preprocess import DEFAULT_LIMITS

    given = {attr: getattr(args, attr) for attr in LIMIT_ATTRS if getattr(args, attr) is not None}
    return replace(DEFAULT_LIMITS, **given)


def run_image(args) -> int:
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # The input limits refuse oversized images in one line; Pillow's warning would add a second.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _run_image(args)


def _run_image(args) -> int:
    from moqe_compile import load
    from moqe_compile.errors import ConfigError, InputError

    _refuse_other_task(args, LM_ONLY, "image-classification")
    if args.input is None:
        raise InputError("--input is required: an image file, a directory of images or a .npy batch.")
    if args.top < 1:
        raise ConfigError(f"--top {args.top} must be >= 1.")
    with load(args.bundle, backend=args.backend, verify=not args.no_verify) as rt:
        names, batch = rt.load_inputs(args.input, _input_limits(args))
        res = rt.run(batch)
        idx, prob = res.topk(min(args.top, res.logits.shape[-1]))
        preds = [{"input": n, "expert": res.experts[i], "router_confidence": float(res.confidence[i]),
                  "topk": [{"label": rt.labels[c], "prob": float(p)} for c, p in zip(idx[i], prob[i])]}
                 for i, n in enumerate(names)]
    timing = {k: round(v, 3) for k, v in res.timing_ms.items()}
    if args.json:
        print(json.dumps({"predictions": preds, "timing_ms": timing}))
        return 0
    for p in preds:
        print(f"{p['input']}\n  expert {p['expert']} (router confidence {p['router_confidence']:.3f})")
        for t in p["topk"]:
            print(f"    {t['prob']:7.2%}  {t['label']}")
    print(f"timing_ms router {timing['router']:.2f}  experts {timing['experts']:.2f}  total {timing['total']:.2f}")
    return 0


# ------------------------------------------------------------------ causal LMs
# Far more than any model here takes (SmolLM2: 8192 tokens); the runtime bounds the text again
# by its model before tokenizing.
MAX_TEXT_BYTES = 16 * 2**20


def _lm_text(args) -> str:
    from moqe_compile.errors import InputError

    if (args.input is None) == (args.input_file is None):
        raise InputError("give the text as exactly one of --input TEXT or --input-file PATH.")
    if args.input_file is None:
        return args.input
    from moqe_compile.tasks.causal_lm.data import read_utf8

    return read_utf8(args.input_file, "--input-file", max_bytes=MAX_TEXT_BYTES)


def _confidence_words(conf: float | None) -> str:
    return "router off" if conf is None else f"router confidence {conf:.3f}"


def _print_stream(text: str) -> None:
    print(text, end="", flush=True)


def _lm_score(rt, args, text: str) -> dict:
    (res,), ms = rt.score([text], expert=args.expert)
    routing = ("router" if rt.routing_enabled and args.expert is None else
               ("forced" if args.expert else "gate: single expert"))
    if not args.json:
        print(f"expert {res.expert} ({_confidence_words(res.router_confidence)})\n  perplexity {res.perplexity:.3f}  "
              f"(mean NLL {res.mean_nll:.4f} over {res.tokens} tokens)")
    return {"tokens": res.tokens, "mean_nll": res.mean_nll, "perplexity": res.perplexity, "expert": res.expert,
            "router_confidence": res.router_confidence, "routing": routing,
            "timing_ms": {k: round(v, 2) for k, v in ms.items()}}


def _lm_generate(rt, args, text: str) -> dict:
    stream = None if args.json else _print_stream
    if stream is not None:
        stream(text)
    g = rt.generate(text, args.max_new_tokens, on_text=stream, expert=args.expert)
    if not args.json:
        print(f"\n[expert {g.expert} ({_confidence_words(g.router_confidence)}); {len(g.new_tokens)} tokens, "
              f"stopped: {g.stopped}; {g.timing_ms['tokens_per_s']:.1f} tokens/s, "
              f"first token {g.timing_ms['first_token']:.0f} ms]")
    return {"text": g.text, "new_tokens": len(g.new_tokens), "expert": g.expert,
            "router_confidence": g.router_confidence, "stopped": g.stopped,
            "timing_ms": {k: round(v, 2) for k, v in g.timing_ms.items()}}


def run_lm(args) -> int:
    from moqe_compile import load
    from moqe_compile.errors import ConfigError, InputError

    _refuse_other_task(args, IMAGE_ONLY, "causal-lm")
    if args.max_new_tokens < 0:  # an option value out of range: the config code
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 0 (>= 1 without --score).")
    if not args.score and args.max_new_tokens == 0:
        raise InputError("say what to do: --score and/or --max-new-tokens N (N >= 1).")
    text = _lm_text(args)
    out: dict = {}
    with load(args.bundle, verify=not args.no_verify) as rt:
        if args.expert is not None and args.expert != "fp" and args.expert not in rt.expert_names:
            raise InputError(f"--expert {args.expert!r} is not one of {rt.expert_names + ['fp']}.")
        if args.score:
            out["score"] = _lm_score(rt, args, text)
        if args.max_new_tokens:
            out["generation"] = _lm_generate(rt, args, text)
    if args.json:
        print(json.dumps(out))
    return 0


RUNNERS = {"image-classification": run_image, "causal-lm": run_lm}


if __name__ == "__main__":
    sys.exit(main())
