"""``create_app``: a FastAPI application speaking the Open Inference Protocol (KServe v2)
over HTTP for one MoQE bundle. ``moqe-serve`` runs it under uvicorn and the Ray Serve
ingress mounts the same app (``@serve.ingress``), so both answer alike.

FastAPI + uvicorn rather than KServe's ``ModelServer``: the kserve package pulls in the
Kubernetes client, pandas, grpcio-tools and ~30 other pins for a five-route protocol, and
its request path would sit in front of our own batcher (the merge has to happen before
routing so groups form per expert across requests) and its error mapping. Here every
route is ours, so bad input is a 4xx naming the field, overload a 503 with Retry-After,
and only a server fault a 500; every infer answer carries the v2 ``{"error": ...}`` body
when it fails and is counted in ``moqe_requests_total``.

Inference requests go to ``Runtime.submit`` (the bounded dynamic-batching queue) or, under
Ray, to the ingress's batched router; the event loop only awaits the result, and
JSON/base64/image decoding runs in the thread pool so health checks and metrics stay
responsive under load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from moqe_compile import __version__
from moqe_compile.errors import InputError, OverloadedError
from moqe_compile.serving.metrics import Metrics
from moqe_compile.serving.protocol import (DTYPES, MAX_ID_CHARS, MAX_JSON_DEPTH, OUTPUTS, ProtocolError,
                                           decode_images, encode_infer_response, parse_infer_request)
from moqe_compile.tasks.image.runtime import Runtime

VERSION = "1"
# Extension value: the model is a router in front of several onnxruntime_onnx graphs, which
# no single Triton platform names (documented in docs/serving.md).
PLATFORM = "moqe_onnxruntime_onnx"
log = logging.getLogger("moqe_compile.serving")


@dataclass(frozen=True)
class ServeLimits:
    """What one server admits; every limit answers with a 4xx/503 naming it."""

    max_body_bytes: int = 64 << 20
    # Admission control: infer requests admitted at once (body read to reply); beyond it 503.
    # Under overload an admitted request waits about max_in_flight / throughput (Little's law),
    # so the default admits one full merged batch of the default max_batch (32), not more:
    # 64 doubled the admitted latency under overload without raising throughput.
    max_in_flight: int = 32
    # A request still waiting for its merged run after this long is answered 503 (0: no deadline).
    max_queue_wait_s: float = 1.0
    retry_after_s: int = 1
    # A body not all received this long after its first read is dropped with 408: a deadline for
    # the whole body, since a per-chunk one lets a client trickling a byte at a time hold its
    # admission slot forever.
    body_timeout_s: float = 30.0
    max_json_depth: int = MAX_JSON_DEPTH
    max_id_chars: int = MAX_ID_CHARS


class Rejected(Exception):
    """An infer request answered with an error: HTTP ``status``, metric ``reason``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def model_metadata(rt: Runtime, name: str) -> dict:
    m = rt.manifest
    c, h, w = rt.input_shape
    routing = m["routing"]
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
                   {"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, m["task"]["num_classes"]]},
                    {"name": "expert", "datatype": "INT32", "shape": [-1]},
                    {"name": "expert_name", "datatype": "BYTES", "shape": [-1]},
                    {"name": "router_confidence", "datatype": "FP32", "shape": [-1]}],
        # Extension fields (v2 clients ignore unknown keys): what serves the requests.
        "experts": [{"name": e["name"], "preset": e.get("recipe", {}).get("preset", ""),
                     "test_metrics": e.get("metrics", {}).get("test", {})} for e in m["experts"]],
        "routing": {"routed": rt.routed, "default_expert": rt.expert_names[rt.default_expert],
                    "granularity": routing.get("granularity", "per-input"),
                    "gate": (m.get("router") or {}).get("gate")},
    }


class Health:
    """Ready once the runtime is up, not ready from the moment draining starts (SIGTERM)."""

    def __init__(self):
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining

    def drain(self) -> None:
        self.draining = True


def _health_answer(ok: bool, body: dict) -> Response:
    # Not ready: 400 with an empty body, as Triton answers (the v2 spec asks for a 4xx).
    return JSONResponse(body) if ok else Response(status_code=400)


Infer = Callable[[np.ndarray], Awaitable]


