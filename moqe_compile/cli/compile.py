"""``moqe-compile``: build, inspect and locate bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import guarded

DEFAULT_RECIPE = "mobilenetv2-demo.toml"


def _default_recipe() -> Path | None:
    # The default recipe ships under bundles/ at the project root (editable/source installs).
    p = Path(__file__).resolve().parents[2] / "bundles" / DEFAULT_RECIPE
    return p if p.is_file() else None


def cmd_build(args) -> int:
    from ..config import BuildConfig, load_recipe
    from ..pipeline import build

    if args.recipe:
        cfg = load_recipe(args.recipe)
    else:
        p = _default_recipe()
        cfg = load_recipe(p) if p else BuildConfig()  # the dataclass defaults are the same demo
    out = build(cfg, args.output, quiet=args.quiet)
    print(f"bundle written to {out}")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import render

    print(render(args.bundle, verify=not args.no_verify))
    return 0


def cmd_data_path(args) -> int:
    from ..data.datasets import foolbox_dir

    print(foolbox_dir())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moqe-compile", description="Mixture-of-Quantization-Experts compiler.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a MoQE bundle from a recipe (default: the MobileNetV2 demo)")
    b.add_argument("recipe", nargs="?", help=f"recipe TOML (default: bundles/{DEFAULT_RECIPE})")
    b.add_argument("-o", "--output", required=True, help="bundle directory to write (replaced atomically)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(fn=cmd_build)
    i = sub.add_parser("inspect", help="print a bundle's manifest in human form")
    i.add_argument("bundle")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    i.set_defaults(fn=cmd_inspect)
    d = sub.add_parser("data-path", help="print the folder of the demo's ImageNet photos (foolbox package)")
    d.set_defaults(fn=cmd_data_path)
    args = ap.parse_args(argv)
    return guarded(lambda: args.fn(args), "moqe-compile")


if __name__ == "__main__":
    sys.exit(main())
