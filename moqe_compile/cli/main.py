"""``moqe-compile``: each subcommand's parser and handler live in a ``cli/`` module (``build``
also holds ``recipes`` and ``engines``); this one assembles them and adds ``data-path``."""

from __future__ import annotations

import argparse
import sys

from moqe_compile.cli import build, check_qdq, export_triton, inspect, sensitivity
from moqe_compile.cli import eval as eval_cmd
from moqe_compile.cli.common import guarded

SUBCOMMANDS = (build, inspect, eval_cmd, check_qdq, sensitivity, export_triton)


def cmd_data_path(args) -> int:
    from moqe_compile.tasks.image.data import foolbox_dir

    print(foolbox_dir())
    return 0


def _logging(args) -> None:
    """moqe's own messages on stderr at the -v/-q level; other libraries' loggers stay at WARNING."""
    import logging

    level = logging.DEBUG if getattr(args, "verbose", False) else \
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    ours = logging.getLogger("moqe_compile")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[moqe-compile] %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moqe-compile", description="Mixture-of-Quantization-Experts compiler.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    d = sub.add_parser("data-path", help="print the folder of the demo's ImageNet photos (foolbox package)")
    d.set_defaults(fn=cmd_data_path)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.cmd == "build" and not args.dry_run and not args.output:
        ap.error("build: -o/--output is required (or --dry-run)")
    if argv is None and args.cmd == "build" and not args.dry_run:
        from moqe_compile.cli.hugepages import reexec_with_hugepages

        reexec_with_hugepages()  # returns where not wanted; else this process is replaced
    _logging(args)
    return guarded(lambda: args.fn(args), "moqe-compile")


if __name__ == "__main__":
    sys.exit(main())
