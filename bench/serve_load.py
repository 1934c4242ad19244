"""Load test of moqe-serve over loopback: the MoQE server vs the same server holding one
expert only, at 1, 8 and 32 concurrent closed-loop clients, then a bounded overload run.

    python bench/serve_load.py bundles/mobilenetv2-demo --seconds 10 --rounds 3 \\
        --json bench/results/epyc-2core/serve-default-router.json

Both servers run at once as separate ``moqe-serve`` processes with the same batching
settings; the load alternates between them round by round (A/B interleaved, so drift in
machine load hits both) and the table gives medians over rounds. Each request is one
preprocessed image sent as a binary FP32 tensor (the binary tensor extension
``tritonclient`` uses). The client runs in this process with aiohttp on the same cores
as the server, as a co-located client would.

Overload: an open-loop client sends at ``--overload-factor`` x the MoQE server's measured
32-client throughput for ``--overload-seconds``, every request with a unique id; it
checks that each request got exactly one answer (200 with its own id, or 503), that the
server stayed up, and that a following run at half the sustainable rate is all 200s. The
admitted requests' p99 is compared with the closed-loop p99 at the largest client count
(the server's admission control, ``--max-in-flight`` and ``--max-queue-wait-ms``, bounds it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
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


def request_body(x: np.ndarray, rid: str) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    head = json.dumps({"id": rid, "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                              "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "expert"}]}).encode()
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


async def closed_loop(url: str, name: str, samples: np.ndarray, clients: int, seconds: float) -> dict:
    import aiohttp

    lat, codes = [], {}
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def client(j: int):
            i = j
            while time.perf_counter() < stop:
                body, headers = request_body(samples[i % len(samples)][None], f"{j}-{i}")
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


async def open_loop(url: str, name: str, samples: np.ndarray, rate: float, seconds: float,
                    connections: int = 256) -> dict:
    """Send at ``rate`` req/s regardless of answers; every request id must come back exactly once.
    ``connections`` bounds the client's connection pool, as a real client's is (requests beyond
    it wait in the client, and their latency counts from the scheduled send time)."""
    import aiohttp

    sent, answers, lat = [], {}, []
    other: list[str] = []
    conn = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        async def one(rid: str, x: np.ndarray):
            body, headers = request_body(x, rid)
            t0 = time.perf_counter()
            try:
                async with s.post(f"{url}/v2/models/{name}/infer", data=body, headers=headers) as r:
                    data = await r.read()
                    status = r.status
            except aiohttp.ClientError as e:
                other.append(f"{rid}: {e.__class__.__name__}")
                return
            if status == 200:
                hl = int(r.headers.get("Inference-Header-Content-Length", len(data)))
                got = json.loads(data[:hl]).get("id")
                answers.setdefault(rid, []).append(("200", got))
                lat.append(time.perf_counter() - t0)
            else:
                answers.setdefault(rid, []).append((str(status), r.headers.get("Retry-After")))

        tasks = []
        t_start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            target = t_start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rid = f"o{i}"
            sent.append(rid)
            tasks.append(asyncio.create_task(one(rid, samples[i % len(samples)][None])))
        send_wall = time.perf_counter() - t_start
        await asyncio.gather(*tasks)
    codes: dict[str, int] = {}
    for v in answers.values():
        for c, _ in v:
            codes[c] = codes.get(c, 0) + 1
    lost = [r for r in sent if r not in answers]
    dup = [r for r, v in answers.items() if len(v) > 1]
    wrong = [r for r, v in answers.items() if v[0][0] == "200" and v[0][1] != r]
    no_retry_after = [r for r, v in answers.items() if v[0][0] == "503" and not v[0][1]]
    lat_ms = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {"rate_rps": rate, "seconds": seconds, "sent": len(sent), "achieved_send_rps": len(sent) / send_wall,
            "codes": codes, "lost": len(lost) + len(other), "duplicated": len(dup), "wrong_id": len(wrong),
            "503_without_retry_after": len(no_retry_after), "transport_errors": other[:5],
            "ok_p50_ms": float(np.percentile(lat_ms, 50)), "ok_p99_ms": float(np.percentile(lat_ms, 99))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-in-flight", type=int, default=64, help="moqe-serve admission control (its default)")
    ap.add_argument("--max-queue-wait-ms", type=float, default=1000.0, help="moqe-serve queue-wait deadline")
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--overload-seconds", type=float, default=30.0)
    ap.add_argument("--samples", type=int, default=64, help="distinct test inputs cycled through")
    add_json_option(ap)
    args = ap.parse_args()

    from moqe_compile import Runtime

    with Runtime.load(args.bundle, verify=True) as rt:
        single = rt.expert_names[rt.default_expert]
        shape = rt.input_shape
        routed = rt.routed
    samples = _test_inputs(args.bundle, shape, args.samples)
    batching = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
                "--max-queue", str(args.max_queue), "--max-in-flight", str(args.max_in_flight),
                "--max-queue-wait-ms", str(args.max_queue_wait_ms)]
    servers = {"moqe": start_server(args.bundle, "moqe", batching),
               "single": start_server(args.bundle, "single", [*batching, "--only-expert", single])}
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    results: dict = {"bundle": args.bundle, "routed": routed, "single_expert": single, "settings": settings,
                     "machine": {"cpus": os.cpu_count()}, "closed_loop": {}}
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
        top = str(max(args.clients))
        sustainable = results["closed_loop"][top]["median"]["moqe"]["throughput_rps"]
        _, url = servers["moqe"]
        over = asyncio.run(open_loop(url, "moqe", samples, args.overload_factor * sustainable, args.overload_seconds))
        alive = metric_sums(url) is not None
        recover = asyncio.run(open_loop(url, "moqe", samples, 0.5 * sustainable, 10.0))
        closed_p99 = results["closed_loop"][top]["median"]["moqe"]["p99_ms"]
        results["overload"] = {"sustainable_rps": sustainable, "overload": over, "server_alive_after": alive,
                               "recovery_half_rate": recover,
                               "server_process_alive": servers["moqe"][0].poll() is None,
                               "closed_loop_p99_ms": closed_p99,
                               "admitted_p99_over_closed_loop_p99": over["ok_p99_ms"] / closed_p99}
        print("overload:", json.dumps(over), "\nrecovery:", json.dumps(recover), flush=True)
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


def _test_inputs(bundle: str, shape: tuple, n: int) -> np.ndarray:
    """The bundle's own test-split inputs (report/eval_data.npz), cycled to ``n``."""
    from moqe_compile.tasks.image.eval import load_eval_data

    p = Path(bundle) / "report" / "eval_data.npz"
    if p.is_file():
        x, _, _ = load_eval_data(p, "test")
    else:  # a bundle without stored inputs: random inputs of the right shape
        x = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    reps = int(np.ceil(n / len(x)))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n], np.float32)


if __name__ == "__main__":
    sys.exit(main())
