"""Load test of moqe-serve over loopback: the MoQE server vs the same server holding one
expert only, at 1, 8 and 32 concurrent closed-loop clients, then a bounded overload run.

    python bench/serve_load.py bundles/mobilenetv2-demo --seconds 10 --rounds 3 \\
        --json bench/results/epyc-2core/serve-default-router.json

Both servers run at once as separate ``moqe-serve`` processes with the same batching
settings; the load alternates between them round by round (A/B interleaved, so drift in
machine load hits both) and the table gives medians over rounds. Each request is one
preprocessed image sent as a binary FP32 tensor (the binary tensor extension
``tritonclient`` uses, ~600 KB a request), or with ``--payload image`` as one JPEG file in the
``image`` BYTES input (~10-30 KB; the server decodes and preprocesses it). The client runs in this process with aiohttp on the same cores
as the server, as a co-located client would.

Overload: an open-loop client sends at ``--overload-factor`` x the MoQE server's measured
32-client throughput for ``--overload-seconds``, every request with a unique id; it
checks that each request got exactly one answer (200 with its own id, or 503), that the
server stayed up, and that a following run at half the sustainable rate is all 200s. The
admitted requests' p99 is compared with the closed-loop p99 at the largest client count
(the server's admission control, ``--max-in-flight`` and ``--max-queue-wait-ms``, bounds it). ``--overload-seconds 0``
leaves the overload run out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, name: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "moqe_compile.cli.serve", bundle, "--port", str(port), "--name", name, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {name} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server {name} did not become ready")


def tensor_payload(x: np.ndarray) -> tuple[bytes, dict]:
    """One preprocessed sample as the binary FP32 ``input`` tensor: (raw bytes, input spec)."""
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    return raw, {"name": "input", "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": len(raw)}}


def image_payload(pixels: np.ndarray, quality: int = 90) -> tuple[bytes, dict]:
    """One uint8 CHW image as a JPEG file in the ``image`` BYTES input (4-byte length + bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buf, "JPEG", quality=quality)
    raw = struct.pack("<I", buf.tell()) + buf.getvalue()
    return raw, {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}


def request_body(payload: tuple[bytes, dict], rid: str) -> tuple[bytes, dict]:
    raw, spec = payload
    head = json.dumps({"id": rid, "inputs": [spec], "outputs": [{"name": "expert"}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def metric_sums(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, val = line.rsplit(" ", 1)
        base = key.split("{")[0]
        out[base] = out.get(base, 0.0) + float(val)
        out[key] = float(val)
    return out


async def closed_loop(url: str, name: str, samples: list, clients: int, seconds: float) -> dict:
    import aiohttp

    lat, codes = [], {}
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def client(j: int):
            i = j
            while time.perf_counter() < stop:
                body, headers = request_body(samples[i % len(samples)], f"{j}-{i}")
                t0 = time.perf_counter()
                async with s.post(f"{url}/v2/models/{name}/infer", data=body, headers=headers) as r:
                    await r.read()
                    codes[r.status] = codes.get(r.status, 0) + 1
                lat.append(time.perf_counter() - t0)
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*[client(j) for j in range(clients)])
        wall = time.perf_counter() - t0
    lat_ms = np.asarray(lat) * 1e3
    return {"requests": len(lat), "throughput_rps": len(lat) / wall, "p50_ms": float(np.percentile(lat_ms, 50)),
            "p99_ms": float(np.percentile(lat_ms, 99)), "codes": {str(k): v for k, v in codes.items()},
            "errors": sum(v for k, v in codes.items() if k != 200)}


def hist_delta(before: dict, after: dict, name: str) -> dict:
    """Count, mean and bucket-bound p50/p99 (seconds) of what histogram ``name`` observed between
    two ``metric_sums`` snapshots (the upper bound of the bucket each quantile falls in)."""
    buckets = []
    for key, v in after.items():
        if key.startswith(f"{name}_bucket{{") and 'le="' in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), v - before.get(key, 0.0)))
    buckets.sort()
    n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)

    def q(p: float) -> float | None:
        return next((le for le, c in buckets if n and c >= p * n), None)

    return {"count": int(n), "mean_s": total / n if n else None, "p50_le_s": q(0.5), "p99_le_s": q(0.99)}


