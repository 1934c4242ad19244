"""What every build stage shares: logging, progress bars, stage timing, provenance, and the
copies control's builder (:func:`build_copies`), which both tasks' steps call.

Stages log through :mod:`logging` (logger ``moqe_compile.build``); ``moqe-compile build -v/-q``
sets its level. Progress bars go to stderr and are off when the build is quiet.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

log = logging.getLogger("moqe_compile.build")


def versions(**extra: str) -> dict:
    """The library versions a bundle was built with (the manifest's ``created_with``)."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from moqe_compile.version import __version__

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
        self.say(name)
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
        """A progress message: logged at INFO unless the build is quiet."""
        if not self.quiet:
            log.info(msg)


def copy_parts(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint random subsets of ``range(n)`` (each sorted), seeded: the copies' calibration data."""
    return [np.sort(p) for p in np.array_split(np.random.default_rng(seed).permutation(n), k)]


def build_copies(recipe, n_calibration: int, k: int, seed: int, build_one: Callable[[object, np.ndarray], object],
                 stages: Stages, label: str) -> list:
    """The copies control: ``k`` copies of ``recipe`` (named ``copy0..``), each built by
    ``build_one(recipe_copy, calibration_indices)`` on a disjoint random part of the calibration
    data. They differ only by calibration noise (``docs/design.md#controls-and-the-gate``)."""
    from moqe_compile.errors import BuildError

    if n_calibration < k:
        raise BuildError(f"[controls] copies = {k} needs at least {k} calibration samples of {label!r}; "
                         f"there are {n_calibration}: raise the calibration data or lower copies.")
    built = []
    with stages.bar(k, f"copies of {label}") as pb:
        for i, idx in enumerate(copy_parts(n_calibration, k, seed)):
            stages.say(f"controls: copy {i + 1}/{k} of {label} on {len(idx)} calibration samples")
            built.append(build_one(replace(recipe, name=f"copy{i}"), idx))
            pb.update(1)
    return built
