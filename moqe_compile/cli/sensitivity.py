"""``moqe-compile sensitivity``: rank an image model's layers by the output change when only that
layer is INT8 (the ranking ``exclude_sensitive`` uses)."""

from __future__ import annotations


def cmd_sensitivity(args) -> int:
    import json
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from moqe_compile.tasks.image.config import BuildConfig, load_recipe
    from moqe_compile.tasks.image.data import build_splits
    from moqe_compile.tasks.image.preprocess import Preprocess
    from moqe_compile.tasks.image.model import load_fp_model
    from moqe_compile.quantize import prepare_for_quantization
    from moqe_compile.evaluate.losses import kl_to_fp
    from moqe_compile.quantize.sensitivity import layer_sensitivity

    from moqe_compile import recipes

    if args.recipe:
        from moqe_compile.tasks import kind_of
        from moqe_compile.recipe import read_recipe_toml

        kind = kind_of(read_recipe_toml(recipes.path(args.recipe))[0])
        if kind != "image-classification":
            from moqe_compile.errors import ConfigError

            raise ConfigError(f"sensitivity ranks the layers of image-classification models; {args.recipe!r} "
                              f"is a {kind} recipe.")
    cfg = load_recipe(recipes.path(args.recipe)) if args.recipe else BuildConfig()
    cfg.data.augmentations = min(cfg.data.augmentations, 4)
    with tempfile.TemporaryDirectory(prefix="moqe-sens-") as tmp:
        work = Path(tmp)
        fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
        x = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))["calibration"].x
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        ranking = layer_sensitivity(prepared, fp.input_name, x, work, kl_to_fp, n=args.samples)
    if args.json:
        print(json.dumps(ranking[: args.top]))
    else:
        print(f"{'rank':>4}  {'node':<40} {'op':<5} {'KL to FP':>10} {'top-1 agree':>11}")
        for i, r in enumerate(ranking[: args.top]):
            print(f"{i + 1:>4}  {r['node']:<40} {r['op']:<5} {r['kl_to_fp']:>10.3g} {r['fp_top1_agreement']:>11.3f}")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("sensitivity", help="rank layers by the output change when only that layer is INT8")
    s.add_argument("recipe", nargs="?", help="a shipped recipe name or a TOML path (default: the MobileNetV2 demo)")
    s.add_argument("--top", type=int, default=20, help="how many of the most sensitive layers to print (20)")
    s.add_argument("--samples", type=int, default=64, help="calibration samples to measure on")
    s.add_argument("--json", action="store_true", help="print the whole ranking as JSON")
    s.set_defaults(fn=cmd_sensitivity)
