"""``moqe-compile``: build, inspect, evaluate and locate bundles."""

from __future__ import annotations

import argparse
import sys

from moqe_compile.cli.common import CHECK_FAILED, guarded

def _load(recipe: str | None):
    """The recipe (a shipped name or a TOML path; default: the demo), its task plug-in and its name."""
    import tomllib

    from moqe_compile import recipes
    from moqe_compile.tasks import task_of

    path = recipes.path(recipe or recipes.DEFAULT)
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        from moqe_compile.errors import ConfigError

        raise ConfigError(f"recipe file {str(path)!r} is not valid TOML: {e}.") from e
    task = task_of(doc)
    return task.load_recipe(path), task, path.stem


def cmd_recipes(args) -> int:
    import tomllib

    from moqe_compile import recipes
    from moqe_compile.tasks import kind_of

    for name in recipes.names():
        kind = kind_of(tomllib.loads(recipes.path(name).read_text()))
        print(f"{name}  {kind}{'  (default)' if name == recipes.DEFAULT else ''}")
    return 0


def cmd_build(args) -> int:
    from moqe_compile.errors import ConfigError

    cfg, task, name = _load(args.recipe)
    backends = args.backend or []
    if task.KIND != "image-classification" and "tensorrt" in backends:
        raise ConfigError(f"--backend tensorrt: {task.KIND} bundles run on onnxruntime-cpu only (their 4-bit "
                          "MatMulNBits experts have no TensorRT path); drop --backend.")
    if args.force_routing:
        cfg.gate.force_routing = True
    for b in backends:  # adds the backend's Q/DQ graph to every expert (tensorrt: S8S8)
        if b not in cfg.backends.targets:
            cfg.backends.targets.append(b)
    if args.dry_run:
        print(f"recipe {name} (task {task.KIND}): valid; nothing written")
        for r in cfg.experts:
            print(f"  expert {r.name}" + (f"  preset={r.preset}" if getattr(r, "preset", "") else ""))
        return 0
    from moqe_compile.build import build

    out = build(cfg, args.output, quiet=args.quiet, force=args.force)
    print(f"bundle written to {out}")
    if "tensorrt" in backends:
        # TensorRT only builds: calibration is already in the S8S8 Q/DQ graphs (TensorRT 11 has
        # no implicit INT8 calibration). The ONNX bundle is complete either way.
        return _engines(out, args)
    return 0


def _engines(bundle, args) -> int:
    from moqe_compile.backends.tensorrt import build_bundle_engines
    from moqe_compile.errors import BackendError

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
    from moqe_compile.backends.tensorrt import HARDWARE_COMPAT

    p.add_argument("--trt-max-batch", type=int, default=64, help="TensorRT profile max batch (default 64)")
    p.add_argument("--trt-opt-batch", type=int, default=1, help="TensorRT profile optimum batch (default 1)")
    p.add_argument("--trt-hardware-compatibility", default="none", choices=HARDWARE_COMPAT,
                   help="engine hardware compatibility level, recorded in the manifest (default none)")
    p.add_argument("--trt-version-compatible", action="store_true",
                   help="version-compatible engines (lean runtime), recorded in the manifest")


def cmd_inspect(args) -> int:
    from moqe_compile.cli.inspect import render

    print(render(args.bundle, verify=not args.no_verify))
    return 0


def cmd_check_qdq(args) -> int:
    import json
    from pathlib import Path

    from moqe_compile.errors import InputError
    from moqe_compile.quantize import check_qdq

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
    return 0 if res["ok"] else CHECK_FAILED


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


def cmd_data_path(args) -> int:
    from moqe_compile.tasks.image.data import foolbox_dir

    print(foolbox_dir())
    return 0


def cmd_export_triton(args) -> int:
    from moqe_compile.serving.triton import TritonExport, export_triton

    opts = TritonExport(name=args.name, prefix=args.prefix, variant=args.variant, instance_kind=args.kind,
                        instances=args.instances, max_batch_size=args.max_batch,
                        max_queue_delay_us=args.max_queue_delay_us)
    out = export_triton(args.bundle, args.output, opts, overwrite=args.force)
    print(f"Triton model repository written to {out}")
    print(f"  serve it with: tritonserver --model-repository {out}")
    return 0


def _logging(args) -> None:
    import logging

    level = logging.DEBUG if getattr(args, "verbose", False) else \
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="[moqe-compile] %(message)s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moqe-compile", description="Mixture-of-Quantization-Experts compiler.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a MoQE bundle from a recipe (default: the MobileNetV2 demo)")
    b.add_argument("recipe", nargs="?", help="a shipped recipe name (see `moqe-compile recipes`) or a TOML path "
                                              "(default: mobilenetv2-demo)")
    b.add_argument("-o", "--output", help="bundle directory to write (replaced atomically)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    b.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    b.add_argument("--dry-run", action="store_true", help="read and check the recipe, print its plan, write nothing")
    b.add_argument("--force", action="store_true",
                   help="replace the output directory even when it is not a moqe bundle (deletes everything in it)")
    b.add_argument("--force-routing", action="store_true",
                   help="keep the router even where the significance gate refuses it (recorded in the manifest)")
    b.add_argument("--backend", action="append", choices=["onnxruntime-cpu", "tensorrt"],
                   help="also build for this backend (repeatable; tensorrt: S8S8 graphs, then engines on this GPU)")
    _trt_options(b)
    b.set_defaults(fn=cmd_build)
    r = sub.add_parser("recipes", help="list the recipes shipped inside the package (build takes their names)")
    r.set_defaults(fn=cmd_recipes)
    en = sub.add_parser("engines", help="build TensorRT engines for a bundle's S8S8 experts on this GPU")
    en.add_argument("bundle")
    _trt_options(en)
    en.set_defaults(fn=cmd_engines)
    i = sub.add_parser("inspect", help="print a bundle's manifest in human form")
    i.add_argument("bundle")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    i.set_defaults(fn=cmd_inspect)
    from moqe_compile.cli.eval import add_parser as add_eval_parser

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
    if args.cmd == "build" and not args.dry_run and not args.output:
        ap.error("build: -o/--output is required (or --dry-run)")
    _logging(args)
    return guarded(lambda: args.fn(args), "moqe-compile")


if __name__ == "__main__":
    sys.exit(main())
