"""Router presets on a built bundle: how well each routes on router_val (as deployed: the
exported graph and the confidence fallback chosen on router_val; and without the fallback, the
router's own argmax) and what it costs next to one expert at batch 1 and 32 (ONNX Runtime CPU).

    python bench/router_presets.py bundles/mobilenetv2-demo --presets tiny small paper \\
        --seeds 0 1 --repeats 30 [--json PATH]

Each preset is trained exactly as the build trains its router (``train_router``, the build's
recipe with only ``[router] preset`` and ``seed`` changed) on the bundle's own router_train
loss matrix (``report/loss_matrix.npz``; the images are rebuilt from the bundle's recipe,
deterministically) and exported with the build's ``export_router``. Quality: mean routed
loss on router_val with the fallback (the build's ``choose_fallback`` on router_val), with a
95% bootstrap interval over source images and a paired test against the first preset of the
same seed. router_val is the split that chose the fallback, so these figures are optimistic
for every preset alike; the test split is not touched. Latency: each router session at the
Runtime's thread choice (1 thread up to batch 2, the experts' count above), ``Runtime.run``
with routing on and that router and fallback (``moqe:<preset>``), and the bundle's default
expert, interleaved round by round; ratio = median / expert median (and min / expert min:
the least-disturbed rounds on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from moqe_compile import Runtime
from moqe_compile.backends import OrtCpuSession
from moqe_compile.evaluate.latency import tile_batch, time_interleaved
from moqe_compile.evaluate.stats import bootstrap_ci, group_index, paired_bootstrap
from moqe_compile.router.fallback import apply_fallback, choose_fallback
from moqe_compile.tasks.image.config import BuildConfig, RouterConfig
from moqe_compile.tasks.image.data import build_splits, foolbox_dir
from moqe_compile.tasks.image.preprocess import Preprocess
from moqe_compile.tasks.image.router import train_router
from moqe_compile.tasks.image.router_export import export_router
from moqe_compile.tasks.image.score import run_batched

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


def load_training_data(rt: Runtime):
    """(build config, splits, {split: loss matrix}) of the bundle, the splits rebuilt from its recipe."""
    cfg = BuildConfig.from_manifest(rt.manifest["build_config"])
    splits = build_splits(cfg.data, Preprocess.from_dict(dataclasses.asdict(cfg.preprocessing)))
    with np.load(rt.root / rt.manifest["report"]["loss_matrix"]["path"], allow_pickle=False) as z:
        loss = {s: z[f"{s}_loss"] for s in ("router_train", "router_val")}
    for s, l in loss.items():
        if len(l) != len(splits[s].x):
            raise SystemExit(f"{s}: {len(splits[s].x)} rebuilt samples but {len(l)} loss rows: "
                             "the data no longer rebuild as they did at build time.")
    return cfg, splits, loss


def train_and_export(cfg: BuildConfig, preset: str, seed: int, splits, loss, out: Path) -> tuple[Path, RouterConfig]:
    base = {k: v for k, v in dataclasses.asdict(cfg.router).items() if k not in RouterConfig.PRESETS["paper"]}
    rc = RouterConfig(**{**base, "preset": preset, "seed": seed})
    res = train_router(rc, splits["router_train"].x, loss["router_train"], splits["router_val"].x, loss["router_val"])
    path = out / f"{preset}-s{seed}.onnx"
    export_router(res.model, rc.input_size, cfg.preprocessing.crop, path, out / f"{preset}-s{seed}.safetensors",
                  channels=cfg.preprocessing.channels, mode=rc.downsample, quantize=rc.quantize,
                  calib_x=splits["router_train"].x)
    return path, rc


def routed_val_loss(path: Path, x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(per-sample router_val loss as deployed: argmax, fallback chosen on router_val; the same
    without the fallback: the router's own choice; the fallback)."""
    probs = run_batched(OrtCpuSession("router", path, 1), x)
    fb = choose_fallback(probs, loss)
    idx = apply_fallback(probs, fb["threshold"], fb["expert"])[0]
    rows = np.arange(len(loss))
    return loss[rows, idx], loss[rows, probs.argmax(1)], fb


