"""Two builds of the same recipe, before and after a change: build time and memory per stage,
and whether they scored the same numbers.

    python bench/build_compare.py BEFORE_BUNDLE AFTER_BUNDLE [--tol 1e-5] [--json PATH]

Reads each bundle's ``report/report.json`` (``build``: seconds and peak RSS per stage, written
by every build) and compares every array that both bundles' ``report/loss_matrix.npz`` and
``report/controls.npz`` hold: numeric arrays by the largest absolute difference over the
entries finite in both (a build may leave NaN where it skips work the other did, e.g. the FP
columns of router_train, which are counted and reported separately), the rest for equality.
Exits 1 when a numeric difference exceeds ``--tol`` or another array differs, so it doubles as
the check that a speed-up changed no result.

The timings are only as comparable as the conditions the two builds ran under: run them
alone one after the other, or side by side each pinned to its own core
(``taskset -c 0 moqe-compile build ...`` and ``taskset -c 1 ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

ARRAYS = ("report/loss_matrix.npz", "report/controls.npz")


def stages(bundle: Path) -> dict:
    build = json.loads((bundle / "report" / "report.json").read_text())["build"]
    return {"total_seconds": build["total_seconds"], "peak_rss_mb": build["peak_rss_mb"],
            "stages": {s["name"]: s for s in build["stages"]}}


def compare_arrays(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"equal": False, "why": f"shapes {list(a.shape)} vs {list(b.shape)}"}
    if a.dtype.kind not in "fc":
        return {"equal": bool(np.array_equal(a, b))}
    both = np.isfinite(a) & np.isfinite(b)
    row = {"compared": int(both.sum()), "nan_only_before": int((~np.isfinite(a) & np.isfinite(b)).sum()),
           "nan_only_after": int((np.isfinite(a) & ~np.isfinite(b)).sum())}
    row["max_abs_diff"] = float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--tol", type=float, default=1e-5, help="largest absolute difference allowed (default 1e-5)")
    add_json_option(ap)
    args = ap.parse_args()

    before, after = stages(args.before), stages(args.after)
    out = {"before": before, "after": after, "tol": args.tol, "arrays": {}}
    print(f"{'stage':<10} {'before s':>9} {'after s':>9} {'ratio':>6} {'before MB':>10} {'after MB':>9}")
    for name in list(before["stages"]) + [n for n in after["stages"] if n not in before["stages"]]:
        b, a = before["stages"].get(name, {}), after["stages"].get(name, {})
        ratio = b["seconds"] / a["seconds"] if b and a and a["seconds"] else float("nan")
        print(f"{name:<10} {b.get('seconds', float('nan')):9.1f} {a.get('seconds', float('nan')):9.1f} {ratio:6.2f} "
              f"{b.get('peak_rss_mb', float('nan')):10.0f} {a.get('peak_rss_mb', float('nan')):9.0f}")
    out["total_ratio"] = before["total_seconds"] / after["total_seconds"]
    print(f"{'total':<10} {before['total_seconds']:9.1f} {after['total_seconds']:9.1f} {out['total_ratio']:6.2f} "
          f"{before['peak_rss_mb']:10.0f} {after['peak_rss_mb']:9.0f}")

    bad = []
    for rel in ARRAYS:
        if not (args.before / rel).is_file() or not (args.after / rel).is_file():
            continue
        with np.load(args.before / rel, allow_pickle=False) as zb, np.load(args.after / rel, allow_pickle=False) as za:
            for key in sorted(set(zb.files) & set(za.files)):
                row = out["arrays"][f"{rel}:{key}"] = compare_arrays(zb[key], za[key])
                if not row.get("equal", row.get("max_abs_diff", 0.0) <= args.tol):
                    bad.append(key)
                extra = (f"max |diff| {row['max_abs_diff']:.2e} over {row['compared']}"
                         + (f", NaN only before {row['nan_only_before']}" if row["nan_only_before"] else "")
                         + (f", NaN only after {row['nan_only_after']}" if row["nan_only_after"] else "")
                         if "max_abs_diff" in row else ("equal" if row["equal"] else f"DIFFERENT {row.get('why', '')}"))
                print(f"  {rel}:{key:<22} {extra}")
    out["same_results"] = not bad
    print("same results within tolerance" if not bad else f"DIFFERENT: {', '.join(bad)}")
    write_json(args.json, out)
    sys.exit(0 if not bad else 1)


if __name__ == "__main__":
    main()
