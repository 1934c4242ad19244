"""``moqe-compile eval`` for image-classification bundles: re-score a bundle on data and write
an honest report.

Runs the FP model (the bundle's ``fp/model.onnx``), every expert and the router through the
runtime's sessions, builds the per-sample loss matrix (the build's ``targets``: KL to FP, or
cross-entropy where the data has labels), and reports FP, every expert, the oracle and MoQE
with bootstrap intervals and a paired test of MoQE vs the best single expert. The best
expert is the bundle's ``routing.default_expert``, chosen on the router_val split at build
time -- never on the data evaluated here. Output goes to a directory *outside* the bundle
(default ``<bundle>-eval/``): a hashed bundle is never modified.

The data: the bundle's own ``report/eval_data.npz`` (router_val and test splits, written by
the build) or user data (a folder of images, a ``.npz``).

``report/eval_data.npz`` (plain arrays, read with ``allow_pickle=False``) holds, per stored
split ``S``:

- ``S_pixels``: uint8 ``(N, C, H, W)``, the preprocessed images *before* scaling and
  normalization, with ``mean`` and ``std`` (float32, one per channel). The float32 input is
  ``(pixels / 255 - mean) / std`` in float32, which is bit-identical to what the build fed the
  models (Preprocess scales uint8 pixels the same way). The writer checks this bit for bit and
  otherwise stores
- ``S_x``: float32 ``(N, C, H, W)`` model inputs as they were.
- ``S_y``: int64 ``(N,)`` labels, when the split has labels.
- ``S_groups``: int64 ``(N,)`` source-image id per sample (augmented views of one photo share
  it), when known: the bootstrap then resamples sources, not views.

plus ``splits``: the stored split names. Pixels take a quarter of the float32 inputs' size,
losslessly (docs/results.md#demo-bundle-build-time-and-cpu-latency).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moqe_compile.errors import BundleError, ConfigError, InputError
from moqe_compile.evaluate.latency import tile_batch, time_interleaved
from moqe_compile.evaluate.losses import sample_losses
from moqe_compile.evaluate.report import prepare_out
from moqe_compile.evaluate.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, group_index
from moqe_compile.tasks.image.report import build_split_report, to_markdown, write_plots

EVAL_SPLITS = ("router_val", "test")
# What np.load raises on a file that is not a plain .npz: a .npz is a zip archive, and a
# corrupt one fails in zipfile or zlib before numpy sees an array.
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _normalize(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    # The same float32 operations, in the same order, as preprocess.Preprocess.__call__.
    x = pixels.astype(np.float32) / 255.0
    return np.ascontiguousarray((x - mean[None, :, None, None]) / std[None, :, None, None])


def _to_pixels(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray | None:
    """uint8 pixels that normalize back to exactly ``x``, or None when there are none."""
    if x.ndim != 4 or x.shape[1] != len(mean):
        return None
    m, s = mean.astype(np.float64)[None, :, None, None], std.astype(np.float64)[None, :, None, None]
    p = np.rint((x.astype(np.float64) * s + m) * 255.0)
    if p.min() < 0 or p.max() > 255:
        return None
    p = p.astype(np.uint8)
    return p if np.array_equal(_normalize(p, mean, std), x) else None


def save_eval_data(path: str | Path, splits: dict, mean, std) -> dict:
    """Write ``splits`` (name -> object with ``.x`` float32 NCHW, ``.labels`` or None and,
    optionally, ``.sources``: the source of each sample).

    Returns ``{split: "pixels" | "float32"}``, how each split was stored.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    arrays: dict[str, np.ndarray] = {"splits": np.array(list(splits)), "mean": mean, "std": std}
    how = {}
    for name, d in splits.items():
        x = np.asarray(d.x)
        pix = _to_pixels(x, mean, std) if x.dtype == np.float32 else None
        if pix is not None:
            arrays[f"{name}_pixels"], how[name] = pix, "pixels"
        else:
            arrays[f"{name}_x"], how[name] = x.astype(np.float32), "float32"
        if d.labels is not None:
            arrays[f"{name}_y"] = np.asarray(d.labels, np.int64)
        sources = getattr(d, "sources", None)
        if sources is not None and len(sources) == len(x):
            arrays[f"{name}_groups"] = group_index(np.asarray([str(v) for v in sources])).astype(np.int64)
    np.savez(path, **arrays)
    return how


