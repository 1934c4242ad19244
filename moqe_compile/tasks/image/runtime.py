"""``Runtime``: an image-classification bundle on ONNX Runtime CPU (or TensorRT engines).

Per call: the router scores the whole batch, samples are grouped by chosen expert, each
group runs as one batch on its expert, and outputs return in input order
(``runtime/base.py`` has the routing, the fallback, ``submit`` and ``close``).

The router graph gets two sessions: batches of at most ``router_threads_max_batch`` (2) run
on ``router_threads`` (1) intra-op threads, larger ones with the experts' setting. A router's
ops are tiny, and at batch 1-2 ONNX Runtime's thread hand-offs cost more than they save;
at large batches the experts' thread count wins (bench/router_budget.py measures both;
docs/results.md#demo-bundle-build-time-and-cpu-latency).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile.backends import BACKENDS, resolve_backend
from moqe_compile.bundle import read_bundle
from moqe_compile.bundle.reader import Bundle, Graph
from moqe_compile.errors import BundleError, ConfigError, InputError
from moqe_compile.runtime import base
from moqe_compile.runtime.base import QueueConfig, RouterSessions, timing
from moqe_compile.runtime.dispatch import group_by_expert, scatter
from moqe_compile.tasks.image.preprocess import InputLimits, Preprocess, load_inputs, refuse_nonfinite


@dataclass
class RunResult(base.RunResult):
    """``outputs`` are the (N, C) float32 logits, also readable as ``logits``."""

    @property
    def logits(self) -> np.ndarray:
        return self.outputs

    def topk(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(class indices, probabilities) of the ``k`` most probable classes per sample."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError(f"topk(k={k!r}): k must be a positive integer.")
        z = self.logits - self.logits.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        idx = np.argsort(-p, axis=-1)[:, :k]
        return idx, np.take_along_axis(p, idx, -1)


def read_labels(bundle: Bundle, rel: str) -> list[str]:
    """The class names in ``rel``: a JSON list of strings (verified bytes, like every bundle file)."""
    try:
        labels = json.loads(bundle.read(rel).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"labels file {rel!r} of {str(bundle.root)!r} is not a JSON list of names: {e}.") from e
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"labels file {rel!r} of {str(bundle.root)!r} is not a JSON list of names.")
    return labels


def check_output_width(graph: Graph, width: int) -> None:
    """Refuse a graph whose first output fixes a width other than ``width`` (an [N, 4] expert in
    a 1000-class bundle); a symbolic width is left to run time."""
    got = graph.output_width()
    if got is not None and got != width:
        raise BundleError(f"graph {graph.rel!r} outputs {got} columns; the bundle expects {width} "
                          "(task.num_classes for experts, the number of experts for the router).")


def check_input_shape(manifest: dict, shape: tuple[int, int, int], root: Path) -> None:
    """Refuse preprocessing that makes inputs of another shape than ``io.input`` declares
    (a crop of 32 for a 28 px model): the user's inputs would be blamed at run time."""
    pre = manifest["preprocessing"]
    if not len(pre["mean"]) == len(pre["std"]) == shape[0]:
        raise BundleError(f"bundle {str(root)!r}: preprocessing.mean {pre['mean']} and std {pre['std']} need one "
                          f"value per channel ({shape[0]}).")
    declared = manifest["io"]["input"]["shape"][1:]
    for got, want, what in zip(shape, declared, ("channels", "crop", "crop")):
        if isinstance(want, int) and got != want:
            raise BundleError(f"bundle {str(root)!r}: preprocessing makes {list(shape)} inputs but io.input.shape "
                              f"is {manifest['io']['input']['shape']} (preprocessing.{what} disagrees).")


