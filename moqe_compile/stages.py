"""What every build stage shares: logging, progress bars, stage timing and provenance.

Stages log through :mod:`logging` (logger ``moqe_compile.build``); ``moqe-compile build -v/-q``
sets its level. Progress bars go to stderr and are off when the build is quiet.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("moqe_compile.build")


def versions(**extra: str) -> dict:
    """The library versions a bundle was built with (the manifest's ``created_with``)."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from moqe_compile import __version__

    return {"moqe_compile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(), **extra}


def created_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Stages:
    """Times named stages (``seconds``: stage -> s, plus ``total``) and makes progress bars."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info(name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)

    def finish(self) -> dict[str, float]:
        self.seconds["total"] = round(time.perf_counter() - self._start, 2)
        return self.seconds

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=self.quiet, file=sys.stderr, leave=False)

    def say(self, msg: str) -> None:
        log.info(msg)
