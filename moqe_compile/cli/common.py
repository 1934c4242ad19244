"""Shared CLI plumbing: every MoqeError becomes one line on stderr and its exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from moqe_compile.errors import MoqeError


def guarded(fn: Callable[[], int], prog: str) -> int:
    try:
        return fn()
    except MoqeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written.", file=sys.stderr)
        return 130
