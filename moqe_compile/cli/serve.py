"""``moqe-serve BUNDLE``: serve a bundle over the Open Inference Protocol (KServe v2, HTTP)."""

from __future__ import annotations

import argparse
import math
import sys

from moqe_compile.cli.common import guarded


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names
# What each numeric option takes: (lowest, highest or None, only above the lowest?, what). nan and
# inf are outside every range: they got past "v < 0" checks and then broke every request (the
# batcher's wait, asyncio's timeouts, the body limit's int()) instead of the command line.
RANGES = {
    "port": (0, 65535, False, "a port number"),  # 0: any free port
    "max_batch": (1, None, False, "a number of samples"),
    "max_queue": (1, None, False, "a number of requests"),
    "workers": (1, None, False, "a number of threads"),
    "threads": (0, None, False, "a number of threads"),
    "max_in_flight": (1, None, False, "a number of requests"),
    "max_delay_ms": (0, 60_000, False, "a number of milliseconds"),
    "max_queue_wait_ms": (0, 3_600_000, False, "a number of milliseconds"),
    "max_body_mb": (0, 65_536, True, "a number of MiB"),
    "body_timeout_s": (0, 3600, True, "a number of seconds"),
    "num_cpus": (0, 1024, False, "a number of CPUs"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moqe-serve", description="Serve a MoQE bundle over the Open Inference "
                                 "Protocol (KServe v2) on HTTP, with dynamic batching and Prometheus /metrics.")
    ap.add_argument("bundle", help="bundle directory written by moqe-compile build")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, logged at "
                    "--log-level info)")
    ap.add_argument("--name", default="", help="model name in the URLs (default: the bundle directory's name)")
    ap.add_argument("--max-batch", type=int, default=32, help="merge queued requests up to this many samples (32)")
    ap.add_argument("--max-delay-ms", type=float, default=2.0,
                    help="wait at most this long after a request arrives for others to merge with it (2)")
    ap.add_argument("--max-queue", type=int, default=256,
                    help="requests allowed to wait; beyond it the server answers 503 + Retry-After (256)")
    ap.add_argument("--workers", type=int, default=1, help="threads running merged batches (1)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body accepted (64 MiB)")
    ap.add_argument("--max-in-flight", type=int, default=32,
                    help="infer requests admitted at once; beyond it 503 + Retry-After (32)")
    ap.add_argument("--max-queue-wait-ms", type=float, default=1000.0,
                    help="a request not started after this long in the queue is answered 503 (1000; 0: no limit)")
    ap.add_argument("--body-timeout-s", type=float, default=30.0,
                    help="drop a request whose whole body has not arrived this long after it started, with "
                    "408 (30)")
    ap.add_argument("--backend", default="auto", help="execution backend (default: auto)")
    ap.add_argument("--only-expert", default=None, metavar="NAME",
                    help="serve this expert alone without the router (a single-expert baseline)")
    ap.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS,
                    help="uvicorn log level (default warning)")
    ray = ap.add_argument_group("scale-out on Ray Serve (pip install 'moqe-compile[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="deploy the router and each expert as Ray Serve deployments instead of one process")
    ray.add_argument("--replicas", nargs="*", default=[], metavar="EXPERT=N",
                     help="replicas per expert (default 1 each)")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    args = ap.parse_args(argv)
    return guarded(lambda: _serve(args), "moqe-serve")


# options of the in-process server that Ray Serve replicas do not take: refused, never ignored
LOCAL_ONLY = {"only_expert": None, "backend": "auto", "workers": 1, "max_queue": 256}


def _refuse_local_only_options(args) -> None:
    from moqe_compile.errors import ConfigError

    given = [f"--{k.replace('_', '-')}" for k, default in LOCAL_ONLY.items() if getattr(args, k) != default]
    if given:
        raise ConfigError(f"{', '.join(given)} do(es) not apply with --ray (each expert is a Ray deployment; "
                          "size it with --replicas and --num-cpus): drop them or serve without --ray.")


def _check_range(name: str, v: float, low: float, high: float | None, above: bool, what: str) -> None:
    from moqe_compile.errors import ConfigError

    if math.isfinite(v) and (v > low if above else v >= low) and (high is None or v <= high):
        return
    if above:
        span = f"above {low}" + (f", up to {high}" if high is not None else "")
    else:
        span = f"from {low} " + (f"to {high}" if high is not None else "up")
    shown = f"{v:g}" if isinstance(v, float) else v
    raise ConfigError(f"--{name.replace('_', '-')} {shown} is out of range: give {what} {span}.")


def _serve(args) -> int:
    from moqe_compile.errors import ConfigError
    from moqe_compile.runtime import QueueConfig
    from moqe_compile.serving.server import ServeConfig, check_servable, limits_of, serve

    for name, bounds in RANGES.items():
        _check_range(name, getattr(args, name), *bounds)
    check_servable(args.bundle)  # before Ray or uvicorn start: a causal-LM bundle has no v2 codec
    cfg = ServeConfig(host=args.host, port=args.port, name=args.name, max_body_mb=args.max_body_mb,
                      max_in_flight=args.max_in_flight, max_queue_wait_ms=args.max_queue_wait_ms,
                      body_timeout_s=args.body_timeout_s, log_level=args.log_level)
    if args.ray:
        _refuse_local_only_options(args)
        from moqe_compile.serving.ray_serve import RayServeConfig, parse_replicas, run_ray
        from moqe_compile.serving.server import model_name

        rcfg = RayServeConfig(replicas=parse_replicas(args.replicas), num_cpus=args.num_cpus, threads=args.threads,
                              max_batch=args.max_batch, max_delay_ms=args.max_delay_ms)
        run_ray(args.bundle, model_name(args.bundle, cfg), rcfg, args.host, args.port, args.ray_address,
                limits=limits_of(cfg))
        return 0
    if args.replicas:
        raise ConfigError("--replicas only applies with --ray.")
    queue = QueueConfig(args.max_batch, args.max_delay_ms, args.max_queue, args.workers)
    serve(args.bundle, cfg, queue, backend=args.backend, intra_op_threads=args.threads,
          only_expert=args.only_expert)
    return 0


if __name__ == "__main__":
    sys.exit(main())
