"""``moqe-compile inspect BUNDLE``: the bundle's task plug-in renders its manifest."""

from __future__ import annotations

from moqe_compile.bundle import read_bundle


def render(path: str, verify: bool = True) -> str:
    """The human summary of the bundle at ``path``, in its task's layout (``tasks/<task>/inspect.py``)."""
    from moqe_compile import task_of_bundle

    b = read_bundle(path, verify=verify)
    return task_of_bundle(b.root).render(b)
