"""Ray Serve scale-out: the router as the ingress deployment and each expert as its own
deployment, composed with deployment handles, each scaled on its own (``num_replicas``).

    client ──HTTP v2 / handle──► MoqeIngress (router; Ray's @serve.batch merges requests)
                                   ├─► expert_<a> × replicas
                                   └─► expert_<b> × replicas      one call per chosen expert

The ingress groups with ``runtime/dispatch.py``, the same code as ``Runtime.run`` and the
Triton BLS model, so every deployment answers like the in-process runtime. It serves the
same FastAPI app as ``moqe-serve`` (``@serve.ingress``): health, metadata, errors, limits and
metrics are the same code.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from moqe_compile.errors import ConfigError, InputError
from moqe_compile.runtime.dispatch import group_by_expert, scatter, split_requests
from moqe_compile.serving.app import ServeLimits, create_app
from moqe_compile.serving.server import open_runtime
from moqe_compile.tasks.image.runtime import RunResult


@dataclass(frozen=True)
class RayServeConfig:
    replicas: dict[str, int] = field(default_factory=dict)  # expert name -> num_replicas (default 1)
    router_replicas: int = 1
    num_cpus: float = 1.0  # per replica; 0 packs every replica onto a small machine
    threads: int = 0  # ONNX Runtime intra-op threads per replica (0: its default)
    max_batch: int = 32  # @serve.batch on the ingress: requests merged per routing pass
    max_delay_ms: float = 2.0


def parse_replicas(items: list[str]) -> dict[str, int]:
    """``["minmax=2", "entropy=1"]`` -> {"minmax": 2, "entropy": 1}."""
    out = {}
    for it in items:
        name, sep, n = it.partition("=")
        if not sep or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--replicas {it!r} must look like EXPERT=N with N >= 1.")
        out[name] = int(n)
    return out


def build_app(bundle: str, name: str, cfg: RayServeConfig, limits: ServeLimits | None = None):
    """The Ray Serve application for ``bundle`` (not yet running: pass it to ``serve.run``)."""
    from ray import serve

    probe = open_runtime(bundle, route_only=True)
    names = probe.expert_names
    # An unrouted bundle only ever uses its default expert; a routed one may use any.
    used = names if probe.routed else [names[probe.default_expert]]
    probe.close()
    unknown = sorted(set(cfg.replicas) - set(names))
    if unknown:
        raise ConfigError(f"--replicas names {unknown}, not experts of this bundle ({names}).")
    opts = {"num_cpus": cfg.num_cpus}

    @serve.deployment(ray_actor_options=opts)
    class Expert:
        def __init__(self, bundle: str, expert: str, threads: int):
            self.rt = open_runtime(bundle, only_expert=expert, intra_op_threads=threads)
            self.expert = expert

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return self.rt.run_expert(self.expert, x)

    @serve.deployment(ray_actor_options=opts, num_replicas=cfg.router_replicas)
    @serve.ingress()
    class MoqeIngress:
        def __init__(self, bundle: str, model: str, experts: dict, max_batch: int, max_delay_ms: float,
                     limits: ServeLimits):
            self.rt = open_runtime(bundle, route_only=True)
            self.model, self.limits = model, limits
            self.handles = [experts.get(n) for n in self.rt.expert_names]
            self._batched.set_max_batch_size(max_batch)
            self._batched.set_batch_wait_timeout_s(max_delay_ms / 1e3)
            self.metrics = None

        def __serve_build_asgi_app__(self):
            # The same FastAPI app as moqe-serve, its inference sent through the batched router.
            app = create_app(self.rt, self.model, self.limits, close_on_shutdown=False, infer=self.infer)
            self.metrics = app.state.metrics
            return app

        async def infer(self, x: np.ndarray) -> RunResult:
            return await self._batched(self.rt.check(x))

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def _batched(self, xs: list[np.ndarray]) -> list[RunResult]:
            t0 = time.perf_counter()
            x = np.concatenate(xs) if len(xs) > 1 else xs[0]
            idx, conf = self.rt.route(x)
            groups = group_by_expert(idx)
            outs = await asyncio.gather(*[self.handles[k].remote(np.ascontiguousarray(x[m])) for k, m in groups])
            res = RunResult(scatter(groups, list(outs), len(x)), idx, [self.rt.expert_names[k] for k in idx], conf,
                            timing_ms={"total": (time.perf_counter() - t0) * 1e3})
            if self.metrics is not None:
                self.metrics.observe_batch(res, len(x), len(xs))
            return [res.slice(s.start, s.stop) for s in split_requests([len(a) for a in xs])]

    experts = {n: Expert.options(name=f"expert_{n}", num_replicas=cfg.replicas.get(n, 1)).bind(bundle, n, cfg.threads)
               for n in used}
    return MoqeIngress.options(name="router").bind(bundle, name, experts, cfg.max_batch, cfg.max_delay_ms,
                                                   limits or ServeLimits())


def run_ray(bundle: str, name: str, cfg: RayServeConfig, host: str = "127.0.0.1", port: int = 8000,
            address: str | None = None, blocking: bool = True, limits: ServeLimits | None = None):
    """Start (or join, with ``address``) Ray, deploy the app at the root of Ray's HTTP proxy
    (the v2 routes: ``/v2/health/ready``, ``/v2/models/<name>/infer``, ``/metrics``, ...) and
    return its handle; with ``blocking`` serve until SIGINT/SIGTERM, then shut down."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ConfigError("--ray needs Ray Serve: pip install 'moqe-compile[ray]'.") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(str(bundle), name, cfg, limits), name=name, route_prefix="/")
    if not blocking:
        return handle
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"moqe-serve (Ray Serve): http://{host}:{port}/v2/models/{name}/infer", flush=True)
    stop.wait()
    serve.shutdown()  # Serve drains in-flight requests before its replicas stop
    ray.shutdown()
    return None
