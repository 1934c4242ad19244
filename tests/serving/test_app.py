"""The v2 app in process (Starlette's TestClient): health while draining, server faults,
admission control, the queue-wait deadline, stalled and aborted uploads."""

import asyncio
import json
import logging
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from moqe_compile import Runtime  # noqa: E402
from moqe_compile.runtime import QueueConfig  # noqa: E402
from moqe_compile.serving.app import ServeLimits, create_app  # noqa: E402
from moqe_compile.serving.server import ServeConfig, build_server  # noqa: E402

from ..models import CROP  # noqa: E402

PATH = "/v2/models/m/infer"


def _body(seed=0, rid=None):
    x = np.random.default_rng(seed).normal(size=(1, 3, CROP, CROP)).astype(np.float32)
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if rid is not None:
        req["id"] = rid
    return json.dumps(req).encode()


@pytest.fixture
def rt(routed_bundle):
    with Runtime.load(routed_bundle, queue=QueueConfig(max_batch=4, max_delay_ms=0, max_queue=8)) as r:
        yield r


def _metric(client, needle: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(needle):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_not_ready_is_400_with_an_empty_body_once_draining_starts(rt):
    app = create_app(rt, "m", close_on_shutdown=False)
    with TestClient(app) as c:
        assert c.get("/v2/health/ready").status_code == 200
        app.state.health.drain()
        for path in ("/v2/health/ready", "/v2/models/m/ready"):
            r = c.get(path)
            assert r.status_code == 400 and r.content == b""
        assert c.get("/v2/health/live").status_code == 200


def test_sigterm_handler_turns_readiness_off_before_the_listener_closes(rt):
    import signal

    server = build_server(rt, "m", ServeConfig(port=0))
    app = server.config.app
    with TestClient(app) as c:
        server.handle_exit(signal.SIGTERM, None)
        assert c.get("/v2/health/ready").status_code == 400


def test_a_fault_after_submit_is_a_counted_500_with_a_v2_body(rt):
    def broken(x):
        raise RuntimeError("expert session died")

    rt._run_counted = broken  # what the batcher worker calls
    with TestClient(create_app(rt, "m", close_on_shutdown=False), raise_server_exceptions=False) as c:
        r = c.post(PATH, content=_body())
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
        assert _metric(c, 'moqe_requests_total{code="500"') == 1
        assert _metric(c, 'moqe_request_errors_total{model="m",reason="internal"') == 1


def test_requests_beyond_max_in_flight_get_503_with_retry_after(rt):
    gate, real_run = threading.Event(), rt._run_counted
    rt._run_counted = lambda x: (gate.wait(30), real_run(x))[1]
    app = create_app(rt, "m", ServeLimits(max_in_flight=1, retry_after_s=3), close_on_shutdown=False)
    with TestClient(app) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.post(PATH, content=_body(1, "a"))))
        t.start()
        while rt.batcher.in_flight == 0:
            threading.Event().wait(0.005)
        r = c.post(PATH, content=_body(2, "b"))
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and "--max-in-flight 1" in r.json()["error"]
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200 and first["r"].json()["id"] == "a"
        assert c.post(PATH, content=_body(3)).status_code == 200
        assert _metric(c, 'moqe_request_errors_total{model="m",reason="overloaded"') == 1


def test_default_admission_is_one_full_merged_batch_everywhere(monkeypatch):
    # Under overload an admitted request waits ~max_in_flight / throughput: the default admits
    # what one merged run of the default max_batch takes, in the app, the server and the CLI.
    from moqe_compile.cli import serve as cli_serve
    from moqe_compile.serving.server import limits_of

    seen = {}
    monkeypatch.setattr(cli_serve, "_serve", lambda args: seen.setdefault("n", args.max_in_flight) and 0)
    cli_serve.main(["some-bundle"])
    batch = QueueConfig().max_batch
    assert ServeLimits().max_in_flight == limits_of(ServeConfig()).max_in_flight == seen["n"] == batch


def test_a_request_not_started_by_the_queue_deadline_is_503_and_never_runs(rt):
    gate, real_run, ran = threading.Event(), rt._run_counted, []
    rt._run_counted = lambda x: (gate.wait(30), ran.append(len(x)), real_run(x))[2]
    app = create_app(rt, "m", ServeLimits(max_queue_wait_s=0.2), close_on_shutdown=False)
    with TestClient(app) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.post(PATH, content=_body(1))))
        t.start()
        while rt.batcher.in_flight == 0:
            threading.Event().wait(0.005)
        r = c.post(PATH, content=_body(2))  # queued behind the held run until the deadline
        assert r.status_code == 503 and "--max-queue-wait-ms" in r.json()["error"]
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200
        rt.batcher.close()
        assert ran == [1]  # the cancelled request never ran


