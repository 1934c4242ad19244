"""``moqe-compile inspect BUNDLE``: the bundle's task plug-in renders its manifest."""

from __future__ import annotations

from moqe_compile.bundle import read_bundle


def render(path: str, verify: bool = True) -> str:
    """The human summary of the bundle at ``path``, in its task's layout (``tasks/<task>/inspect.py``)."""
    from moqe_compile import task_of_bundle

    b = read_bundle(path, verify=verify)
    return task_of_bundle(b.root).render(b)


def cmd_inspect(args) -> int:
    print(render(args.bundle, verify=not args.no_verify))
    return 0


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="print a bundle's manifest in human form")
    i.add_argument("bundle")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    i.set_defaults(fn=cmd_inspect)
