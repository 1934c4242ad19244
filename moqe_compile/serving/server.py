"""Run the v2 server with uvicorn: in the foreground (``moqe-serve``) or on a background
thread (tests, benchmarks, services that embed it).

SIGTERM/SIGINT: readiness turns 400 at once, uvicorn stops accepting connections, lets
in-flight requests finish (up to ``graceful_s``), then the app's shutdown drains the batcher
and closes the runtime, so no accepted request is dropped.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from moqe_compile import load, task_of_bundle
from moqe_compile.errors import BackendError, BundleError, ConfigError
from moqe_compile.runtime import QueueConfig
from moqe_compile.tasks.image.runtime import Runtime


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    name: str = ""  # model name in URLs; default: the bundle directory's name
    max_body_mb: float = 64.0
    retry_after_s: int = 1
    max_in_flight: int = 32
    max_queue_wait_ms: float = 1000.0
    body_timeout_s: float = 30.0
    graceful_s: float = 30.0
    # Longer than uvicorn's 5 s default: a client that reuses a pooled connection just as the
    # server times it out sees a disconnect, not an answer (seen under overload in the bench).
    keep_alive_s: float = 75.0
    log_level: str = "warning"


# What to do about the usual reasons an address cannot be bound.
_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there: stop it or give another --port (0: any free port)",
    errno.EADDRNOTAVAIL: "that is not an address of this machine: give one of its addresses, 127.0.0.1 "
                         "(this machine only) or 0.0.0.0 (every interface)",
    errno.EACCES: "ports below 1024 need privileges: give a port from 1024 up",
}


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (the first address ``host`` resolves to), for uvicorn to
    listen on. Bound here, before the bundle loads, so a bad address fails at once as a
    ``ConfigError`` naming it (uvicorn logs the error and exits 3, our ``InputError`` code)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first for a name (as uvicorn binds one): "localhost" may resolve to ::1 first,
        # and clients of 127.0.0.1 would be refused.
        family, kind, proto, _, addr = min(found, key=lambda a: a[0] != socket.AF_INET or ":" in host)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r} is not an address or a name this machine resolves ({e}): give an "
                          f"IP address such as 127.0.0.1 or 0.0.0.0.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(addr)
        # Listening now, not when uvicorn starts: two reuse-address sockets may bind one port
        # until one listens, so a second server would pass this check and fail after loading.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = _BIND_HINTS.get(e.errno, "give another --host or --port")
        raise ConfigError(f"cannot listen on --host {host} --port {port}: {e.strerror}; {hint}.") from None
    return sock


def model_name(bundle: str | Path, cfg: ServeConfig) -> str:
    return cfg.name or Path(bundle).resolve().name


def limits_of(cfg: ServeConfig):
    from moqe_compile.serving.app import ServeLimits

    return ServeLimits(max_body_bytes=int(cfg.max_body_mb * (1 << 20)), max_in_flight=cfg.max_in_flight,
                       max_queue_wait_s=cfg.max_queue_wait_ms / 1e3, retry_after_s=cfg.retry_after_s,
                       body_timeout_s=cfg.body_timeout_s)


def build_server(rt: Runtime, name: str, cfg: ServeConfig):
    import uvicorn

    from moqe_compile.serving.app import create_app

    app = create_app(rt, name, limits_of(cfg))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Readiness turns 400 when draining starts, before the listener closes, so a load
            # balancer stops sending here while the in-flight requests finish.
            app.state.health.drain()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if sockets and self.started:  # uvicorn names the address only of sockets it bound itself
                host, port = sockets[0].getsockname()[:2]
                logging.getLogger("uvicorn.error").info("moqe-serve: serving model %r on http://%s:%d "
                                                        "(Ctrl-C to stop)", name, host, port)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=cfg.graceful_s, timeout_keep_alive=cfg.keep_alive_s,
                            access_log=False)
    return Server(config)


def check_servable(bundle: str | Path) -> None:
    """A ``BundleError`` where the bundle's task has no v2 codec (its plug-in's ``SERVING_CODEC``)."""
    task = task_of_bundle(bundle)
    if not task.SERVING_CODEC:
        raise BundleError(f"bundle {str(bundle)!r} is a {task.KIND!r} bundle: moqe-serve speaks the v2 "
                          f"protocol for image tensors only. Run it with moqe-run, or in Python with "
                          f"moqe_compile.load().")


def open_runtime(bundle: str | Path, **options) -> Runtime:
    """``moqe_compile.load(bundle, **options)`` for the v2 server (``check_servable`` first)."""
    check_servable(bundle)
    return load(bundle, **options)


def serve(bundle: str | Path, cfg: ServeConfig, queue: QueueConfig, backend: str = "auto",
          intra_op_threads: int = 0, only_expert: str | None = None) -> None:
    with bind_socket(cfg.host, cfg.port) as sock:
        rt = open_runtime(bundle, backend=backend, intra_op_threads=intra_op_threads, queue=queue,
                          only_expert=only_expert)
        build_server(rt, model_name(bundle, cfg), cfg).run(sockets=[sock])


class ServerThread:
    """``with ServerThread(rt, "name") as url:`` serves ``rt`` on a free loopback port."""

    def __init__(self, rt: Runtime, name: str, cfg: ServeConfig | None = None):
        self.rt, self.name = rt, name
        self.cfg = cfg or ServeConfig(port=0)
        self._sock = bind_socket(self.cfg.host, self.cfg.port)
        self.port = self._sock.getsockname()[1]
        self.server = build_server(rt, name, self.cfg)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BackendError(f"moqe-serve did not start on {self.url}.")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(self.cfg.graceful_s + 10)
        self._sock.close()
