"""Overload (503 + Retry-After, then recovery) and SIGTERM draining of moqe-serve."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")

from moqe_compile import Runtime  # noqa: E402
from moqe_compile.runtime import QueueConfig  # noqa: E402
from moqe_compile.serving.server import ServeConfig, ServerThread  # noqa: E402

from ..models import CROP  # noqa: E402


def _body(seed):
    x = np.random.default_rng(seed).normal(size=(1, 3, CROP, CROP)).astype(np.float32)
    return json.dumps({"id": str(seed), "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                                    "data": x.ravel().tolist()}]}).encode()


def _post(url, body, timeout=60):
    req = urllib.request.Request(f"http://{url}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_full_queue_answers_503_with_retry_after_then_recovers(routed_bundle):
    rt = Runtime.load(routed_bundle, queue=QueueConfig(max_batch=1, max_delay_ms=0, max_queue=1))
    gate, real_run = threading.Event(), rt._run_counted
    gate.set()

    def held_run(x):  # holds the worker so the queue fills deterministically
        gate.wait(30)
        return real_run(x)

    rt._run_counted = held_run  # what the batcher worker calls
    with ServerThread(rt, "m", ServeConfig(port=0, retry_after_s=2)) as url:
        path = f"{url}/v2/models/m/infer"
        gate.clear()
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _post(path, _body(i))))
                   for i in range(2)]
        threads[0].start()
        while rt.batcher.in_flight == 0:
            time.sleep(0.005)
        threads[1].start()
        while rt.batcher.depth == 0:
            time.sleep(0.005)
        code, out, headers = _post(path, _body(99))
        assert code == 503 and headers.get("retry-after") == "2" and "queue is full" in out["error"]
        gate.set()
        for t in threads:
            t.join(30)
        assert [results[i][0] for i in range(2)] == [200, 200]
        assert [results[i][1]["id"] for i in range(2)] == ["0", "1"]
        assert _post(path, _body(5))[0] == 200
        with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as r:
            assert 'moqe_request_errors_total{model="m",reason="overloaded",version="1"} 1.0' in r.read().decode()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests(routed_bundle):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A long batching delay keeps the requests queued when SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "moqe_compile.cli.serve", str(routed_bundle), "--port", str(port),
                             "--name", "m", "--max-delay-ms", "800", "--max-batch", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _post(f"{url}/v2/models/m/infer",
                                                                                      _body(i))))
                   for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert not results  # still waiting in the batcher
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(6))
        assert all(results[i][0] == 200 and results[i][1]["id"] == str(i) for i in range(6))
        # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
