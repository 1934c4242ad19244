"""What ``Runtime.run`` costs over the bare expert session, counted in instructions
(valgrind's callgrind), where wall-clock medians cannot resolve 1%.

    python bench/instruction_counts.py bundles/mobilenetv2-demo --batches 1 32 --calls 4 --repeats 2 [--json PATH]

A wall-clock median on a 2-core machine moves by more than the 1% a dispatch adds; the number
of instructions a call executes does not depend on what else the machine runs. Each candidate
runs in its own process under ``valgrind --tool=callgrind``: it opens what it needs, warms up,
then makes ``--calls`` calls between two marks (``os.getpgrp()``, where callgrind zeroes its
counters, and ``os.getppid()``, where it dumps them), so start-up, imports and session creation
are not counted. ``--repeats`` processes per candidate give the median and the spread (what
is left of run-to-run noise). Candidates, on the same real photos tiled to the batch:

- ``bare``: the served expert's ONNX Runtime session, called directly (the floor);
- ``gated``: ``Runtime.run`` on the bundle as built (gated to one expert when the gate refused
  routing): the input check, the dispatch, the lock and counter, then the same session;
- ``router``: the router session alone;
- ``routed``: ``Runtime.run`` with routing switched on in memory (the bundle's router file);
  ``router`` and ``routed`` open that runtime only, the others the bundle as built.

What this does not measure: time lost to cache misses, page faults or thread wake-ups, which
cost cycles, not instructions (bench/runtime_overhead.py times those, with their noise). Every
session runs with one intra-op thread, so no pool thread's waiting enters the count. valgrind
emulates a CPU without AVX-512, so ONNX Runtime picks its AVX2 kernels here: the counts say
how much work the dispatch adds to a call, not how fast the AVX-512 kernels run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

CANDIDATES = ("bare", "gated", "router", "routed")
WARMUP = 2
SETARCH = ["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []


def child(bundle: str, cand: str, batch: int, calls: int) -> None:
    """Open only what ``cand`` needs, warm it up, then make ``calls`` calls (run under callgrind)."""
    from moqe_compile import Runtime
    from moqe_compile.bundle import read_bundle
    from moqe_compile.evaluate.latency import tile_batch
    from moqe_compile.tasks.image.data import foolbox_dir

    b = read_bundle(bundle, verify=False)  # hashing is not what is counted
    if cand in ("router", "routed"):
        b.manifest["routing"] = {**b.manifest["routing"], "enabled": True}
    rt = Runtime(b.root, b.manifest, "onnxruntime-cpu", intra_op_threads=1)
    _, pool = rt.load_inputs(foolbox_dir())
    x = tile_batch(pool, batch)
    if cand == "bare":
        sess = rt._session(rt.default_expert)._sess  # the ORT InferenceSession itself
        feed = sess.get_inputs()[0].name
        call = lambda: sess.run(None, {feed: x})  # noqa: E731
    elif cand == "router":
        call = lambda: rt.router_session.run(x)  # noqa: E731
    else:
        call = lambda: rt.run(x)  # noqa: E731
    for _ in range(WARMUP):
        call()
    # A full collection among the counted calls would add millions of instructions to one
    # process and not to another: everything made so far goes to the permanent generation.
    gc.collect()
    gc.freeze()
    os.getpgrp()  # callgrind zeroes its counters here (--zero-before) ...
    for _ in range(calls):
        call()
    os.getppid()  # ... and writes them out here (--dump-before): the calls alone are counted


def count(bundle: str, cand: str, batch: int, calls: int, work: Path) -> int:
    """Instructions of ``calls`` calls of ``cand`` in a fresh process under callgrind (all threads)."""
    out = work / f"{cand}-b{batch}-n{calls}-{uuid.uuid4().hex[:8]}.callgrind"
    # One BLAS thread: OpenBLAS's helper threads spin after a call for as long as the scheduler
    # lets them, which adds a different number of instructions to every run.
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    # setarch -R: no address randomization, so hash tables keyed by pointers probe alike every run.
    cmd = [*SETARCH, "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           "--zero-before=getpgrp", "--dump-before=getppid", "--separate-threads=yes",
           sys.executable, __file__, bundle, "--child", cand, "--batches", str(batch), "--calls", str(calls)]
    res = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{cand} at batch {batch} failed under valgrind (exit {res.returncode}):\n{res.stderr[-3000:]}")
    # --separate-threads: with one shared profile, what other threads had done before the first
    # mark stayed in the count (seen here: millions of instructions, different in every run).
    # The dump at getppid writes one file per thread that ran between the marks: "<out>.1-<thread>".
    parts = sorted(out.parent.glob(f"{out.name}.1-*"))
    totals = [re.search(r"^summary:\s+(\d+)", p.read_text(), re.M) for p in parts]
    if not parts or None in totals or list(out.parent.glob(f"{out.name}.2-*")):
        raise SystemExit(f"callgrind did not write exactly one dump of the calls ({out}.1-*)")
    return sum(int(m.group(1)) for m in totals)


def per_call(runs: list[int], calls: int) -> dict:
    """Instructions per call (median over the processes) and their spread (the count's noise)."""
    return {"instructions": runs, "per_call": float(np.median(runs)) / calls,
            "spread_per_call": (max(runs) - min(runs)) / calls}


def valgrind_version() -> str:
    return subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--calls", type=int, default=4, help="calls counted per process, after the warm-up")
    ap.add_argument("--repeats", type=int, default=2, help="processes per candidate (median; the spread is reported)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="processes at once (counts do not depend on what else runs)")
    ap.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    ap.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    add_json_option(ap)
    args = ap.parse_args()
    if args.child:
        return child(args.bundle, args.child, args.batches[0], args.calls)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    import onnxruntime

    from moqe_compile.bundle import read_bundle

    routing = bool(read_bundle(args.bundle, verify=False).manifest["routing"]["enabled"])
    print(f"{args.bundle}: routing {'on' if routing else 'off (gated: run = the dispatch + one expert)'}")
    results = {"bundle": Path(args.bundle).name, "routing_enabled": routing, "valgrind": valgrind_version(), "onnxruntime": onnxruntime.__version__,
               "machine": platform.machine(), "threads": 1, "warmup_calls": WARMUP, "calls": args.calls,
               "repeats": args.repeats, "batches": {}}
    with tempfile.TemporaryDirectory(prefix="moqe-callgrind-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(bs, c): [pool.submit(count, args.bundle, c, bs, args.calls, Path(tmp)) for _ in range(args.repeats)]
                for bs in args.batches for c in args.candidates}
        for bs in args.batches:
            row = {c: per_call([j.result() for j in jobs[bs, c]], args.calls) for c in args.candidates}
            if "bare" in row:
                for v in row.values():
                    v["over_bare"] = round(v["per_call"] / row["bare"]["per_call"], 5)
            results["batches"][str(bs)] = row
            print(f"batch {bs}:")
            for c, v in row.items():
                ratio = f"  x{v['over_bare']:.5f} of bare" if "over_bare" in v else ""
                print(f"  {c:<7} {v['per_call'] / 1e6:10.3f} M instructions per call{ratio}"
                      f"  (spread {v['spread_per_call'] / 1e6:.3f} M)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
