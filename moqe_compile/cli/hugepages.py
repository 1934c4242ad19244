"""Transparent huge pages for ``moqe-compile build``'s allocations.

Why: the build's quantization passes allocate and free large temporary arrays thousands of times
(activations, im2col patches, Hessians). torch and glibc's malloc hand blocks of that size back
to the kernel on free, so every new one is faulted in again 4 KiB at a time: on the demo's
``strongest`` expert a third of the CPU time was the kernel's (8.2 million minor faults). With
torch's ``THP_MEM_ALLOC_ENABLE`` and glibc's ``glibc.malloc.hugetlb`` tunable the same pages come
as 2 MiB huge pages (docs/design.md#huge-pages-for-the-build). Both are read once at process
start-up, so the command re-executes itself once with them set; outputs are bit for bit the same.

``MOQE_HUGEPAGES=0`` turns it off; it is skipped where it cannot help (not Linux, or transparent
huge pages set to ``never``) and when ``main`` is called with an explicit ``argv`` (in-process use).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SWITCH = "MOQE_HUGEPAGES"
DONE = "MOQE_HUGEPAGES_SET"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_available(mode_file: Path | None = None) -> bool:
    """Whether the kernel hands out transparent huge pages on request (mode ``always`` or ``madvise``)."""
    try:
        return "[never]" not in (mode_file or THP_MODE).read_text()
    except OSError:
        return False


def environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with torch's and glibc's huge-page switches added (a user's own values are kept)."""
    out = {**env, DONE: "1"}
    out.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    tunables = out.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        out["GLIBC_TUNABLES"] = f"{tunables}:glibc.malloc.hugetlb=1" if tunables else "glibc.malloc.hugetlb=1"
    return out


def wanted(env: dict[str, str], platform: str = sys.platform, mode_file: Path | None = None) -> bool:
    return (platform.startswith("linux") and env.get(SWITCH, "1") != "0" and DONE not in env
            and thp_available(mode_file))


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with the huge-page switches set (returns only
    when that is not wanted)."""
    if not wanted(dict(os.environ)):
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment(dict(os.environ)))