def load_eval_data(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(float32 NCHW inputs, int64 labels or None, source ids or None) of ``split`` from ``eval_data.npz``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = [str(s) for s in z["splits"]]
            if split not in stored:
                raise BundleError(f"{str(path)!r} holds splits {stored}, not {split!r}.")
            if f"{split}_pixels" in z:
                x = _normalize(z[f"{split}_pixels"], z["mean"].astype(np.float32), z["std"].astype(np.float32))
            else:
                x = np.ascontiguousarray(z[f"{split}_x"].astype(np.float32))
            y = z[f"{split}_y"].astype(np.int64) if f"{split}_y" in z else None
            g = z[f"{split}_groups"].astype(np.int64) if f"{split}_groups" in z else None
    except (*NPZ_ERRORS, KeyError) as e:
        raise BundleError(f"{str(path)!r} is not a readable eval_data.npz: {e}.") from e
    return x, y, g


def load_user_data(path: str | Path, rt) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``--data PATH``: (inputs, labels or None, description).

    A directory of images in sub-folders named by integer class index (labelled), a flat
    directory of images (unlabelled), or a ``.npz`` with ``x`` (float32 ``(N, C, H, W)``,
    already preprocessed) and optional ``y`` (integer labels).
    """
    from moqe_compile.tasks.image.preprocess import list_images

    p = Path(path)
    if not p.exists():
        raise InputError(f"--data {str(p)!r} does not exist.")
    if p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir())
        if not subdirs:
            _, x = rt.load_inputs(p, rt.input_limits.per_image())
            return x, None, f"{p} ({len(x)} unlabelled images)"
        xs, ys = [], []
        for d in subdirs:
            if not d.name.isdigit():
                raise InputError(f"class folder {str(d)!r} must be named by an integer class index.")
            if not list_images(d):
                continue
            _, x = rt.load_inputs(d, rt.input_limits.per_image())
            xs.append(x)
            ys.append(np.full(len(x), int(d.name), np.int64))
        if not xs:
            raise InputError(f"--data {str(p)!r}: its class folders hold no images.")
        y = np.concatenate(ys)
        _check_labels(y, rt, p)
        return np.concatenate(xs), y, f"{p} ({len(y)} images in {len(xs)} class folders)"
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z:
                    raise InputError(f"--data {str(p)!r} has arrays {sorted(z.files)}; it needs 'x' (and optionally 'y').")
                x, y = z["x"], (z["y"] if "y" in z else None)
        except NPZ_ERRORS as e:
            raise InputError(f"--data {str(p)!r} is not a readable plain .npz file ({e}); write one with numpy.savez "
                             "holding an array x (and optionally y).") from e
        shape = rt.preprocess.input_shape
        if x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != shape or len(x) == 0:
            raise InputError(f"--data {str(p)!r}: x has shape {tuple(x.shape)} and dtype {x.dtype}; expected "
                             f"float32 (N, {shape[0]}, {shape[1]}, {shape[2]}) preprocessed inputs, N >= 1.")
        if y is not None:
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise InputError(f"--data {str(p)!r}: y has shape {tuple(y.shape)} and dtype {y.dtype}; "
                                 f"expected integer labels of shape ({len(x)},).")
            y = y.astype(np.int64)
            _check_labels(y, rt, p)
        return np.ascontiguousarray(x), y, f"{p} ({len(x)} samples, {'labelled' if y is not None else 'unlabelled'})"
    raise InputError(f"--data {str(p)!r} must be 'test', 'router_val', a directory of images or a .npz file.")


def _check_labels(y: np.ndarray, rt, p: Path) -> None:
    c = rt.manifest["task"]["num_classes"]
    if y.min() < 0 or y.max() >= c:
        raise InputError(f"--data {str(p)!r}: labels range over [{y.min()}, {y.max()}]; the model has {c} classes.")


def _check_options(repeats: int, batches, n_boot: int) -> None:
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats} must be >= 1.")
    if n_boot < 1:
        raise ConfigError(f"--resamples {n_boot} must be >= 1.")
    bad = [b for b in batches if b < 1]
    if bad:
        raise ConfigError(f"--batches {' '.join(map(str, batches))}: batch size {bad[0]} must be >= 1; "
                          "pass positive sizes such as --batches 1 32.")


def _batched(fn, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([fn(np.ascontiguousarray(x[i : i + batch])) for i in range(0, len(x), batch)])


def evaluate_bundle(bundle: str | Path, data: str = "test", out: str | Path | None = None, latency: bool = True,
                    repeats: int = 30, batches=(1, 32), n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                    verify: bool = True) -> tuple[dict, Path]:
    """Evaluate ``bundle`` on ``data`` (``"test"``, ``"router_val"`` or a path); write
    ``report.json``, ``report.md``, ``metric.png`` and ``usage.png`` into ``out``.

    Returns (report dict, output directory).
    """
    from moqe_compile.backends import OrtCpuSession
    from moqe_compile import Runtime

    _check_options(repeats, batches, n_boot)
    with Runtime.load(bundle, verify=verify) as rt:
        root, m = rt.root, rt.manifest
        out_dir = prepare_out(root, out)
        if data in EVAL_SPLITS:
            ed = m.get("report", {}).get("eval_data")
            if not ed:
                raise BundleError(f"bundle {str(root)!r} has no report.eval_data (built before eval data was stored); "
                                  "rebuild it or pass --data PATH.")
            x, y, groups = load_eval_data(root / ed["path"], data)
            source = f"bundle split {data}"
        else:
            x, y, source = load_user_data(data, rt)
            groups = None
        targets = m["build_config"]["_data"]["data"]["targets"]
        note = []
        if targets == "labels" and y is None:
            targets = "fp"
            note.append("the bundle scores experts by cross-entropy, but this data has no labels: L = KL to FP.")
        if data == "router_val":
            note.append("router_val chose the best single expert and the router's epoch: its numbers are optimistic "
                        "for both; only the test split is an unbiased estimate.")
        gate = m.get("router", {}).get("gate")
        if not m["routing"]["enabled"]:
            note.append(f"routing is disabled: the bundle serves {m['routing']['default_expert']} for every input "
                        f"(gate: {gate['reason'] if gate else 'no gate recorded'}). The MoQE rows show the router "
                        "the gate refused, run from the bundle's router file.")
        elif gate and gate.get("forced"):
            note.append(f"routing was forced on with --force-routing: {gate['reason']}")

        t0 = time.perf_counter()
        fp = OrtCpuSession("fp32", root / m["model"]["fp"]["path"])
        fp_logits = _batched(fp.run, x)
        ex_logits = np.stack([_batched(lambda b, n=n: rt.run_expert(n, b), x) for n in rt.expert_names])
        if m["routing"]["enabled"]:
            route = _batched(lambda b: rt.route(b)[0], x)
        else:  # the runtime does not load a refused router; score it anyway, as the build did
            route = _router_route(root, m, x)
        # The deployed path end to end (route + grouped dispatch); must agree with the offline one.
        res = rt.run(x[:256])
        deployed = route if m["routing"]["enabled"] else np.full(len(x), rt.expert_names.index(
            m["routing"]["default_expert"]))
        check_idx = np.arange(len(res.logits))
        runtime_check = {
            "samples": int(len(check_idx)),
            "route_agrees": float((res.expert_index == deployed[check_idx]).mean()),
            "max_abs_logit_diff": float(np.abs(res.logits - ex_logits[deployed[check_idx], check_idx]).max()),
        }
        loss = np.stack([sample_losses(e, fp_logits, y, targets) for e in ex_logits], axis=1)
        copies = None
        ctl = m.get("report", {}).get("controls")
        if ctl and data in EVAL_SPLITS and targets == m["build_config"]["_data"]["data"]["targets"]:
            from moqe_compile.evaluate.controls import Copies

            copies = Copies.load(root / ctl["path"]).for_split(data)
        elif ctl:
            note.append("the copies control was scored on the bundle's own splits only; not available for this data.")
        costs = {e["name"]: e["cost"]["mean_weight_bits"] for e in m["experts"] if "cost" in e}
        rep = build_split_report(fp_logits=fp_logits, expert_logits=ex_logits, expert_names=rt.expert_names,
                                 labels=y, loss=loss, route=route, best_expert=m["routing"]["default_expert"],
                                 targets=targets, split=data if data in EVAL_SPLITS else "user-data", groups=groups,
                                 n_boot=n_boot, seed=seed, strongest=m.get("report", {}).get("strongest_expert"),
                                 expert_costs=costs or None, copies=copies,
                                 expert_val_loss=m.get("report", {}).get("expert_val_loss"))
        score_s = time.perf_counter() - t0
        lat = None
        if latency:
            lat = measure_bundle(rt, x, batches, repeats, fp_session=fp)
        fp.close()

    report = {"bundle": str(root), "data": source, "notes": note, **rep, "gate": gate,
              "routing_enabled": bool(m["routing"]["enabled"]), "runtime_check": runtime_check,
              "latency": lat, "eval_seconds": round(score_s, 2)}
    out_dir.mkdir(parents=True, exist_ok=True)  # in case it was removed while scoring
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report) + frontier_text(root, m))
    write_plots(rep, out_dir)
    return report, out_dir


def _router_route(root: Path, m: dict, x: np.ndarray) -> np.ndarray:
    from moqe_compile.backends import OrtCpuSession
    from moqe_compile.router.fallback import apply_fallback

    r = m["routing"]
    names = [e["name"] for e in m["experts"]]
    sess = OrtCpuSession("router", root / m["router"]["path"])
    try:
        probs = _batched(sess.run, x)
    finally:
        sess.close()
    return apply_fallback(probs, float(r.get("fallback_threshold", 0.0)),
                          names.index(r.get("fallback_expert", r["default_expert"])))[0]


def measure_bundle(rt, pool: np.ndarray, batches=(1, 32), repeats: int = 30, fp_session=None) -> dict:
    """Latency of ``rt`` (a :class:`moqe_compile.Runtime`) on batches tiled from ``pool``.

    Candidates: ``router`` (when routing is enabled), ``fp32`` (when ``fp_session`` is
    given), ``expert:<name>`` for each expert and ``moqe`` (``rt.run``: route + dispatch).
    """
    router = rt.router_session
    results = {"cpu": platform.processor() or platform.machine(), "backend": rt.backend, "repeats": int(repeats),
               "batches": {}}
    for bs in batches:
        x = tile_batch(pool, bs)
        cands: dict[str, Callable[[], object]] = {}
        if router is not None:
            cands["router"] = lambda: router.run(x)
        if fp_session is not None:
            cands["fp32"] = lambda: fp_session.run(x)
        for name in rt.expert_names:
            cands[f"expert:{name}"] = (lambda n=name: rt.run_expert(n, x))
        cands["moqe"] = lambda: rt.run(x)
        row: dict = time_interleaved(cands, repeats)
        med = {k: v["median_ms"] for k, v in row.items()}
        experts = [med[f"expert:{n}"] for n in rt.expert_names]
        mean_expert = statistics.mean(experts)
        ratios: dict = {}
        if "fp32" in med:
            ratios["int8_over_fp32"] = {n: round(med[f"expert:{n}"] / med["fp32"], 3) for n in rt.expert_names}
        if "router" in med:
            ratios["router_over_mean_expert"] = round(med["router"] / mean_expert, 3)
        ratios["moqe_over_mean_expert"] = round(med["moqe"] / mean_expert, 3)
        row["ratios"] = ratios
        row["experts_used"] = sorted(set(rt.run(x).experts))
        results["batches"][str(bs)] = row
    return results


def frontier_text(root: Path, m: dict) -> str:
    """The accuracy-budget section of a bundle built to one (its ``report/frontier.md``), else ""."""
    f = m.get("report", {}).get("frontier")
    return "\n" + (Path(root) / f["markdown"]).read_text() if f else ""


def render_markdown(report: dict) -> str:
    title = f"MoQE evaluation of `{Path(report['bundle']).name}` on {report['data']}"
    md = to_markdown(report, title, report.get("latency"))
    g = report.get("gate")
    if g:
        md += (f"\nBuild-time gate (on {g.get('split', 'router_val')}): **{g['decision']}**"
               f"{' (forced)' if g.get('forced') else ''}: {g['reason']}. Routing is "
               f"{'on' if report.get('routing_enabled') else 'off'} in this bundle.\n")
    if report.get("notes"):
        md += "\n" + "\n".join(f"Note: {n}" for n in report["notes"]) + "\n"
    return md


def cmd_eval(args) -> int:
    """``moqe-compile eval`` on an image-classification bundle (arguments: :mod:`moqe_compile.cli.eval`)."""
    report, out = evaluate_bundle(args.bundle, data=args.data, out=args.out, latency=args.latency,
                                  repeats=args.repeats, batches=tuple(args.batches), n_boot=args.resamples,
                                  seed=args.seed, verify=not args.no_verify)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_markdown(report))
        print(f"report written to {out}/ (report.json, report.md, metric.png, usage.png)")
    return 0
