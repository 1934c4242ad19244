"""What every build stage shares: logging, progress bars, stage timing and peak memory,
provenance, and the copies control's builder (:func:`build_copies`), which both tasks' steps call.

Stages log through :mod:`logging` (logger ``moqe_compile.build``); ``moqe-compile build -v/-q``
sets its level. Progress bars go to stderr and are off when the build is quiet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
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


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set size to its current size (Linux >= 4.0,
    ``/proc/self/clear_refs``, proc(5)); False where the OS has no such reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# The highest peak seen before a reset inside the current stage (a per-expert window resets the
# kernel's peak; the stage's own peak must still count what came before).
_carried_peak = 0.0


@contextlib.contextmanager
def peak_window() -> Iterator[dict]:
    """Measure the peak resident memory of a part of a stage (one expert): ``out["peak_rss_mb"]``
    after the block. Where the OS cannot reset the peak it is the process's peak so far."""
    global _carried_peak
    _carried_peak = max(_carried_peak, peak_rss_mb())
    _reset_peak_rss()
    out: dict = {}
    yield out
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB since start or the last reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


class Stages:
    """Times named stages (``seconds``: stage -> s, plus ``total``), records each stage's peak
    resident memory (``peak_rss_mb``) and makes progress bars.

    A stage's peak RSS is the highest resident memory while it ran where the OS can reset the
    peak (Linux); elsewhere it is the process's peak up to the stage's end (``rss_per_stage``
    False), so only the stage that raised it is told apart."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.rss_per_stage = True
        self._start = time.perf_counter()
        self._peak_before = peak_rss_mb()  # loading the libraries, before any stage

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(name)
        global _carried_peak
        _carried_peak = 0.0
        self.rss_per_stage = _reset_peak_rss() and self.rss_per_stage
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.peak_rss_mb[name] = round(max(peak_rss_mb(), _carried_peak), 1)

    def finish(self) -> dict[str, float]:
        self.seconds["total"] = round(time.perf_counter() - self._start, 2)
        return self.seconds

    def report(self) -> dict:
        """The build's cost for ``report.json``: seconds and peak RSS per stage, in run order."""
        return {"stages": [{"name": n, "seconds": self.seconds[n], "peak_rss_mb": self.peak_rss_mb[n]}
                           for n in self.peak_rss_mb],
                "total_seconds": self.seconds.get("total", round(time.perf_counter() - self._start, 2)),
                "peak_rss_mb": round(max([self._peak_before, *self.peak_rss_mb.values()]), 1),
                "rss_per_stage": self.rss_per_stage}

    def add_to_report(self, report_json) -> None:
        """Write :meth:`report` into the bundle's ``report.json`` as its ``build`` entry
        (after the last stage, so the report stage itself is counted)."""
        rep = json.loads(report_json.read_text())
        rep["build"] = self.report()
        report_json.write_text(json.dumps(rep, indent=2))

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=self.quiet, file=sys.stderr, leave=False)

    def say(self, msg: str) -> None:
        """A progress message: logged at INFO unless the build is quiet."""
        if not self.quiet:
            log.info(msg)


def format_build_cost(build: dict) -> str:
    """A ``report.json`` ``build`` entry as the table ``moqe-compile build`` prints at its end."""
    rows = [(st["name"], f"{st['seconds']:.1f}", f"{st['peak_rss_mb']:.0f}") for st in build["stages"]]
    rows.append(("total", f"{build['total_seconds']:.1f}", f"{build['peak_rss_mb']:.0f}"))
    w = max(len(r[0]) for r in rows)
    head = f"{'stage':<{w}}  {'seconds':>8}  {'peak RSS MiB':>12}"
    return "\n".join([head, *(f"{n:<{w}}  {s:>8}  {m:>12}" for n, s, m in rows)])


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
