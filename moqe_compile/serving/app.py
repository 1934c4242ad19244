"""``create_app``: a FastAPI application speaking the Open Inference Protocol (KServe v2)
over HTTP for one MoQE bundle.

FastAPI + uvicorn rather than KServe's ``ModelServer``: the kserve package pulls in the
Kubernetes client, pandas, grpcio-tools and ~30 other pins for a five-route protocol, and
its request path would sit in front of our own batcher (the merge has to happen before
routing so groups form per expert across requests) and its error mapping. Here every
route is ours, so bad input is a 4xx naming the field and a full queue a 503 with
Retry-After, never a 500.

Inference requests go to ``Runtime.submit`` (the bounded dynamic-batching queue); the
event loop only awaits the future, and JSON/base64/image decoding runs in the thread pool
so health checks and metrics stay responsive under load.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from moqe_compile import __version__
from moqe_compile.errors import InputError, OverloadedError
from moqe_compile.tasks.image.runtime import Runtime
from moqe_compile.serving.metrics import Metrics
from moqe_compile.serving.protocol import DTYPES, OUTPUTS, ProtocolError, decode_images, encode_infer_response, parse_infer_request

VERSION = "1"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def model_metadata(rt: Runtime, name: str) -> dict:
    m = rt.manifest
    c, h, w = rt.input_shape
    routing = m["routing"]
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "moqe",
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


def create_app(rt: Runtime, name: str, max_body_bytes: int = 64 << 20, retry_after_s: int = 1,
               close_on_shutdown: bool = True) -> FastAPI:
    """The server for ``rt`` under model ``name``. With ``close_on_shutdown`` the app owns the
    runtime: at shutdown (after uvicorn has finished the in-flight requests) it drains the
    queue and releases the sessions."""
    metrics = Metrics(name, rt.expert_names)
    meta = model_metadata(rt, name)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = rt.batcher  # its worker threads start now, not on the first request
        batcher.on_batch = metrics.observe_batch
        metrics.queue_depth.labels(name).set_function(lambda: batcher.depth)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            if close_on_shutdown:
                await run_in_threadpool(rt.close)

    app = FastAPI(title="moqe-serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics

    @app.get("/v2")
    async def server_metadata():
        return {"name": "moqe-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    def _model_error(model: str, version: str | None) -> JSONResponse | None:
        if model != name:
            metrics.errors.labels(name, "not_found").inc()
            return _error(404, f"model {model!r} is not served here; this server serves {name!r}.")
        if version not in (None, VERSION):
            metrics.errors.labels(name, "not_found").inc()
            return _error(404, f"model {name!r} has no version {version!r}; it has {VERSION!r}.")
        return None

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: str | None = None):
        return _model_error(model, version) or meta

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None):
        err = _model_error(model, version)
        if err is not None:
            return err
        return JSONResponse({"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None):
        t0 = time.perf_counter()
        resp = await _infer(model, version, request)
        metrics.requests.labels(name, str(resp.status_code)).inc()
        if resp.status_code == 200:
            metrics.latency.labels(name).observe(time.perf_counter() - t0)
        return resp

    async def _infer(model: str, version: str | None, request: Request) -> Response:
        err = _model_error(model, version)
        if err is not None:
            return err
        try:
            body = await _read_body(request, max_body_bytes)
            req, x = await run_in_threadpool(_decode, body, request.headers.get("inference-header-content-length"), rt)
            fut = rt.submit(x)
        except ProtocolError as e:
            metrics.errors.labels(name, "too_large" if e.status == 413 else "bad_request").inc()
            return _error(e.status, str(e))
        except OverloadedError as e:
            metrics.errors.labels(name, "overloaded").inc()
            return _error(503, str(e), {"Retry-After": str(retry_after_s)})
        except InputError as e:
            metrics.errors.labels(name, "bad_request").inc()
            return _error(400, str(e))
        result = await asyncio.wrap_future(fut)
        out, header_len = await run_in_threadpool(encode_infer_response, name, VERSION, req, result)
        if header_len is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and not cl.isdigit():
        raise ProtocolError(f"Content-Length {cl!r} is not a byte count.")
    chunks, n = [], 0
    async for chunk in request.stream():
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
        raise ProtocolError(f"request body is {int(cl) if cl else n}{'' if cl else '+'} bytes; this server takes "
                            f"at most {limit} (--max-body-mb); send fewer samples per request.", status=413)
    return b"".join(chunks)


def _decode(body: bytes, header_length: str | None, rt: Runtime):
    try:
        req = parse_infer_request(body, header_length)
        return req, to_batch(req, rt)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, MemoryError) as e:
        # A request shape the parser did not foresee is still the client's error, not a 500.
        raise ProtocolError(f"malformed infer request ({e.__class__.__name__}: {e}).") from None


def to_batch(req, rt: Runtime) -> np.ndarray:
    """The request's tensor as the runtime's float32 [N, C, H, W] batch, or a ProtocolError
    naming what is wrong with it."""
    shape = rt.input_shape
    if req.input_name == "image":
        if not isinstance(req.tensor, list):
            raise ProtocolError("inputs[0] (image).datatype must be BYTES: the encoded image files.")
        if not req.tensor:
            raise ProtocolError("inputs[0] (image) holds no images.")
        return decode_images(req.tensor, rt.preprocess)
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


__all__ = ["create_app", "model_metadata", "OUTPUTS"]