def create_app(rt: Runtime, name: str, limits: ServeLimits | None = None, close_on_shutdown: bool = True,
               infer: Infer | None = None) -> FastAPI:
    """The server for ``rt`` under model ``name``.

    ``infer`` (Ray Serve's ingress) runs a checked batch and returns its ``RunResult``;
    without it requests go to ``rt.submit``, and with ``close_on_shutdown`` the app owns the
    runtime: at shutdown (after uvicorn has finished the in-flight requests) it drains the
    queue and releases the sessions."""
    limits = limits or ServeLimits()
    metrics = Metrics(name, VERSION, rt.expert_names)
    meta = model_metadata(rt, name)
    health = Health()
    admitted = [0]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if infer is None:
            batcher = rt.batcher  # its worker threads start now, not on the first request
            batcher.on_batch = metrics.observe_batch
            metrics.queue_depth.labels(name, VERSION).set_function(lambda: batcher.depth)
        health.started = True
        try:
            yield
        finally:
            health.drain()
            if close_on_shutdown and infer is None:
                await run_in_threadpool(rt.close)

    app = FastAPI(title="moqe-serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.health = health
    metrics.in_flight.labels(name, VERSION).set_function(lambda: admitted[0])
    _install_error_handlers(app)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "moqe-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return _health_answer(health.ready, {"ready": True})

    def _check_model(model: str, version: str | None) -> None:
        if model != name:
            raise Rejected(404, "not_found", f"model {model!r} is not served here; this server serves {name!r}.")
        if version not in (None, VERSION):
            raise Rejected(404, "not_found", f"model {name!r} has no version {version!r}; it has {VERSION!r}.")

    def _rejected(e: Rejected) -> JSONResponse:
        metrics.failed(e.reason)
        return _error(e.status, str(e), e.headers)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: str | None = None):
        try:
            _check_model(model, version)
        except Rejected as e:
            return _rejected(e)
        return meta

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None):
        try:
            _check_model(model, version)
        except Rejected as e:
            return _rejected(e)
        return _health_answer(health.ready, {"name": name, "ready": True})

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_route(model: str, request: Request, version: str | None = None):
        t0 = time.perf_counter()
        try:
            resp = await _admit(model, version, request)
        except Rejected as e:
            resp = _rejected(e)
        except Exception as e:  # noqa: BLE001 - a server fault: still a v2 body and a metric
            log.exception("infer request failed")
            metrics.failed("internal")
            resp = _error(500, f"internal server error ({e.__class__.__name__}); the server log has the details.")
        metrics.answered(resp.status_code)
        if resp.status_code == 200:
            metrics.latency.labels(name, VERSION).observe(time.perf_counter() - t0)
        return resp

    async def _admit(model: str, version: str | None, request: Request) -> Response:
        _check_model(model, version)
        if admitted[0] >= limits.max_in_flight:
            # The body is still read (and dropped): most clients report a broken pipe, not
            # the 503, when the server answers mid-upload.
            await _discard_body(request, limits)
            raise Rejected(503, "overloaded", f"{admitted[0]} requests in flight (--max-in-flight "
                           f"{limits.max_in_flight}); retry later.", {"Retry-After": str(limits.retry_after_s)})
        admitted[0] += 1
        try:
            return await _infer(request)
        finally:
            admitted[0] -= 1

    async def _infer(request: Request) -> Response:
        body = await _read_body(request, limits)
        req, x = await run_in_threadpool(_decode, body, request.headers.get("inference-header-content-length"),
                                         rt, limits.max_id_chars)
        try:
            result = await (_run_remote(x) if infer is not None else _run_local(x))
        except OverloadedError as e:
            raise Rejected(503, "overloaded", str(e), {"Retry-After": str(limits.retry_after_s)}) from None
        except InputError as e:
            raise Rejected(400, "bad_request", str(e)) from None
        out, header_len = await run_in_threadpool(encode_infer_response, name, VERSION, req, result)
        if header_len is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    async def _run_local(x: np.ndarray):
        t0 = time.perf_counter()
        fut = rt.submit(x)
        result = await _await_with_deadline(fut, limits.max_queue_wait_s)
        run_s = result.timing_ms.get("total", 0.0) / 1e3
        metrics.queue_wait.labels(name, VERSION).observe(max(0.0, time.perf_counter() - t0 - run_s))
        return result

    async def _run_remote(x: np.ndarray):
        t0 = time.perf_counter()
        result = await infer(rt.check(x))
        run_s = result.timing_ms.get("total", 0.0) / 1e3
        metrics.queue_wait.labels(name, VERSION).observe(max(0.0, time.perf_counter() - t0 - run_s))
        return result

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _await_with_deadline(fut: concurrent.futures.Future, deadline_s: float):
    """The result of a batcher future. One still queued after ``deadline_s`` is cancelled
    (the batcher skips cancelled requests) and answered 503; one already running is awaited."""
    wrapped = asyncio.wrap_future(fut)
    if deadline_s <= 0:
        return await wrapped
    try:
        return await asyncio.wait_for(asyncio.shield(wrapped), deadline_s)
    except asyncio.TimeoutError:
        if fut.cancel():
            raise OverloadedError(f"the request waited {deadline_s:g} s in the queue without starting "
                                  f"(--max-queue-wait-ms); retry later.") from None
        return await wrapped


