"""The `strongest` expert at scale: build time and peak memory of one expert, before and after a
change, side by side, and how far the two experts' outputs differ.

    git worktree add ../moqe-before <commit>      # the code to compare against
    python bench/strongest_scale.py --before-tree ../moqe-before --rounds 2 --work WORK \\
        --json bench/results/epyc-2core/strongest-scale-mobilenetv2.json
    python bench/strongest_scale.py --model-onnx efficientnet_lite0.onnx ...   # another model
    python bench/strongest_scale.py --hugepages --rounds 2 ...   # this tree without / with huge pages

The model, preprocessing and calibration views are the recipe's (default: the demo recipe,
MobileNetV2, 120 calibration views). Each build runs in its own process (so its peak RSS is
its own), alternating the two code trees round by round; ``before`` runs the same script with
``--before-tree`` first on ``PYTHONPATH``. Reported per tree: the median over rounds of the
expert's wall time, of its sequential pass (``steps``) and of the process's peak RSS. Then the
two experts of the last round are compared: integer weights (share that differ, largest
difference in grid steps), scales (largest relative difference), and on the recipe's test views
top-1 agreement between them and each one's KL divergence to FP32. With ``--hugepages`` the two
variants are this tree without and with the transparent huge pages ``moqe-compile build`` turns
on (``cli/hugepages.py``), and each build's minor page faults and kernel CPU time are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))


def prepare(args, work: Path) -> None:
    """FP model, prepared graph and the calibration/test views, written once to ``work``."""
    from dataclasses import asdict

    from moqe_compile import recipes
    from moqe_compile.quantize import prepare_for_quantization
    from moqe_compile.tasks.image.config import load_recipe
    from moqe_compile.tasks.image.data import build_splits
    from moqe_compile.tasks.image.model import load_fp_model
    from moqe_compile.tasks.image.preprocess import Preprocess

    if (work / "data.npz").exists():
        return
    cfg = load_recipe(recipes.path(args.recipe))
    if args.model_onnx:
        cfg.model.source, cfg.model.path = "onnx", str(Path(args.model_onnx).resolve())
    fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
    splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
    prepare_for_quantization(fp.path, work / "prepared.onnx")
    np.savez(work / "data.npz", calibration=splits["calibration"].x, test=splits["test"].x,
             input_name=np.array(fp.input_name))


def build_one(work: Path, label: str, preset: str) -> None:
    """(child process) Build the preset's expert with whatever package is first on sys.path."""
    from moqe_compile.tasks.image.config import ExpertRecipe
    from moqe_compile.tasks.image.experts import build_expert

    d = np.load(work / "data.npz")
    out = work / f"{label}.onnx"
    t = time.perf_counter()
    info = build_expert(work / "prepared.onnx", str(d["input_name"]), d["calibration"],
                        ExpertRecipe.from_preset(label, preset), ["onnxruntime-cpu"], {"onnxruntime-cpu": out},
                        work / f"{label}.json", work)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "steps": info["steps"],
                      "peak_rss_mb": round(peak_rss_mb(), 1), "minor_faults": ru.ru_minflt,
                      "user_cpu_s": round(ru.ru_utime, 2), "system_cpu_s": round(ru.ru_stime, 2)}))


def child_env(tree: Path, hugepages: bool | None) -> dict:
    """The child's environment: ``tree`` first on the path; huge pages on or off when asked."""
    from moqe_compile.cli.hugepages import environment

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    if hugepages is None:
        return env
    for k in ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES"):
        env.pop(k, None)
    return environment(env) if hugepages else env


