"""Ray Serve scale-out: the router as the ingress deployment and each expert as its own
deployment, composed with deployment handles, each scaled on its own (``num_replicas``).

    client ──HTTP v2 / handle──► MoqeIngress (router; Ray's @serve.batch merges requests)
                                   ├─► expert_<a> × replicas
                                   └─► expert_<b> × replicas      one call per chosen expert

The ingress groups with ``runtime/dispatch.py``, the same code as ``Runtime.run`` and the
Triton BLS model, so every deployment answers like the in-process runtime. It speaks the
same Open Inference Protocol body as ``moqe-serve`` (``POST /v2/models/<name>/infer``;
GET returns the model metadata).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from moqe_compile.errors import ConfigError, InputError
from moqe_compile.runtime.dispatch import group_by_expert, scatter, split_requests
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


def build_app(bundle: str, name: str, cfg: RayServeConfig):
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
    class MoqeIngress:
        def __init__(self, bundle: str, model: str, experts: dict, max_batch: int, max_delay_ms: float):
            from moqe_compile.serving.app import model_metadata

            self.rt = open_runtime(bundle, route_only=True)
            self.model = model
            self.handles = [experts.get(n) for n in self.rt.expert_names]
            self.meta = model_metadata(self.rt, model)
            self._batched.set_max_batch_size(max_batch)
            self._batched.set_batch_wait_timeout_s(max_delay_ms / 1e3)

        async def infer(self, x: np.ndarray) -> RunResult:
            return await self._batched(self.rt.check(x))

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def _batched(self, xs: list[np.ndarray]) -> list[RunResult]:
            x = np.concatenate(xs) if len(xs) > 1 else xs[0]
            idx, conf = self.rt.route(x)
            groups = group_by_expert(idx)
            outs = await asyncio.gather(*[self.handles[k].remote(np.ascontiguousarray(x[m])) for k, m in groups])
            res = RunResult(scatter(groups, list(outs), len(x)), idx, [self.rt.expert_names[k] for k in idx], conf)
            return [res.slice(s.start, s.stop) for s in split_requests([len(a) for a in xs])]

        async def __call__(self, request):
            from starlette.responses import JSONResponse, Response

            from moqe_compile.serving.app import to_batch
            from moqe_compile.serving.protocol import ProtocolError, encode_infer_response, parse_infer_request

            if request.method == "GET":
                return JSONResponse(self.meta)
            if not request.url.path.rstrip("/").endswith("/infer"):
                return JSONResponse({"error": f"no route {request.url.path!r}; POST .../infer"}, status_code=404)
            try:
                req = parse_infer_request(await request.body(), request.headers.get("inference-header-content-length"))
                res = await self.infer(to_batch(req, self.rt))
            except ProtocolError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except InputError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            body, header_len = encode_infer_response(self.model, "1", req, res)
            if header_len is None:
                return Response(body, media_type="application/json")
            return Response(body, media_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(header_len)})

    experts = {n: Expert.options(name=f"expert_{n}", num_replicas=cfg.replicas.get(n, 1)).bind(bundle, n, cfg.threads)
               for n in used}
    return MoqeIngress.options(name="router").bind(bundle, name, experts, cfg.max_batch, cfg.max_delay_ms)


def run_ray(bundle: str, name: str, cfg: RayServeConfig, host: str = "127.0.0.1", port: int = 8000,
            address: str | None = None, blocking: bool = True):
    """Start (or join, with ``address``) Ray, deploy the app under ``/v2/models/<name>`` and
    return its handle; with ``blocking`` serve until SIGINT/SIGTERM, then shut down."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ConfigError("--ray needs Ray Serve: pip install 'moqe-compile[ray]'.") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(str(bundle), name, cfg), name=name, route_prefix=f"/v2/models/{name}")
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