def _install_error_handlers(app: FastAPI) -> None:
    """Routes the app does not have, methods it does not take and anything unforeseen answer
    with the v2 ``{"error": ...}`` body too."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(400, f"{request.method} {request.url.path}: {exc.errors()}")

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception):
        app.state.metrics.failed("internal")
        return _error(500, f"internal server error ({exc.__class__.__name__}); the server log has the details.")


async def _next_chunk(stream, deadline: float) -> bytes | None:
    """The next chunk, or None at the end; ``asyncio.TimeoutError`` once the loop's clock
    passes ``deadline``."""
    try:
        return await asyncio.wait_for(anext(stream), deadline - asyncio.get_running_loop().time())
    except StopAsyncIteration:
        return None


async def _chunks(request: Request, limits: ServeLimits):
    """The body's chunks, all within ``body_timeout_s`` of the first read; a client that hangs
    up mid-body is logged as one line (it is gone, nobody reads the answer)."""
    stream, n = request.stream(), 0
    deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
    try:
        while (chunk := await _next_chunk(stream, deadline)) is not None:
            n += len(chunk)
            yield chunk
    except asyncio.TimeoutError:
        raise Rejected(408, "timeout", f"the request body did not all arrive within {limits.body_timeout_s:g} s "
                       f"({n} bytes came; --body-timeout-s): it stopped arriving or came too slowly; send it "
                       f"again, or in smaller requests.") from None
    except ClientDisconnect:
        log.warning("client %s closed the connection after %d of %s body bytes; request dropped.",
                    request.client.host if request.client else "?", n,
                    request.headers.get("content-length", "unknown"))
        raise Rejected(499, "client_closed", "the client closed the connection before the body arrived.") from None


async def _discard_body(request: Request, limits: ServeLimits) -> None:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limits.max_body_bytes:
        return
    n = 0
    async for chunk in _chunks(request, limits):
        n += len(chunk)
        if n > limits.max_body_bytes:
            return


async def _read_body(request: Request, limits: ServeLimits) -> bytes:
    limit = limits.max_body_bytes
    cl = request.headers.get("content-length")
    if cl is not None and not cl.isdigit():
        raise Rejected(400, "bad_request", f"Content-Length {cl!r} is not a byte count.")
    chunks, n = [], 0
    async for chunk in _chunks(request, limits):
        n += len(chunk)
        if n > limit:
            # Read (and drop) a moderately oversized body before answering: a server that
            # answers mid-upload and closes makes most clients report a broken pipe instead
            # of the 413. Far larger bodies are cut off at once.
            if n > 2 * limit + (1 << 20) or (cl is not None and int(cl) > 2 * limit + (1 << 20)):
                break
            chunks = []
            continue
        chunks.append(chunk)
    if n > limit:
        raise Rejected(413, "too_large", f"request body is {int(cl) if cl else n}{'' if cl else '+'} bytes; this "
                       f"server takes at most {limit} (--max-body-mb); send fewer samples per request.")
    return b"".join(chunks)


def _decode(body: bytes, header_length: str | None, rt: Runtime, max_id_chars: int):
    try:
        req = parse_infer_request(body, header_length, max_id_chars, _input_limits(rt))
        return req, to_batch(req, rt)
    except ProtocolError as e:
        raise Rejected(e.status, "too_large" if e.status == 413 else "bad_request", str(e)) from None
    except InputError as e:
        raise Rejected(_input_status(str(e)), "bad_request", str(e)) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, MemoryError,
            RecursionError) as e:
        # A request shape the parser did not foresee is still the client's error, not a 500.
        raise Rejected(400, "bad_request", f"malformed infer request ({e.__class__.__name__}: {e}).") from None


def _input_limits(rt: Runtime):
    # None (the defaults) for a runtime without its own limits
    return getattr(rt, "input_limits", None)


def _input_status(message: str) -> int:
    """413 for an input over a size limit (pixels, images per request), else 400."""
    return 413 if "limit" in message.lower() else 400


def to_batch(req, rt: Runtime) -> np.ndarray:
    """The request's tensor as the runtime's float32 [N, C, H, W] batch, or a ProtocolError
    naming what is wrong with it."""
    shape = rt.input_shape
    if req.input_name == "image":
        if not isinstance(req.tensor, list):
            raise ProtocolError("inputs[0] (image).datatype must be BYTES: the encoded image files.")
        if not req.tensor:
            raise ProtocolError("inputs[0] (image) holds no images.")
        return _decode_images(req.tensor, rt)
    x = req.tensor
    if isinstance(x, list):
        raise ProtocolError("inputs[0] (input).datatype BYTES: this input takes FP32 preprocessed pixels; "
                            "send encoded files as the 'image' input instead.")
    if x.dtype != np.float32:
        dt = next(k for k, v in DTYPES.items() if v == x.dtype)
        raise ProtocolError(f"inputs[0] (input).datatype {dt}: this model takes FP32.")
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise ProtocolError(f"inputs[0] (input).shape {list(x.shape)}: this model takes "
                            f"[N, {shape[0]}, {shape[1]}, {shape[2]}].")
    if len(x) == 0:
        raise ProtocolError("inputs[0] (input).shape has batch 0: send at least one sample.")
    return np.ascontiguousarray(x)


def _decode_images(items: list[bytes], rt: Runtime) -> np.ndarray:
    from PIL import Image

    try:
        return decode_images(items, rt.preprocess, _input_limits(rt))
    except Image.DecompressionBombError as e:
        # Pillow's own pixel limit (MAX_IMAGE_PIXELS): the client sent too large an image.
        raise ProtocolError(f"inputs[0] (image): {e} Send smaller images.", status=413) from None


__all__ = ["create_app", "model_metadata", "ServeLimits", "Health", "OUTPUTS"]
