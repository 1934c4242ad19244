"""``moqe-compile``: build, inspect, evaluate and locate bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import guarded

DEFAULT_RECIPE = "mobilenetv2-demo.toml"


def _default_recipe() -> Path | None:
    # The default recipe ships under bundles/ at the project root (editable/source installs).
    p = Path(__file__).resolve().parents[2] / "bundles" / DEFAULT_RECIPE
    return p if p.is_file() else None


def cmd_build(args) -> int:
    from ..config import BuildConfig, load_recipe
    from ..pipeline import build

    from ..lm_config import recipe_is_lm

    if args.recipe and recipe_is_lm(args.recipe):  # task = "causal-lm": the LM pipeline (lm_pipeline.py)
        from ..lm_config import load_lm_recipe
        from ..lm_pipeline import build_lm

        lm = load_lm_recipe(args.recipe)
        if "tensorrt" in (args.backend or []):
            from ..errors import ConfigError

            raise ConfigError("--backend tensorrt: causal-LM bundles run on onnxruntime-cpu only (their 4-bit "
                              "MatMulNBits experts have no TensorRT path here); drop --backend.")
        lm.gate.force_routing = lm.gate.force_routing or args.force_routing
        print(f"bundle written to {build_lm(lm, args.output, quiet=args.quiet)}")
        return 0
    if args.recipe:
        cfg = load_recipe(args.recipe)
    else:
        p = _default_recipe()
        cfg = load_recipe(p) if p else BuildConfig()  # the dataclass defaults are the same demo
    if args.force_routing:
        cfg.gate.force_routing = True
    for b in args.backend or []:  # adds the backend's Q/DQ graph to every expert (tensorrt: S8S8)
        if b not in cfg.backends.targets:
            cfg.backends.targets.append(b)
    out = build(cfg, args.output, quiet=args.quiet)
    print(f"bundle written to {out}")
    if "tensorrt" in (args.backend or []):
        # TensorRT only builds: calibration is already in the S8S8 Q/DQ graphs (TensorRT 11 has
        # no implicit INT8 calibration). The ONNX bundle is complete either way.
        return _engines(out, args)
    return 0


def _engines(bundle, args) -> int:
    from ..backends.tensorrt import build_bundle_engines
    from ..errors import BackendError

    try:
        recs = build_bundle_engines(bundle, max_batch=args.trt_max_batch, opt_batch=args.trt_opt_batch,
                                    hardware_compatibility=args.trt_hardware_compatibility,
                                    version_compatible=args.trt_version_compatible)
    except BackendError as e:
        print(f"moqe-compile: TensorRT engines not built: {e}\nThe bundle at {bundle} is complete for ONNX "
              "backends and holds the S8S8 graphs; build its engines later on the target GPU with "
              f"`moqe-compile engines {bundle}`.", file=sys.stderr)
        return e.exit_code
    for r in recs:
        print(f"engine {r.path}: sm {r.compute_capability}, TensorRT {r.tensorrt_version}, {r.device_name}")
    return 0


def cmd_engines(args) -> int:
    return _engines(args.bundle, args)


def _trt_options(p) -> None:
    from ..backends.tensorrt import HARDWARE_COMPAT

    p.add_argument("--trt-max-batch", type=int, default=64, help="TensorRT profile max batch (default 64)")
    p.add_argument("--trt-opt-batch", type=int, default=1, help="TensorRT profile optimum batch (default 1)")
    p.add_argument("--trt-hardware-compatibility", default="none", choices=HARDWARE_COMPAT,
                   help="engine hardware compatibility level, recorded in the manifest (default none)")
    p.add_argument("--trt-version-compatible", action="store_true",
                   help="version-compatible engines (lean runtime), recorded in the manifest")


def cmd_inspect(args) -> int:
    from .inspect import render

    print(render(args.bundle, verify=not args.no_verify))
    return 0


def cmd_check_qdq(args) -> int:
    import json
    from pathlib import Path

    from ..errors import InputError
    from ..quantize import check_qdq

    p = Path(args.model)
    if not p.is_file():
        raise InputError(f"model {args.model!r} does not exist.")
    res = check_qdq(p, args.target)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{p}: {'OK' if res['ok'] else 'FAIL'} for {args.target}")
        for v in res["violations"]:
            print(f"  - {v}")
        if "kernels" in res:
            print(f"  kernels after ORT optimization: {res['kernels']}")
    return 0 if res["ok"] else 1


def cmd_sensitivity(args) -> int:
    import json
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from ..config import BuildConfig, load_recipe
    from ..data.datasets import build_splits
    from ..data.images import Preprocess
    from ..models import load_fp_model
    from ..quantize import prepare_for_quantization
    from ..quantize.sensitivity import layer_sensitivity

    cfg = load_recipe(args.recipe) if args.recipe else BuildConfig()
    cfg.data.augmentations = min(cfg.data.augmentations, 4)
    with tempfile.TemporaryDirectory(prefix="moqe-sens-") as tmp:
        work = Path(tmp)
        fp = load_fp_model(cfg.model, cfg.preprocessing, work / "fp.onnx")
        x = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))["calibration"].x
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        ranking = layer_sensitivity(prepared, fp.input_name, x, work, n=args.samples)
    if args.json:
        print(json.dumps(ranking[: args.top]))
    else:
        print(f"{'rank':>4}  {'node':<40} {'op':<5} {'KL to FP':>10} {'top-1 agree':>11}")
        for i, r in enumerate(ranking[: args.top]):
            print(f"{i + 1:>4}  {r['node']:<40} {r['op']:<5} {r['kl_to_fp']:>10.3g} {r['fp_top1_agreement']:>11.3f}")
    return 0


def cmd_data_path(args) -> int:
    from ..data.datasets import foolbox_dir

    print(foolbox_dir())
    return 0


def cmd_export_triton(args) -> int:
    from ..serving.triton import TritonExport, export_triton

    opts = TritonExport(name=args.name, prefix=args.prefix, variant=args.variant, instance_kind=args.kind,
                        instances=args.instances, max_batch_size=args.max_batch,
                        max_queue_delay_us=args.max_queue_delay_us)
    out = export_triton(args.bundle, args.output, opts, overwrite=args.force)
    print(f"Triton model repository written to {out}")
    print(f"  serve it with: tritonserver --model-repository {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moqe-compile", description="Mixture-of-Quantization-Experts compiler.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a MoQE bundle from a recipe (default: the MobileNetV2 demo)")
    b.add_argument("recipe", nargs="?", help=f"recipe TOML (default: bundles/{DEFAULT_RECIPE})")
    b.add_argument("-o", "--output", required=True, help="bundle directory to write (replaced atomically)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.add_argument("--force-routing", action="store_true",
                   help="keep the router even where the significance gate refuses it (recorded in the manifest)")
    b.add_argument("--backend", action="append", choices=["onnxruntime-cpu", "tensorrt"],
                   help="also build for this backend (repeatable; tensorrt: S8S8 graphs, then engines on this GPU)")
    _trt_options(b)
    b.set_defaults(fn=cmd_build)
    en = sub.add_parser("engines", help="build TensorRT engines for a bundle's S8S8 experts on this GPU")
    en.add_argument("bundle")
    _trt_options(en)
    en.set_defaults(fn=cmd_engines)
    i = sub.add_parser("inspect", help="print a bundle's manifest in human form")
    i.add_argument("bundle")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    i.set_defaults(fn=cmd_inspect)
    from .evaluate import add_parser as add_eval_parser

    add_eval_parser(sub)
    c = sub.add_parser("check-qdq", help="check a Q/DQ ONNX model against a backend's rules")
    c.add_argument("model")
    c.add_argument("--target", required=True, help="tensorrt | onnxruntime-cpu")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_check_qdq)
    s = sub.add_parser("sensitivity", help="rank layers by the output change when only that layer is INT8")
    s.add_argument("recipe", nargs="?", help="recipe TOML (default: the MobileNetV2 demo)")
    s.add_argument("--top", type=int, default=20)
    s.add_argument("--samples", type=int, default=64, help="calibration samples to measure on")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_sensitivity)
    t = sub.add_parser("export-triton", help="write a Triton model repository (router + experts + BLS model)")
    t.add_argument("bundle")
    t.add_argument("-o", "--output", required=True, help="repository directory to write")
    t.add_argument("--name", default="", help="name clients call (default: the bundle directory's name)")
    t.add_argument("--prefix", default="", help="prefix for the router/expert model names")
    t.add_argument("--variant", default="onnxruntime-cpu",
                   help="expert graphs: onnxruntime-cpu (U8S8) or tensorrt (S8S8, for ONNX Runtime CUDA)")
    t.add_argument("--kind", default="KIND_CPU", help="instance kind of router/experts: KIND_CPU | KIND_GPU")
    t.add_argument("--instances", type=int, default=1, help="instances per model (1)")
    t.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every model (64)")
    t.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="Triton dynamic batching delay of the BLS model (2000 us)")
    t.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    t.set_defaults(fn=cmd_export_triton)
    d = sub.add_parser("data-path", help="print the folder of the demo's ImageNet photos (foolbox package)")
    d.set_defaults(fn=cmd_data_path)
    args = ap.parse_args(argv)
    return guarded(lambda: args.fn(args), "moqe-compile")


if __name__ == "__main__":
    sys.exit(main())
