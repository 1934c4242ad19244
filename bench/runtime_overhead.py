"""What ``Runtime.run`` costs over the bare expert session, before and after the dispatch
changes, side by side in one process (ONNX Runtime CPU).

    python bench/runtime_overhead.py bundles/mobilenetv2-demo --batches 1 32 --repeats 40 [--json PATH]

Candidates, interleaved round by round on the same real photos (``evaluate/latency.py``):

- ``bare``: the default expert's ONNX Runtime session, called directly (the floor);
- ``run_expert``: ``Runtime.run_expert`` (the input check, then the session);
- ``gated:after``: ``Runtime.run`` on the bundle as built, gated to its default expert when the
  gate refused routing: one expert session, the batch passed as it is, one-pass finiteness check;
- ``gated:before``: the same sessions through the dispatch as it was (every expert's session
  opened, finiteness by min and max, the batch gathered into a new array for its expert and
  the outputs scattered back), reproduced in :func:`dispatch_before` so both run in one process;
- ``routed:after`` / ``routed:before`` (``--routed``): the bundle with routing switched on in
  memory (its router file, the one the gate judged), the same two dispatches;
- ``gated:unchecked``: ``gated:after`` without the input check (shape, dtype, finiteness), so
  the difference is what refusing NaN/inf inputs costs;
- ``router``: the router session alone, at the thread count the Runtime picks for that batch.

Ratios are medians over ``--repeats`` rounds divided by the ``bare`` median; also the
least-disturbed round (min / min) and the median process CPU time per call (all threads),
which a busy machine disturbs least. ``--profile``
also runs ``gated:before`` and ``gated:after`` under pyinstrument at batch 1 and prints where
the time goes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moqe_compile import Runtime
from moqe_compile.bundle import read_bundle
from moqe_compile.evaluate.latency import summarize, tile_batch
from moqe_compile.runtime.base import timing
from moqe_compile.runtime.dispatch import group_by_expert, scatter
from moqe_compile.tasks.image.data import foolbox_dir
from moqe_compile.tasks.image.runtime import RunResult

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def check_before(batch: np.ndarray) -> np.ndarray:
    """The input check as it was: two passes (min, max) for finiteness, then the contiguity copy check."""
    if not (np.isfinite(batch.min()) and np.isfinite(batch.max())):
        raise ValueError("non-finite batch")
    return np.ascontiguousarray(batch)


def dispatch_before(rt: Runtime, batch: np.ndarray) -> RunResult:
    """``Runtime.run`` as it was: check, route, group, gather each group, scatter the outputs."""
    with rt.counted():
        batch = check_before(batch)
        t0 = time.perf_counter()
        idx, conf = rt.route(batch)
        t1 = time.perf_counter()
        groups = group_by_expert(idx)
        out = scatter(groups, [rt._session(k).run(np.ascontiguousarray(batch[m])) for k, m in groups], len(batch))
        t2 = time.perf_counter()
        return RunResult(out, idx, [rt.expert_names[k] for k in idx], conf, timing(t0, t1, t2), rt.fell_back(conf))


def open_runtimes(bundle: str, routed: bool, threads: int) -> dict[str, Runtime]:
    b = read_bundle(bundle)
    rts = {"after": Runtime.load(bundle, intra_op_threads=threads),
           "before": Runtime.load(bundle, intra_op_threads=threads, all_experts=True)}
    if routed:
        m = {**b.manifest, "routing": {**b.manifest["routing"], "enabled": True}}
        rts["routed"] = Runtime(b.root, m, rts["after"].backend, intra_op_threads=threads)
    return rts


def time_wall_and_cpu(cands: dict, repeats: int) -> dict[str, dict]:
    """``evaluate.latency.time_interleaved`` plus the process CPU time of each call (all threads):
    on a machine shared with other jobs, a call descheduled mid-way loses wall time but not CPU
    time, so the CPU ratios show the work added where wall-clock medians drown it."""
    wall: dict[str, list[float]] = {k: [] for k in cands}
    cpu: dict[str, list[float]] = {k: [] for k in cands}
    for f in cands.values():
        f()
    for _ in range(repeats):
        for k, f in cands.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append((time.perf_counter() - t) * 1e3)
            cpu[k].append((time.process_time() - c) * 1e3)
    out = {}
    for k in cands:
        out[k] = summarize(wall[k])
        out[k]["cpu_median_ms"] = round(float(np.median(cpu[k])), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--routed", action="store_true", help="also time the bundle with routing switched on")
    ap.add_argument("--threads", type=int, default=0, help="experts' intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--profile", action="store_true", help="pyinstrument profiles of the gated dispatch at batch 1")
    add_json_option(ap)
    args = ap.parse_args()

    rts = open_runtimes(args.bundle, args.routed, args.threads)
    after, before = rts["after"], rts["before"]
    name = after.expert_names[after.default_expert]
    bare = after._session(after.default_expert)._sess  # the ORT InferenceSession itself
    feed = bare.get_inputs()[0].name
    _, pool = after.load_inputs(foolbox_dir())
    results = {"bundle": str(args.bundle), "expert": name, "routing_enabled": bool(after.routed),
               "cpu": platform.processor() or platform.machine(), "repeats": args.repeats, "threads": args.threads,
               "batches": {}}
    for bs in args.batches:
        x = tile_batch(pool, bs)
        cands = {"bare": lambda: bare.run(None, {feed: x}),
                 "run_expert": lambda: after.run_expert(name, x),
                 "gated:after": lambda: after.run(x),
                 # Runtime.run without its input check (what refusing NaN/inf inputs costs)
                 "gated:unchecked": lambda: after._run_counted(x),
                 "gated:before": lambda: dispatch_before(before, x)}
        if "routed" in rts:
            r = rts["routed"]
            cands["routed:after"] = lambda: r.run(x)
            cands["routed:before"] = lambda: dispatch_before(r, x)
            cands["router"] = lambda: r.router_session.run(x)
        row = time_wall_and_cpu(cands, args.repeats)
        base = row["bare"]
        for k, v in row.items():
            v["over_bare"] = round(v["median_ms"] / base["median_ms"], 4)
            v["min_over_bare_min"] = round(v["min_ms"] / base["min_ms"], 4)
            v["cpu_over_bare"] = round(v["cpu_median_ms"] / base["cpu_median_ms"], 4)
        if "routed" in rts:
            row["routed_experts_used"] = sorted(set(rts["routed"].run(x).experts))
        results["batches"][str(bs)] = row
        print(f"batch {bs}:")
        for k, v in row.items():
            if isinstance(v, dict):
                print(f"  {k:<14} median {v['median_ms']:9.3f} ms  IQR {v['iqr_ms']}  x{v['over_bare']:.4f} of bare"
                      f"  (min x{v['min_over_bare_min']:.4f}; CPU {v['cpu_median_ms']:.3f} ms, x{v['cpu_over_bare']:.4f})")
        if "routed_experts_used" in row:
            print(f"  routed experts used: {row['routed_experts_used']}")
    if args.profile:
        profile(before, after, tile_batch(pool, 1))
    write_json(args.json, results)
    for r in rts.values():
        r.close()


def profile(before: Runtime, after: Runtime, x: np.ndarray, calls: int = 3000) -> None:
    from pyinstrument import Profiler

    for label, f in (("gated:before", lambda: dispatch_before(before, x)), ("gated:after", lambda: after.run(x))):
        p = Profiler(interval=0.0001)
        p.start()
        for _ in range(calls):
            f()
        p.stop()
        print(f"--- {label}, {calls} calls at batch 1")
        print(p.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
