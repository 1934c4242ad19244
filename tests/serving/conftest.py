import os

import pytest

from ..models import tiny_config


@pytest.fixture(scope="session")
def single_bundle(tmp_path_factory, tiny_onnx, tiny_images):
    """A tiny bundle whose gate refused routing (a threshold no paired test can pass)."""
    from moqe_compile.tasks.image.config import ControlsConfig, GateConfig
    from moqe_compile.build import build

    cfg = tiny_config(tiny_onnx, tiny_images)
    cfg.gate = GateConfig(p_value=1e-12)
    cfg.controls = ControlsConfig(copies=0)
    return build(cfg, tmp_path_factory.mktemp("bundles") / "tiny-single", quiet=True)


NAME = "tiny"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_deployment(routed_bundle):
    """The routed bundle on a local Ray Serve: router ingress (the moqe-serve app) + experts,
    2 replicas of the first expert. (handle, "host:port", expert names)."""
    serve = pytest.importorskip("ray.serve")
    import ray

    from moqe_compile import Runtime
    from moqe_compile.serving.app import ServeLimits
    from moqe_compile.serving.ray_serve import RayServeConfig, run_ray

    # Ray Serve kills an HTTP proxy that is not ready within 5 s; on a loaded 2-core CI machine
    # it can take longer, and every Ray test then errors. Ray's workers inherit this variable.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    names = Runtime.load(routed_bundle, route_only=True).expert_names
    cfg = RayServeConfig(replicas={names[0]: 2}, num_cpus=0, threads=1, max_delay_ms=5)
    handle = run_ray(str(routed_bundle), NAME, cfg, port=port, blocking=False,
                     limits=ServeLimits(max_body_bytes=1 << 20))
    yield handle, f"127.0.0.1:{port}", names
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def local_server(routed_bundle):
    """moqe-serve (uvicorn, in a thread) on the routed bundle: "host:port"."""
    pytest.importorskip("fastapi")
    from moqe_compile import Runtime
    from moqe_compile.runtime import QueueConfig
    from moqe_compile.serving.server import ServeConfig, ServerThread

    rt = Runtime.load(routed_bundle, queue=QueueConfig(max_batch=16, max_delay_ms=2, max_queue=64))
    with ServerThread(rt, NAME, ServeConfig(port=0, max_body_mb=1.0)) as url:
        yield url


@pytest.fixture(scope="session", params=["moqe-serve", "ray"])
def served(request, routed_bundle):
    """The same v2 app under moqe-serve and under the Ray Serve ingress: (url, reference runtime)."""
    from moqe_compile import Runtime

    url = (request.getfixturevalue("local_server") if request.param == "moqe-serve"
           else request.getfixturevalue("ray_deployment")[1])
    with Runtime.load(routed_bundle) as reference:
        yield url, reference