async def _sample_gauges(url: str, stop: asyncio.Event, every_s: float = 0.5) -> dict:
    """Max and mean of the server's in-flight and queue-depth gauges while ``stop`` is unset."""
    import aiohttp

    seen: dict[str, list[float]] = {"moqe_requests_in_flight": [], "moqe_queue_depth": []}
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                async with s.get(f"{url}/metrics") as r:
                    text = await r.text()
                for line in text.splitlines():
                    base = line.split("{")[0].split(" ")[0]
                    if base in seen:
                        seen[base].append(float(line.rsplit(" ", 1)[1]))
            except aiohttp.ClientError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
    return {k: {"max": max(v) if v else None, "mean": float(np.mean(v)) if v else None, "samples": len(v)}
            for k, v in seen.items()}


def _pct(ms: list[float]) -> tuple[float | None, float | None]:
    if not ms:
        return None, None
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def open_loop(url: str, name: str, samples: list, rate: float, seconds: float,
                    connections: int = 256) -> dict:
    """Send at ``rate`` req/s regardless of answers; every request id must come back exactly once.
    ``connections`` bounds the client's connection pool, as a real client's is (requests beyond
    it wait in the client). Latency of an admitted request is counted twice: from its scheduled
    send time (``ok_*``: what a user sees; a sender that falls behind does not hide the delay)
    and from when its headers were written to a connection (``ok_sent_*``: server + network)."""
    import aiohttp

    sent, answers, lat, lat_sent, refused = [], {}, [], [], []
    by_window: dict[int, list[float]] = {}  # scheduled-time latencies per window: transient or steady?
    window_s = 5.0
    other: list[str] = []

    async def headers_sent(session, ctx, params):
        ctx.trace_request_ctx["sent"] = time.perf_counter()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    conn = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    stop = asyncio.Event()
    gauges = asyncio.create_task(_sample_gauges(url, stop))
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, trace_configs=[trace]) as s:
        async def one(rid: str, payload, t_sched: float):
            body, headers = request_body(payload, rid)
            ctx: dict = {}
            try:
                async with s.post(f"{url}/v2/models/{name}/infer", data=body, headers=headers,
                                  trace_request_ctx=ctx) as r:
                    data = await r.read()
                    status = r.status
            except aiohttp.ClientError as e:
                other.append(f"{rid}: {e.__class__.__name__}")
                return
            t1 = time.perf_counter()
            if status == 200:
                hl = int(r.headers.get("Inference-Header-Content-Length", len(data)))
                got = json.loads(data[:hl]).get("id")
                answers.setdefault(rid, []).append(("200", got))
                lat.append((t1 - t_sched) * 1e3)
                by_window.setdefault(int((t_sched - t_start) // window_s), []).append((t1 - t_sched) * 1e3)
                lat_sent.append((t1 - ctx.get("sent", t_sched)) * 1e3)
            else:
                answers.setdefault(rid, []).append((str(status), r.headers.get("Retry-After")))
                refused.append((t1 - ctx.get("sent", t_sched)) * 1e3)

        tasks = []
        t_start = time.perf_counter()  # read by one() for its window
        n = int(rate * seconds)
        for i in range(n):
            target = t_start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rid = f"o{i}"
            sent.append(rid)
            tasks.append(asyncio.create_task(one(rid, samples[i % len(samples)], target)))
        send_wall = time.perf_counter() - t_start
        await asyncio.gather(*tasks)
        drain_wall = time.perf_counter() - t_start
    stop.set()
    codes: dict[str, int] = {}
    for v in answers.values():
        for c, _ in v:
            codes[c] = codes.get(c, 0) + 1
    lost = [r for r in sent if r not in answers]
    dup = [r for r, v in answers.items() if len(v) > 1]
    wrong = [r for r, v in answers.items() if v[0][0] == "200" and v[0][1] != r]
    no_retry_after = [r for r, v in answers.items() if v[0][0] == "503" and not v[0][1]]
    (p50, p99), (s50, s99), (r50, r99) = _pct(lat), _pct(lat_sent), _pct(refused)
    return {"rate_rps": rate, "seconds": seconds, "sent": len(sent), "achieved_send_rps": len(sent) / send_wall,
            "all_answered_after_s": drain_wall,
            "codes": codes, "lost": len(lost) + len(other), "duplicated": len(dup), "wrong_id": len(wrong),
            "503_without_retry_after": len(no_retry_after), "transport_errors": other[:5],
            "ok_p50_ms": p50, "ok_p99_ms": p99, "ok_sent_p50_ms": s50, "ok_sent_p99_ms": s99,
            "refused_sent_p50_ms": r50, "refused_sent_p99_ms": r99,
            "ok_p99_ms_per_5s_window": [_pct(by_window[k])[1] for k in sorted(by_window)],
            "server_gauges": await gauges}


def overload_run(args, servers: dict, samples, results: dict) -> None:
    """Open-loop overload of the MoQE server at ``--overload-factor`` x its largest closed-loop
    throughput, then 10 s at half the sustainable rate (recovery)."""
    top = str(max(args.clients))
    sustainable = results["closed_loop"][top]["median"]["moqe"]["throughput_rps"]
    _, url = servers["moqe"]
    before = metric_sums(url)
    over = asyncio.run(open_loop(url, "moqe", samples, args.overload_factor * sustainable, args.overload_seconds))
    after = metric_sums(url)
    over["server_histograms"] = {h: hist_delta(before, after, h)
                                 for h in ("moqe_queue_wait_seconds", "moqe_request_latency_seconds")}
    alive = metric_sums(url) is not None
    recover = asyncio.run(open_loop(url, "moqe", samples, 0.5 * sustainable, 10.0))
    closed_p99 = results["closed_loop"][top]["median"]["moqe"]["p99_ms"]
    results["overload"] = {"sustainable_rps": sustainable, "overload": over, "server_alive_after": alive,
                           "recovery_half_rate": recover,
                           "server_process_alive": servers["moqe"][0].poll() is None,
                           "closed_loop_p99_ms": closed_p99,
                           "admitted_p99_over_closed_loop_p99": over["ok_p99_ms"] / closed_p99,
                           "admitted_sent_p99_over_closed_loop_p99": over["ok_sent_p99_ms"] / closed_p99}
    print("overload:", json.dumps(over), "\nrecovery:", json.dumps(recover), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-in-flight", type=int, default=32, help="moqe-serve admission control (its default)")
    ap.add_argument("--max-queue-wait-ms", type=float, default=1000.0, help="moqe-serve queue-wait deadline")
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--overload-seconds", type=float, default=30.0)
    ap.add_argument("--samples", type=int, default=64, help="distinct test inputs cycled through")
    ap.add_argument("--payload", choices=("tensor", "image"), default="tensor",
                    help="each request as a binary FP32 'input' tensor (~600 KB at 224x224) or as a "
                         "JPEG file (quality 90) in the 'image' BYTES input (~10-30 KB)")
    add_json_option(ap)
    args = ap.parse_args()

    from moqe_compile import Runtime

    with Runtime.load(args.bundle, verify=True) as rt:
        single = rt.expert_names[rt.default_expert]
        shape = rt.input_shape
        routed = rt.routed
    samples = _payloads(args.bundle, shape, args.samples, args.payload)
    batching = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
                "--max-queue", str(args.max_queue), "--max-in-flight", str(args.max_in_flight),
                "--max-queue-wait-ms", str(args.max_queue_wait_ms)]
    servers = {"moqe": start_server(args.bundle, "moqe", batching),
               "single": start_server(args.bundle, "single", [*batching, "--only-expert", single])}
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    results: dict = {"bundle": args.bundle, "routed": routed, "single_expert": single, "settings": settings,
                     "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
                     "payload": {"kind": args.payload, "mean_body_bytes": float(np.mean([len(r) for r, _ in samples]))},
                     "closed_loop": {}}
    try:
        for c in args.clients:
            rounds = {"moqe": [], "single": []}
            for r in range(args.rounds):
                order = ("moqe", "single") if r % 2 == 0 else ("single", "moqe")
                for which in order:
                    _, url = servers[which]
                    before = metric_sums(url)
                    res = asyncio.run(closed_loop(url, which, samples, c, args.seconds))
                    after = metric_sums(url)
                    run_s = after.get("moqe_run_seconds_total", 0) - before.get("moqe_run_seconds_total", 0)
                    router_s = after.get("moqe_router_seconds_total", 0) - before.get("moqe_router_seconds_total", 0)
                    batches = (after.get("moqe_batch_size_count", 0) - before.get("moqe_batch_size_count", 0))
                    bsum = after.get("moqe_batch_size_sum", 0) - before.get("moqe_batch_size_sum", 0)
                    res["routing_share_of_run_time"] = router_s / run_s if run_s else 0.0
                    res["mean_merged_batch"] = bsum / batches if batches else 0.0
                    rounds[which].append(res)
                    print(f"clients {c:3d} round {r} {which:6s}: {res['throughput_rps']:7.1f} req/s  "
                          f"p50 {res['p50_ms']:7.2f}  p99 {res['p99_ms']:7.2f} ms  errors {res['errors']}  "
                          f"routing {res['routing_share_of_run_time']:.1%}  batch {res['mean_merged_batch']:.1f}",
                          flush=True)
            med = {w: {k: float(np.median([x[k] for x in v])) for k in
                       ("throughput_rps", "p50_ms", "p99_ms", "routing_share_of_run_time", "mean_merged_batch")}
                   for w, v in rounds.items()}
            for w in med:
                med[w]["errors"] = int(sum(x["errors"] for x in rounds[w]))
            ratios = {"throughput_moqe_over_single": [a["throughput_rps"] / b["throughput_rps"]
                                                      for a, b in zip(rounds["moqe"], rounds["single"])],
                      "p99_moqe_over_single": [a["p99_ms"] / b["p99_ms"] for a, b in zip(rounds["moqe"], rounds["single"])]}
            med["ratios_median"] = {k: float(np.median(v)) for k, v in ratios.items()}
            results["closed_loop"][str(c)] = {"median": med, "rounds": rounds, "ratios": ratios}
            print(f"clients {c:3d} median: throughput ratio {med['ratios_median']['throughput_moqe_over_single']:.3f}"
                  f"  p99 ratio {med['ratios_median']['p99_moqe_over_single']:.3f}", flush=True)

        # Overload on the MoQE server, at a multiple of its measured 32-client throughput.
        if args.overload_seconds > 0:
            overload_run(args, servers, samples, results)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    write_json(args.json, results)
    return 0


def _payloads(bundle: str, shape: tuple, n: int, kind: str) -> list[tuple[bytes, dict]]:
    """``n`` request payloads (cycled) from the bundle's own test split (report/eval_data.npz):
    FP32 tensors, or JPEG files of its stored uint8 pixels."""
    if kind == "tensor":
        return [tensor_payload(x[None]) for x in _test_inputs(bundle, shape, n)]
    return [image_payload(p) for p in _test_pixels(bundle, shape, n)]


def _cycle(x: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([x] * int(np.ceil(n / len(x))))[:n])


def _test_inputs(bundle: str, shape: tuple, n: int) -> np.ndarray:
    """The bundle's own test-split inputs (report/eval_data.npz), cycled to ``n``."""
    from moqe_compile.tasks.image.eval import load_eval_data

    p = Path(bundle) / "report" / "eval_data.npz"
    if p.is_file():
        x, _, _ = load_eval_data(p, "test")
    else:  # a bundle without stored inputs: random inputs of the right shape
        x = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    return _cycle(x.astype(np.float32), n)


def _test_pixels(bundle: str, shape: tuple, n: int) -> np.ndarray:
    """The test split's uint8 CHW pixels as stored (before scaling), cycled to ``n``; random
    pixels for a bundle that stores none (or stores float inputs that no pixels reproduce)."""
    p = Path(bundle) / "report" / "eval_data.npz"
    pix = None
    if p.is_file():
        with np.load(p, allow_pickle=False) as z:
            pix = z["test_pixels"] if "test_pixels" in z else None
    if pix is None:
        pix = np.random.default_rng(0).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return _cycle(pix.astype(np.uint8), n)


if __name__ == "__main__":
    sys.exit(main())
