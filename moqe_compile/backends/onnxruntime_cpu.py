"""ONNX Runtime on the CPU: the one place that creates ``InferenceSession`` objects.

``session()`` is the factory every stage uses (build-time checks, scoring, the runtime), so the
options that matter for speed and correctness are set once. ``InferenceSession.run`` is
thread-safe, so one session per model is shared by every caller.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moqe_compile.bundle.reader import Graph
from moqe_compile.errors import BackendError, ConfigError

LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(model: str | Path | bytes, *, threads: int = 0, optimization: str = "all",
            add_shared: Callable[[ort.SessionOptions], None] | None = None,
            optimized_path: str | Path | None = None, name: str = "", spinning: str | None = None,
            disabled_optimizers: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` for a model path or serialized bytes.

    ``threads``: intra-op threads (0: ONNX Runtime's default, or the CPUs this process may use
    where that is fewer: :func:`allowed_cpus_if_restricted`). ``optimization``: one of
    ``LEVELS``. ``add_shared(options)`` supplies initializers a bundle stores once
    (``bundle/shared_weights.py``). ``optimized_path``: where ONNX Runtime writes the graph it
    executes (used to check which kernels run). ``spinning``: one of ``SPINNING`` (None:
    :func:`default_spinning`). ``disabled_optimizers`` (ONNX Runtime graph transformer names,
    e.g. ``NhwcTransformer``) exists for benchmarks.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[optimization]
    _set_spinning(so, default_spinning() if spinning is None else spinning)
    threads = threads or allowed_cpus_if_restricted()
    if threads:
        so.intra_op_num_threads = threads
    if add_shared is not None:
        add_shared(so)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        what = "an in-memory model" if isinstance(model, bytes) else repr(str(model))
        raise BackendError(f"{name or 'model'}: ONNX Runtime could not load {what}: {e}") from e


SPINNING = ("never", "in-run", "always")
SPINNING_ENV = "MOQE_ORT_SPINNING"


def default_spinning() -> str:
    """The spin-wait policy of sessions made without an explicit one: ``$MOQE_ORT_SPINNING`` if
    set, else ``"in-run"``."""
    value = os.environ.get(SPINNING_ENV, "in-run")
    if value not in SPINNING:
        raise ConfigError(f"{SPINNING_ENV}={value!r} is not one of {list(SPINNING)}; unset it for the default.")
    return value


def _set_spinning(so: ort.SessionOptions, spinning: str) -> None:
    """Whether intra-op threads spin-wait for work, and when they stop.

    A MoQE call runs the router, then one session per expert group, back to back. With ONNX
    Runtime's default ("always"), a session's threads go on spinning after its run returns and
    starve the next session. Never spinning costs every run the wake-up of its threads at each
    parallel node instead. "in-run" spins during a run and stops when the run returns
    (``session.force_spinning_stop``), so the next session finds the cores free
    (docs/results.md#spin-waiting-only-during-a-run)."""
    if spinning not in SPINNING:
        raise ConfigError(f"spinning={spinning!r} is not one of {list(SPINNING)}.")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "never" else "1")
    if spinning == "in-run":
        so.add_session_config_entry("session.force_spinning_stop", "1")


def allowed_cpus_if_restricted() -> int:
    """How many CPUs this process may run on, where that is fewer than the machine has (taskset,
    a container's cpuset); 0 otherwise. Left to its default thread count, ONNX Runtime sizes its
    pool from the machine and pins each thread to a core, ignoring the process's affinity: under
    ``taskset -c 0`` its worker ran on core 1 (``tests/backends/test_onnxruntime_cpu.py``), and
    in a container the pinning fails with ``pthread_setaffinity_np`` errors. An explicit count
    makes it neither oversize the pool nor pin, so the session stays where it was put; an
    unrestricted process keeps ONNX Runtime's default (one pinned thread per physical core)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: no affinity to respect here
        return 0
    return allowed if allowed < (os.cpu_count() or allowed) else 0


def optimized_model_bytes(model: str | Path, optimization: str = "extended") -> bytes:
    """The serialized graph ONNX Runtime CPU executes after its optimizations at ``optimization``."""
    with tempfile.TemporaryDirectory(prefix="moqe-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(model, optimization=optimization, optimized_path=out)
        return out.read_bytes()


def graph_session(graph: Graph, *, threads: int = 0, name: str = "") -> ort.InferenceSession:
    """A CPU session over a bundle graph's verified bytes (``Bundle.graph``): ONNX Runtime never
    opens the file, so what runs is what was hashed; external data and shared tensors come
    from memory too."""
    return session(graph.model, threads=threads, add_shared=graph.configure, name=name or graph.rel)


class OrtCpuSession:
    """One model on the CPU behind the backend interface (``run(x) -> first output``).
    ``model``: a bundle ``Graph`` (verified bytes) or a path (build-time checks)."""

    accepts_graph = True  # Runtime hands it verified bytes, not a path

    def __init__(self, name: str, model: Path | Graph, intra_op_threads: int = 0):
        self.name = name
        if isinstance(model, Graph):
            self._sess = graph_session(model, threads=intra_op_threads, name=name)
        else:
            self._sess = session(model, threads=intra_op_threads, name=name)
        self._input = self._sess.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        sess = self._sess  # read once: a close() in between must not turn into an AttributeError
        if sess is None:
            raise BackendError(f"{self.name}: the session is closed.")
        try:
            return sess.run(None, {self._input: x})[0]
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            # A graph that disagrees with its bundle (a wrong input size) fails here: name it.
            raise BackendError(f"{self.name}: ONNX Runtime failed on a batch of shape {tuple(x.shape)}: {e}") from e

    def close(self) -> None:
        self._sess = None