def run_child(args, work: Path, label: str, tree: Path, hugepages: bool | None = None) -> dict:
    env = child_env(tree, hugepages)
    out = subprocess.run([sys.executable, __file__, "--child", label, "--work", str(work), "--preset", args.preset],
                         env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(work: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    from moqe_compile.backends import OrtCpuSession
    from moqe_compile.evaluate.losses import kl_to_fp
    from moqe_compile.tasks.image.score import run_batched

    a, b = ({i.name: numpy_helper.to_array(i) for i in onnx.load(str(work / f"{t}.onnx")).graph.initializer}
            for t in ("before", "after"))
    ints = [k for k in a if a[k].dtype in (np.int8, np.uint8, np.int32) and a[k].size > 1]
    scales = [k for k in a if k.endswith("_scale")]
    changed = sum(int((a[k] != b[k]).sum()) for k in ints)
    x = np.load(work / "data.npz")["test"]
    fp = run_batched(OrtCpuSession("fp", work / "fp.onnx"), x)
    la, lb = (run_batched(OrtCpuSession(t, work / f"{t}.onnx"), x) for t in ("before", "after"))
    return {"integer_tensors": len(ints), "integer_values": int(sum(a[k].size for k in ints)),
            "integer_values_changed": changed,
            "max_integer_step_change": int(max(np.abs(a[k].astype(np.int64) - b[k]).max() for k in ints)),
            "max_scale_rel_change": float(max((np.abs(a[k] - b[k]) / np.abs(a[k]).clip(1e-30)).max()
                                              for k in scales)),
            "test_views": len(x), "top1_agreement_before_after": float((la.argmax(-1) == lb.argmax(-1)).mean()),
            "kl_to_fp_before": float(kl_to_fp(la, fp).mean()), "kl_to_fp_after": float(kl_to_fp(lb, fp).mean()),
            "fp_top1_agreement_before": float((la.argmax(-1) == fp.argmax(-1)).mean()),
            "fp_top1_agreement_after": float((lb.argmax(-1) == fp.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="mobilenetv2-demo", help="a shipped recipe name or TOML path")
    ap.add_argument("--model-onnx", help="replace the recipe's model by this ONNX file")
    ap.add_argument("--preset", default="strongest")
    ap.add_argument("--before-tree", type=Path, required="--child" not in sys.argv and "--hugepages" not in sys.argv,
                    help="a checkout of the code to compare against")
    ap.add_argument("--hugepages", action="store_true",
                    help="compare this tree without (before) and with (after) the build's huge pages")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the prepared model, views and experts here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_json_option(ap)
    args = ap.parse_args()
    if args.child:
        return build_one(args.work, args.child, args.preset)
    with tempfile.TemporaryDirectory(prefix="moqe-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(args, work)
        runs: dict[str, list] = {"before": [], "after": []}
        for r in range(args.rounds):
            variants = ((("before", REPO, False), ("after", REPO, True)) if args.hugepages else
                        (("before", args.before_tree.resolve(), None), ("after", REPO, None)))
            for label, tree, huge in variants:
                runs[label].append(run_child(args, work, label, tree, huge))
                print(f"round {r + 1} {label}: {json.dumps(runs[label][-1])}", file=sys.stderr)
        summary = {label: {"seconds_median": statistics.median(x["seconds"] for x in rs),
                           "sequential_s_median": statistics.median(x["steps"]["sequential_s.onnxruntime-cpu"]
                                                                    for x in rs),
                           "peak_rss_mb_median": statistics.median(x["peak_rss_mb"] for x in rs),
                           **({k + "_median": statistics.median(x[k] for x in rs)
                               for k in ("minor_faults", "user_cpu_s", "system_cpu_s") if k in rs[0]})}
                   for label, rs in runs.items()}
        res = {"variants": "huge pages off / on" if args.hugepages else "before / after tree",
               "recipe": args.recipe, "model_onnx": args.model_onnx, "preset": args.preset,
               "calibration_views": int(len(np.load(work / "data.npz")["calibration"])),
               "rounds": args.rounds, "summary": summary, "runs": runs, "outputs": compare(work)}
    print(json.dumps(res["summary"], indent=1))
    print(json.dumps(res["outputs"], indent=1))
    write_json(args.json, res)


if __name__ == "__main__":
    main()