def routed_runtime(rt: Runtime, sessions: dict) -> Runtime:
    """The bundle with routing on and this preset's router in the Runtime's two sessions (1
    thread up to batch 2, the experts' count above) and its fallback: ``run`` as deployed
    with that router."""
    from moqe_compile.runtime.base import RouterSessions

    m = {**rt.manifest, "routing": {**rt.manifest["routing"], "enabled": True}}
    r = Runtime(rt.root, m, rt.backend)
    r._router.close()
    r._router = RouterSessions(sessions[1], sessions[0], 2)
    r.fallback_threshold, r.fallback_expert = sessions["fallback"]["threshold"], sessions["fallback"]["expert"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    add_json_option(ap)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # as the build trains routers (docs/results.md: faster on shared cores)
    rt = Runtime.load(args.bundle)
    cfg, splits, loss = load_training_data(rt)
    val_x, val_loss = splits["router_val"].x, loss["router_val"]
    groups = group_index(np.asarray([str(s) for s in splits["router_val"].sources]))
    best = int(val_loss.mean(0).argmin())
    results = {"bundle": str(args.bundle), "val_samples": int(len(val_x)),
               "val_sources": int(len(set(splits["router_val"].sources))),
               "best_single_val_loss": float(val_loss[:, best].mean()), "oracle_val_loss": float(val_loss.min(1).mean()),
               "quality": {}, "latency": {}}
    print(f"router_val: {len(val_x)} samples from {results['val_sources']} images; best single expert "
          f"{rt.expert_names[best]} {results['best_single_val_loss']:.4f}, oracle {results['oracle_val_loss']:.4f}")
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="router-presets-") as tmp:
        per_sample, raw = {}, {}
        for seed in args.seeds:
            for preset in args.presets:
                path, rc = train_and_export(cfg, preset, seed, splits, loss, Path(tmp))
                per_sample[preset, seed], raw[preset, seed], fb = routed_val_loss(path, val_x, val_loss)
                if seed == args.seeds[0]:
                    sessions[preset] = {1: OrtCpuSession(preset, path, 1), 0: OrtCpuSession(preset, path, 0),
                                        "fallback": fb}
        for (preset, seed), v in per_sample.items():
            ref = per_sample[args.presets[0], seed]
            row = {"val_loss": float(v.mean()), "ci95": list(bootstrap_ci(v, groups=groups)[1]),
                   f"minus_{args.presets[0]}": paired_bootstrap(v, ref, groups=groups)}
            r, rref = raw[preset, seed], raw[args.presets[0], seed]
            row["no_fallback"] = {"val_loss": float(r.mean()), "ci95": list(bootstrap_ci(r, groups=groups)[1]),
                                  f"minus_{args.presets[0]}": paired_bootstrap(r, rref, groups=groups)}
            results["quality"][f"{preset}/s{seed}"] = row
            for label, q in (("deployed", row), ("no fallback", row["no_fallback"])):
                d = q[f"minus_{args.presets[0]}"]
                print(f"  {preset:<8} seed {seed} {label:<11}: router_val loss {q['val_loss']:.4f} "
                      f"{np.round(q['ci95'], 4)}; minus {args.presets[0]} {d['diff']:+.4f} {np.round(d['ci95'], 4)} "
                      f"p={d['p_value']:.3f}")
        expert = rt.expert_names[rt.default_expert]
        _, pool = rt.load_inputs(foolbox_dir())
        routed = {p: routed_runtime(rt, s) for p, s in sessions.items()}
        for bs in args.batches:
            x = tile_batch(pool, bs)
            th = 1 if bs <= 2 else 0  # the Runtime's choice (router_threads_max_batch = 2)
            cands = {"expert": lambda: rt.run_expert(expert, x)}
            for p, s in sessions.items():
                cands[f"router:{p}"] = (lambda s=s[th]: s.run(x))
                cands[f"moqe:{p}"] = (lambda r=routed[p]: r.run(x))
            row = time_interleaved(cands, args.repeats)
            e, e_min = row["expert"]["median_ms"], row["expert"]["min_ms"]
            for k, v in row.items():
                if k != "expert":
                    v["ratio_to_expert"] = round(v["median_ms"] / e, 4)
                    v["min_ratio_to_expert_min"] = round(v["min_ms"] / e_min, 4)
            row["experts_used"] = {p: sorted(set(r.run(x).experts)) for p, r in routed.items()}
            results["latency"][str(bs)] = row
            print(f"batch {bs}: expert {expert} {e:.3f} ms (min {e_min:.3f})")
            for k, v in row.items():
                if k.startswith(("router:", "moqe:")):
                    print(f"  {k:<16} {v['median_ms']:9.3f} ms  ratio {v['ratio_to_expert']:.4f}  "
                          f"(min {v['min_ms']:.3f} ms, ratio {v['min_ratio_to_expert_min']:.4f})")
            print(f"  experts used: {row['experts_used']}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
