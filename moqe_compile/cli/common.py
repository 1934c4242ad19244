"""Shared CLI plumbing: every MoqeError becomes one line on stderr and its exit code.

The exit codes that are not an error class's ``exit_code`` (docs/cli.md has the table)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moqe_compile.errors import MoqeError

USAGE = 2  # argparse's own exit code for a bad command line
CHECK_FAILED = 9  # a check ran and found violations (check-qdq FAIL)
INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
BROKEN_PIPE = 141  # the reader of stdout went away (`| head`): 128 + SIGPIPE, as shells report it
TERMINATED = 143  # SIGTERM (timeout, docker stop, a cancelled CI job): 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT), so that every ``with`` and
    ``finally`` on the way out runs: the bundle writer removes its temporary folders."""


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere the
    block runs with the handler it found). A second SIGTERM while the first one's clean-up runs
    is ignored: the clean-up is what the first one asked for."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def guarded(fn: Callable[[], int], prog: str) -> int:
    try:
        return fn()
    except MoqeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written.", file=sys.stderr)
        return INTERRUPTED
    except Terminated:
        print(f"{prog}: terminated; its temporary files were removed.", file=sys.stderr)
        return TERMINATED
    except BrokenPipeError:
        # Python would print a traceback when it flushes stdout at exit: point stdout at devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