class ImageBundleRuntime(base.BundleRuntime):
    """What the CPU and GPU image runtimes share: preprocessing, labels and the batch check."""

    def __init__(self, root, manifest: dict, queue: QueueConfig | None = None, only_expert: str | None = None):
        super().__init__(Path(root), manifest, queue)
        if only_expert is not None and only_expert not in self.expert_names:
            raise InputError(f"expert {only_expert!r} is not in this bundle; it has {self.expert_names}.")
        if only_expert is not None:
            self.default_expert = self.expert_names.index(only_expert)
        self.preprocess = Preprocess.from_dict(manifest["preprocessing"])
        check_input_shape(manifest, self.preprocess.input_shape, self.root)
        # What load_inputs (and the server's image decoder) may decode per call.
        self.input_limits = InputLimits()
        self.bundle = Bundle(self.root, manifest)
        labels = manifest["task"].get("labels")
        self.labels: list[str] = read_labels(self.bundle, labels["path"]) if labels else []
        if self.labels and len(self.labels) != manifest["task"]["num_classes"]:
            raise BundleError(f"labels file {labels['path']!r} of {str(self.root)!r} names {len(self.labels)} classes; "
                              f"task.num_classes is {manifest['task']['num_classes']}.")

    def _graph(self, cls, rel: str, width: int):
        """What backend ``cls`` opens for graph ``rel``: its verified bytes where it takes them
        (else its path), after checking that its output has ``width`` columns."""
        graph = self.bundle.graph(rel)
        check_output_width(graph, width)
        return graph if getattr(cls, "accepts_graph", False) else self.bundle.file(rel)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape

    @property
    def num_classes(self) -> int:
        """The output width every expert must have: ``task.num_classes``, which ``io.output`` must
        agree with where it fixes the width."""
        n = self.manifest["task"]["num_classes"]
        declared = self.manifest["io"]["output"]["shape"][-1]
        if isinstance(declared, int) and declared != n:
            raise BundleError(f"bundle {str(self.root)!r}: io.output.shape {self.manifest['io']['output']['shape']} "
                              f"has {declared} columns but task.num_classes is {n}.")
        return n

    def load_inputs(self, path: str | Path, limits: InputLimits | None = None) -> tuple[list[str], np.ndarray]:
        """``preprocess.load_inputs`` with this bundle's recipe, within ``limits`` (default:
        ``self.input_limits``)."""
        return load_inputs(path, self.preprocess, limits or self.input_limits)

    def _check(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as the contiguous float32 (N, C, H, W) the graphs take, or an InputError."""
        shape = self.preprocess.input_shape
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or tuple(batch.shape[1:]) != shape:
            got = getattr(batch, "shape", type(batch).__name__)
            raise InputError(f"batch has shape {got}; expected (N, {shape[0]}, {shape[1]}, {shape[2]}).")
        if batch.dtype != np.float32:
            raise InputError(f"batch has dtype {batch.dtype}; expected float32 (preprocessed).")
        if len(batch) == 0:
            raise InputError("batch is empty.")
        batch = np.ascontiguousarray(batch)  # no copy when it already is; the check then reads a view
        refuse_nonfinite(batch, "batch sample {}")
        return batch


class Runtime(ImageBundleRuntime):
    """A loaded image bundle. ``run(batch)`` runs at once on the calling thread; ``submit(batch)``
    queues it for the dynamic batcher and returns a ``Future[RunResult]``. Both are safe from
    any number of threads. ``close()`` (or leaving a ``with`` block) drains queued requests,
    waits for running calls, then releases every session."""

    def __init__(self, root: Path, manifest: dict, backend: str, intra_op_threads: int = 0, router_threads: int = 1,
                 router_threads_max_batch: int = 2, queue: QueueConfig | None = None,
                 only_expert: str | None = None, route_only: bool = False, verify: bool = True,
                 all_experts: bool = False):
        super().__init__(root, manifest, queue, only_expert)
        for what, n in (("intra_op_threads", intra_op_threads), ("router_threads", router_threads)):
            if not isinstance(n, int) or n < 0:
                raise ConfigError(f"{what} = {n!r}: give a thread count >= 0 (0: ONNX Runtime's default).")
        self.bundle.verify = verify
        self.backend = backend
        cls = self._cls = BACKENDS[backend]
        self._threads = intra_op_threads
        routed = manifest["routing"]["enabled"] and only_expert is None
        # Which experts may run: every one, except with only_expert (that expert alone, no
        # router: benchmarks' single-expert baseline) or route_only (the router alone: a
        # scale-out ingress whose experts run elsewhere), whose other sessions are never made.
        self._allowed = [only_expert in (None, e["name"]) and not route_only for e in manifest["experts"]]
        # Created now: the sessions run() can reach (every expert when routed, else the default
        # one) or, with all_experts, every allowed one. A gated bundle serves one expert: the
        # others' sessions (memory, thread pools) are made on first run_expert only.
        eager = [ok and (all_experts or routed or k == self.default_expert) for k, ok in enumerate(self._allowed)]
        self._experts = [self._open_expert(k) if now else None for k, now in enumerate(eager)]
        self._open_lock = threading.Lock()
        if routed:
            rpath = self._graph(cls, manifest["router"]["path"], len(self.expert_names))
            few = (cls("router", rpath, router_threads)
                   if router_threads != intra_op_threads and router_threads_max_batch > 0 else None)
            self._router = RouterSessions(few, cls("router", rpath, intra_op_threads), router_threads_max_batch)

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", verify: bool = True, intra_op_threads: int = 0,
             router_threads: int = 1, router_threads_max_batch: int = 2,
             queue: QueueConfig | None = None, only_expert: str | None = None,
             route_only: bool = False, all_experts: bool = False) -> "Runtime":
        """Open a bundle (hashes verified unless ``verify=False``) and create the sessions
        ``run`` uses, once: the router and every expert when the bundle routes, its one expert
        when the gate refused routing (other experts then open on their first ``run_expert``;
        ``all_experts=True`` opens them now).
        ``intra_op_threads``: experts, and the router above ``router_threads_max_batch``
        (0: ONNX Runtime's default); ``router_threads``: the router on small batches;
        ``queue``: the dynamic batcher behind ``submit``; ``only_expert``: serve that expert
        alone without the router; ``route_only``: load the router and no expert (``route``
        works, ``run`` does not)."""
        b = read_bundle(path, verify=verify)
        name = resolve_backend(backend, b.manifest["backends"])
        return cls(b.root, b.manifest, name, intra_op_threads, router_threads, router_threads_max_batch, queue,
                   only_expert, route_only, verify, all_experts)

    def _open_expert(self, k: int):
        e = self.manifest["experts"][k]
        return self._cls(e["name"], self._graph(self._cls, e["variants"][self.backend]["path"], self.num_classes),
                         self._threads)

    def _release(self) -> None:
        with self._open_lock:
            for s in [*self._experts, self._router]:
                if s is not None:
                    s.close()

    def _run(self, batch: np.ndarray) -> RunResult:
        t0 = time.perf_counter()
        idx, conf = self.route(batch)
        t1 = time.perf_counter()
        first = int(idx[0])
        if (idx == first).all():
            # One expert for the whole batch (always so when gated): the batch as it came, no
            # gather into a new array and no scatter back (bench/runtime_overhead.py).
            out = self._session(first).run(batch)
        else:
            groups = group_by_expert(idx)
            out = scatter(groups, [self._session(k).run(batch[m]) for k, m in groups], len(batch))
        t2 = time.perf_counter()
        return RunResult(out, idx, [self.expert_names[k] for k in idx.tolist()], conf, timing(t0, t1, t2),
                         self.fell_back(conf))

    def run_expert(self, name: str, batch: np.ndarray) -> np.ndarray:
        """Run one expert alone (benchmarks, controls)."""
        if name not in self.expert_names:
            raise InputError(f"expert {name!r} is not in this bundle; it has {self.expert_names}.")
        batch = self._check(batch)
        with self.counted():  # close() waits for it, and a closed runtime refuses it
            return self._session(self.expert_names.index(name)).run(batch)

    def _session(self, k: int):
        sess = self._experts[k]
        if sess is not None:
            return sess
        if not self._allowed[k]:
            loaded = [n for n, ok in zip(self.expert_names, self._allowed) if ok]
            raise InputError(f"expert {self.expert_names[k]!r} was not loaded (this runtime has {loaded}).")
        with self._open_lock:  # first use of an expert a gated bundle does not serve: open it once
            self._raise_if_closed()
            if self._experts[k] is None:
                self._experts[k] = self._open_expert(k)
            return self._experts[k]
