"""Low-bit experts side by side at equal calibration data: accuracy, distance to FP, build time
and peak memory per expert.

    python bench/low_bit_quality.py moqe_compile/recipes/fmnist-cnn.toml \\
        --presets w4a8-strongest,w4a8-adaround,w4a8-brecq --bits 4 3 --json OUT.json
    python bench/low_bit_quality.py mobilenetv2-demo --presets strongest,w4a8-brecq --eval held-out

Every expert is built by ``build_expert`` from the recipe's calibration split (the same images
for all). ``--bits`` overrides the presets' weight width (the int8 presets keep 8). A preset
entry may set recipe keys after ``@``: ``w4a8-brecq@high_precision_ends=false@block_iters=200``.
``--eval test`` scores the test split; ``--eval held-out`` every view of every source image not in
the calibration split (router_train, router_val and test together), with intervals resampled
by source image; ``--extra-photos skimage`` adds every view of the natural photos packaged in
scikit-image's data folder (``SKIMAGE_PHOTOS``; ``pip install --no-deps scikit-image``, never
calibrated on, labels dropped: FP agreement and KL only). Reported per expert: top-1 with a bootstrap 95% interval (labelled data), FP
top-1 agreement and mean KL to FP with intervals, build seconds, the expert's peak RSS, and the
mean weight bits (layers kept at 8 bits counted at 8); then each expert paired against the first
one listed at its width (McNemar on top-1 for independent samples, the paired bootstrap by source
image otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path: bench/common.py importable
from common import add_json_option, write_json  # noqa: E402


# The photographs of scikit-image's data folder (scenes, objects, textures, space, a retina scan);
# the drawings, charts, microscopy and synthetic images of that folder are left out.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def skimage_photos() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("skimage")  # only its files are read: no import, no dependencies
    if spec is None or not spec.submodule_search_locations:
        sys.exit("--extra-photos skimage needs the scikit-image files: pip install --no-deps scikit-image")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [root / f for f in SKIMAGE_PHOTOS]


def parse_spec(spec: str, bits: int) -> tuple[str, str, dict]:
    """(label, preset, overrides) of ``preset@key=value@...`` at ``bits`` weight bits."""
    preset, *pairs = spec.split("@")
    over = {}
    for p in pairs:
        k, v = p.split("=")
        over[k] = json.loads(v)
    from moqe_compile.tasks.image.config import EXPERT_PRESETS

    if EXPERT_PRESETS[preset].get("weight_bits", 8) < 8:
        over["weight_bits"] = bits
    label = preset.replace("w4a8", f"w{bits}a8") + "".join("@" + p for p in pairs)
    return label, preset, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a shipped recipe name or TOML path")
    ap.add_argument("--presets", required=True, help="comma-separated preset entries")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--eval", choices=["test", "held-out"], default="test")
    ap.add_argument("--extra-photos", choices=["skimage"], default=None,
                    help="also evaluate on every view of scikit-image's packaged photos (held out, unlabelled)")
    add_json_option(ap)
    args = ap.parse_args()

    from moqe_compile import recipes
    from moqe_compile.backends import OrtCpuSession
    from moqe_compile.evaluate.stats import bootstrap_ci, paired_compare
    from moqe_compile.quantize import prepare_for_quantization
    from moqe_compile.tasks.image.config import ExpertRecipe, load_recipe
    from moqe_compile.tasks.image.data import build_splits
    from moqe_compile.tasks.image.experts import build_expert, expert_cost
    from moqe_compile.tasks.image.model import load_fp_model
    from moqe_compile.tasks.image.preprocess import Preprocess
    from moqe_compile.evaluate.losses import sample_losses
    from moqe_compile.tasks.image.score import expert_metrics, run_batched

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("moqe_compile.quantize.brecq").setLevel(logging.INFO)  # one line per reconstructed block
    path = args.recipe if Path(args.recipe).is_file() else recipes.path(args.recipe)
    cfg = load_recipe(path)
    with tempfile.TemporaryDirectory(prefix="moqe-lowbit-") as tmp:
        work = Path(tmp)
        fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
        splits = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))
        calib = splits["calibration"].x
        names = ["test"] if args.eval == "test" else ["router_train", "router_val", "test"]
        ev_x = np.concatenate([splits[s].x for s in names])
        labels = None if splits["test"].labels is None else np.concatenate([splits[s].labels for s in names])
        groups = np.concatenate([np.asarray(splits[s].sources) for s in names])
        if args.extra_photos:
            from moqe_compile.tasks.image.data import augmenter, source_views

            pre, aug = Preprocess.from_dict(asdict(cfg.preprocessing)), augmenter(cfg.data.seed + 1)
            extra = [(f"skimage:{p.name}", source_views(p, pre, cfg.data.augmentations, aug)) for p in skimage_photos()]
            ev_x = np.concatenate([ev_x, np.stack([v for _, vs in extra for v in vs])])
            groups = np.concatenate([groups, np.asarray([name for name, vs in extra for _ in vs])])
            labels = None  # the extra photos have no ImageNet label: FP agreement and KL only
        groups = None if len(set(groups.tolist())) == len(groups) else groups  # one view per source: plain bootstrap
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        fp_logits = run_batched(OrtCpuSession("fp32", fp.path), ev_x, 64)
        result = {"recipe": str(args.recipe), "eval": args.eval, "extra_photos": args.extra_photos,
                  "n": int(len(ev_x)), "calibration": int(len(calib)),
                  "sources": None if groups is None else len(set(groups.tolist())),
                  "fp": expert_metrics(fp_logits, fp_logits, labels), "experts": {}}
        ref: dict = {}
        for bits in args.bits:
            for spec in args.presets.split(","):
                label, preset, over = parse_spec(spec, bits)
                if label in result["experts"]:
                    continue
                r = ExpertRecipe.from_preset(re.sub(r"[^A-Za-z0-9_.-]", "-", label), preset, **over)
                out = work / f"{r.name}.onnx"
                t = time.perf_counter()
                info = build_expert(prepared, fp.input_name, calib, r, ["onnxruntime-cpu"], {"onnxruntime-cpu": out},
                                    work / f"{r.name}.json", work)
                build_s = time.perf_counter() - t
                logits = run_batched(OrtCpuSession(r.name, out), ev_x, 64)
                m = expert_metrics(logits, fp_logits, labels)
                agree = (logits.argmax(-1) == fp_logits.argmax(-1)).astype(np.float64)
                m["fp_top1_agreement_ci95"] = list(bootstrap_ci(agree, groups=groups)[1])
                m["kl_to_fp_ci95"] = list(bootstrap_ci(sample_losses(logits.astype(np.float64),
                                                                     fp_logits.astype(np.float64), None, "fp"),
                                                       groups=groups)[1])
                # Paired against the first expert listed at this width: top-1 (labels) or FP agreement,
                # and KL to FP (McNemar for independent 0/1 pairs, else the paired bootstrap).
                hit = (logits.argmax(-1) == labels).astype(np.float64) if labels is not None else agree
                kl = sample_losses(logits.astype(np.float64), fp_logits.astype(np.float64), None, "fp")
                first = ref.setdefault(bits, (label, hit, kl))
                if first[0] != label:
                    m["vs"] = {"expert": first[0], "hit": paired_compare(hit, first[1], groups=groups),
                               "kl_to_fp": paired_compare(kl, first[2], groups=groups)}
                if labels is not None:
                    m["top1_ci95"] = list(bootstrap_ci(hit, groups=groups)[1])
                    m["top1_minus_fp"] = paired_compare(hit, (fp_logits.argmax(-1) == labels).astype(np.float64),
                                                        groups=groups)
                m.update(build_s=round(build_s, 1), peak_rss_mb=info["steps"]["peak_rss_mb"], steps=info["steps"],
                         mean_weight_bits=round(expert_cost(prepared, list(r.exclude_nodes), r.weight_bits,
                                                            r.high_precision_nodes, r.high_precision_ends), 3),
                         recipe=r.to_dict())
                result["experts"][label] = m
                write_json(args.json, result)  # after every expert: a long run keeps what it measured
                print(f"{label:<40} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)),
                      file=sys.stderr, flush=True)
    head = "top1" if labels is not None else "fp_top1_agreement"
    print(f"\n{args.recipe}: {args.eval}, n = {result['n']}, calibration {result['calibration']}; "
          f"FP {head} = {result['fp'][head]:.4f}\n")
    print("| expert | top-1 [95% CI] | FP agree [95% CI] | KL to FP [95% CI] | mean weight bits | build s | peak RSS MiB |")
    print("|---|---|---|---|---:|---:|---:|")
    for label, m in result["experts"].items():
        top = f"{100 * m['top1']:.2f} [{100 * m['top1_ci95'][0]:.2f}, {100 * m['top1_ci95'][1]:.2f}]" if labels is not None else "-"
        a, k = m["fp_top1_agreement_ci95"], m["kl_to_fp_ci95"]
        print(f"| {label} | {top} | {m['fp_top1_agreement']:.3f} [{a[0]:.3f}, {a[1]:.3f}] | "
              f"{m['kl_to_fp']:.4f} [{k[0]:.4f}, {k[1]:.4f}] | {m['mean_weight_bits']:.2f} | {m['build_s']:.0f} | "
              f"{m['peak_rss_mb']:.0f} |")
    print("\npaired against the first expert of its width (hit = top-1 with labels, else FP agreement):")
    for label, m in result["experts"].items():
        if "vs" in m:
            v, k = m["vs"]["hit"], m["vs"]["kl_to_fp"]
            print(f"  {label} - {m['vs']['expert']}: hit {100 * v['diff']:+.2f} [{100 * v['ci95'][0]:+.2f}, "
                  f"{100 * v['ci95'][1]:+.2f}] p = {v['p_value']:.3g} ({v['test']}); KL {k['diff']:+.4f} "
                  f"[{k['ci95'][0]:+.4f}, {k['ci95'][1]:+.4f}] p = {k['p_value']:.3g}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