async def _call(app, chunks, disconnect_after: bool):
    """Drive the ASGI app directly with a body sent as ``chunks`` and then nothing (or a disconnect)."""
    sent, answer = list(chunks), []

    async def receive():
        if sent:
            return {"type": "http.request", "body": sent.pop(0), "more_body": True}
        if disconnect_after:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(msg):
        answer.append(msg)

    scope = {"type": "http", "method": "POST", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
             "headers": [(b"content-length", b"100000")], "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("10.0.0.1", 1234), "root_path": "", "app": app}
    await app(scope, receive, send)
    return answer


def test_a_stalled_body_is_dropped_with_408_after_the_timeout(rt):
    app = create_app(rt, "m", ServeLimits(body_timeout_s=0.2), close_on_shutdown=False)
    with TestClient(app) as c:
        answer = asyncio.run(_call(app, [b'{"inputs": '], disconnect_after=False))
        assert answer[0]["status"] == 408 and b"stopped arriving" in answer[1]["body"]
        assert _metric(c, 'moqe_request_errors_total{model="m",reason="timeout"') == 1


def test_an_aborted_upload_is_one_log_line_not_a_traceback(rt, caplog):
    app = create_app(rt, "m", close_on_shutdown=False)
    with TestClient(app) as c, caplog.at_level(logging.INFO):
        asyncio.run(_call(app, [b'{"inputs": '], disconnect_after=True))
        assert _metric(c, 'moqe_request_errors_total{model="m",reason="client_closed"') == 1
    records = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None and records[0].levelno == logging.WARNING
    assert "11 of 100000 body bytes" in records[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _trickle(app, path=PATH):
    """Drive the ASGI app with a body that never ends: one byte every 10 ms, never a stall."""
    answer = []

    async def receive():
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(msg):
        answer.append(msg)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-length", b"1000000")], "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("10.0.0.1", 1234), "root_path": "", "app": app}
    # A guard against hanging the suite without the deadline, not a timing assertion.
    await asyncio.wait_for(app(scope, receive, send), 20)
    return answer


def test_a_trickled_body_is_408_at_the_whole_body_deadline_and_frees_its_slot(rt):
    # Each byte arrives well within body_timeout_s; the body as a whole never does.
    app = create_app(rt, "m", ServeLimits(max_in_flight=1, body_timeout_s=0.3), close_on_shutdown=False)
    with TestClient(app) as c:
        answer = asyncio.run(_trickle(app))
        assert answer[0]["status"] == 408
        assert b"did not all arrive within 0.3 s" in answer[1]["body"] and b"--body-timeout-s" in answer[1]["body"]
        assert _metric(c, 'moqe_requests_in_flight{model="m"') == 0
        assert c.post(PATH, content=_body()).status_code == 200  # the one slot is free again
        assert _metric(c, 'moqe_request_errors_total{model="m",reason="timeout"') == 1


def test_input_samples_over_max_images_are_413_before_they_run(rt):
    from moqe_compile.tasks.image.preprocess import InputLimits

    ran, real_run = [], rt._run_counted
    rt._run_counted = lambda x: (ran.append(len(x)), real_run(x))[1]
    rt.input_limits = InputLimits(max_images=2)
    x = np.zeros((3, 3, CROP, CROP), np.float32)
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    with TestClient(create_app(rt, "m", close_on_shutdown=False)) as c:
        r = c.post(PATH, content=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 413
        assert r.json()["error"].startswith("inputs[0] (input) holds 3 images; the input limit max_images=2")
        assert _metric(c, 'moqe_request_errors_total{model="m",reason="too_large"') == 1
        assert c.post(PATH, content=_body()).status_code == 200
    assert ran == [1]


def test_the_documented_max_in_flight_default_is_the_codes():
    import re
    from pathlib import Path

    docs = Path(__file__).parents[2] / "docs"
    for page in ("security.md", "serving.md"):
        rows = re.findall(r"^\|[^|\n]*\| `--max-in-flight` \| (\d+) \|", (docs / page).read_text(), re.M)
        assert rows == [str(ServeLimits().max_in_flight)], page
