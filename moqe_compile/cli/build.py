"""``moqe-compile build``, ``recipes`` and ``engines``: recipe in, bundle (and TensorRT engines) out."""

from __future__ import annotations

import sys
from pathlib import Path


def load_recipe_arg(recipe: str | None):
    """The recipe (a shipped name or a TOML path; default: the demo), its task plug-in and its name."""
    from moqe_compile import recipes
    from moqe_compile.recipe import read_recipe_toml
    from moqe_compile.tasks import task_of

    path = recipes.path(recipe or recipes.DEFAULT)
    doc, _ = read_recipe_toml(path)
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

    cfg, task, name = load_recipe_arg(args.recipe)
    backends = args.backend or []
    if task.KIND != "image-classification" and "tensorrt" in backends:
        raise ConfigError(f"--backend tensorrt: {task.KIND} bundles run on onnxruntime-cpu only (their 4-bit "
                          "MatMulNBits experts have no TensorRT path); drop --backend.")
    if args.force_routing:
        cfg.gate.force_routing = True
    if args.max_drop is not None or args.cost or args.search_minutes is not None:
        from dataclasses import replace

        t = cfg.target  # replace() re-validates the section
        budget = t.max_drop if args.max_drop is None else args.max_drop
        if (args.cost or args.search_minutes is not None) and not budget > 0:
            raise ConfigError("--cost and --search-minutes shape the accuracy-budget search: give a budget "
                              "--max-drop > 0 (or [target] max_drop) too.")
        cfg.target = replace(t, max_drop=t.max_drop if args.max_drop is None else args.max_drop,
                             cost=args.cost or t.cost,
                             search_minutes=t.search_minutes if args.search_minutes is None else args.search_minutes)
    for b in backends:  # adds the backend's Q/DQ graph to every expert (tensorrt: S8S8)
        if b not in cfg.backends.targets:
            cfg.backends.targets.append(b)
    if args.dry_run:
        if args.output:  # the same refusal the build would give, without building
            from moqe_compile.bundle.writer import checked_destination

            checked_destination(args.output, args.force)
        print(f"recipe {name} (task {task.KIND}): valid; nothing written")
        if cfg.target.enabled:
            t = cfg.target
            print(f"  target: max_drop {t.max_drop}, cost {t.cost} (batch {t.batch}), search <= {t.search_minutes} min")
        for r in cfg.experts:
            print(f"  expert {r.name}" + (f"  preset={r.preset}" if getattr(r, "preset", "") else ""))
        return 0
    from moqe_compile.build import build
    from moqe_compile.cli.common import terminate_as_exception

    with terminate_as_exception():  # a killed build (timeout, CI cancel) removes its temporary folders
        out = build(cfg, args.output, quiet=args.quiet, force=args.force)
    if not args.quiet:
        print(_build_cost(out))
    print(f"bundle written to {out}")
    if "tensorrt" in backends:
        # TensorRT only builds: calibration is already in the S8S8 Q/DQ graphs (TensorRT 11 has
        # no implicit INT8 calibration). The ONNX bundle is complete either way.
        return _engines(out, args)
    return 0


def _build_cost(bundle) -> str:
    """The per-stage seconds and peak memory that the build recorded in its report."""
    import json

    from moqe_compile.bundle import read_bundle
    from moqe_compile.stages import format_build_cost

    b = read_bundle(bundle, verify=False)  # just written and hashed by the build
    return format_build_cost(json.loads(b.file(b.manifest["report"]["path"]).read_text())["build"])


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
    from moqe_compile import task_of_bundle
    from moqe_compile.errors import BundleError

    task = task_of_bundle(args.bundle)
    if task.KIND != "image-classification":
        raise BundleError(f"{args.bundle!r} is a {task.KIND} bundle: its experts run on onnxruntime-cpu only "
                          "(4-bit MatMulNBits has no TensorRT path), so it has no engines to build.")
    return _engines(args.bundle, args)


def _trt_options(p) -> None:
    from moqe_compile.backends.tensorrt import HARDWARE_COMPAT

    p.add_argument("--trt-max-batch", type=int, default=64, help="TensorRT profile max batch (default 64)")
    p.add_argument("--trt-opt-batch", type=int, default=1, help="TensorRT profile optimum batch (default 1)")
    p.add_argument("--trt-hardware-compatibility", default="none", choices=HARDWARE_COMPAT,
                   help="engine hardware compatibility level, recorded in the manifest (default none)")
    p.add_argument("--trt-version-compatible", action="store_true",
                   help="version-compatible engines (lean runtime), recorded in the manifest")


def add_parser(sub) -> None:
    b = sub.add_parser("build", help="build a MoQE bundle from a recipe (default: the MobileNetV2 demo)")
    b.add_argument("recipe", nargs="?", help="a shipped recipe name (see `moqe-compile recipes`) or a TOML path "
                                              "(default: mobilenetv2-demo)")
    b.add_argument("-o", "--output", help="bundle directory to write (replaced atomically); required unless --dry-run")
    loud = b.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    loud.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    b.add_argument("--dry-run", action="store_true", help="read and check the recipe, print its plan, write nothing")
    b.add_argument("--force", action="store_true",
                   help="replace the output directory even when it is not a moqe bundle (deletes everything in it)")
    b.add_argument("--force-routing", action="store_true",
                   help="keep the router even where the significance gate refuses it (recorded in the manifest)")
    b.add_argument("--max-drop", type=float, default=None, metavar="X",
                   help="compile to an accuracy budget: the cheapest candidate whose drop from FP on router_val "
                        "is at most X (upper end of its 95%% interval; top-1 or FP-agreement points, percent "
                        "perplexity for causal LMs); overrides [target] max_drop")
    b.add_argument("--cost", choices=["latency", "size", "weight_bits"], default=None,
                   help="what 'cheapest' means under --max-drop (default: [target] cost, latency)")
    b.add_argument("--search-minutes", type=float, default=None, help="bound on the budget search ([target])")
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
