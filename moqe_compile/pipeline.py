"""``build``: model -> export -> quantize -> score -> route -> bundle, each stage in order.

Everything is written inside a :class:`BundleWriter`, so a failure at any stage (or
Ctrl-C) leaves no partial bundle behind.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .backends import OrtCpuSession
from .bundle import BundleWriter
from .config import BuildConfig
from .data.datasets import SPLITS, build_splits, list_sources
from .data.images import Preprocess
from .models import load_fp_model
from .models.loader import write_labels
from .quantize import calibrate_ranges, count_integer_kernels, prepare_for_quantization, write_expert
from .router.export import export_router
from .router.train import predict, small_inputs, train_router
from .score import expert_metrics, routed_metrics, score


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"moqe_compile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def log(msg: str) -> None:
    print(f"[moqe-compile] {msg}", file=sys.stderr, flush=True)


def build(cfg: BuildConfig, out: str | Path, quiet: bool = False) -> Path:
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}
    pre = Preprocess.from_dict(asdict(cfg.preprocessing))
    bar = lambda total, desc: tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)  # noqa: E731

    def stage(name: str):
        stage_s[name] = time.perf_counter()
        if not quiet:
            log(name)

    def done(name: str):
        stage_s[name] = round(time.perf_counter() - stage_s[name], 2)

    with BundleWriter(out) as w, tempfile.TemporaryDirectory(prefix="moqe-work-") as work:
        work = Path(work)
        stage("export")
        fp = load_fp_model(cfg.model, cfg.preprocessing, w.path("fp/model.onnx"))
        write_labels(fp.labels, w.path("task/labels.json"))
        done("export")

        stage("data")
        n_src = len(list_sources(cfg.data.source))
        with bar(n_src, "images") as pb:
            splits = build_splits(cfg.data, pre, pb)
        done("data")

        stage("quantize")
        prepared = prepare_for_quantization(fp.path, work / "prepared.onnx")
        experts = []
        backend = cfg.backends.targets[0]
        with bar(len(cfg.experts), "experts") as pb:
            for r in cfg.experts:
                ranges = calibrate_ranges(prepared, fp.input_name, splits["calibration"].x, r,
                                          w.path(f"experts/{r.name}/calibration.json"))
                variants = {}
                for b in cfg.backends.targets:
                    rel = f"experts/{r.name}/{b}.onnx"
                    info = write_expert(prepared, ranges, r, b, w.path(rel))
                    info["kernels"] = count_integer_kernels(w.path(rel))
                    variants[b] = {"path": rel, **info}
                experts.append({"name": r.name, "recipe": asdict(r), "variants": variants,
                                "calibration_ranges": {"path": f"experts/{r.name}/calibration.json"}})
                pb.update(1)
        done("quantize")

        stage("score")
        fp_sess = OrtCpuSession("fp", fp.path)
        ex_sess = [OrtCpuSession(e["name"], w.path(e["variants"][backend]["path"])) for e in experts]
        scores = {}
        with bar(len(SPLITS[1:]) * (1 + len(experts)), "score") as pb:
            for s in SPLITS[1:]:
                d = splits[s]
                scores[s] = score(fp_sess, ex_sess, d.x, d.labels, cfg.data.targets, pb)
        done("score")

        stage("router")
        tr, va = scores["router_train"], scores["router_val"]
        with bar(cfg.router.epochs, "router epochs") as pb:
            res = train_router(cfg.router, splits["router_train"].x, tr.loss, splits["router_val"].x, va.loss, pb)
        export_router(res.core, cfg.router.input_size, cfg.preprocessing.crop, w.path("router/router.onnx"),
                      w.path("router/router.safetensors"))
        done("router")

        stage("report")
        names = [e["name"] for e in experts]
        # The best single expert is chosen on validation, never on test.
        best_k = int(va.loss.mean(0).argmin())
        report = {"targets": cfg.data.targets, "splits": {}}
        for s in ("router_val", "test"):
            sc, d = scores[s], splits[s]
            route = predict(res.core, small_inputs(d.x, cfg.router.input_size)).argmax(1)
            per_expert = {}
            for k, e in enumerate(experts):
                m = expert_metrics(sc.expert_logits[k], sc.fp_logits, d.labels)
                m["mean_loss"] = float(sc.loss[:, k].mean())
                per_expert[e["name"]] = m
            report["splits"][s] = {
                "n": int(len(d.x)),
                "fp": expert_metrics(sc.fp_logits, sc.fp_logits, d.labels),
                "experts": per_expert,
                "best_expert": names[best_k],
                "oracle": routed_metrics(sc, sc.oracle, d.labels),
                "moqe": routed_metrics(sc, route, d.labels),
                "router_accuracy_vs_oracle": float((route == sc.oracle).mean()),
                "usage": {n: float((route == k).mean()) for k, n in enumerate(names)},
                "oracle_usage": {n: float((sc.oracle == k).mean()) for k, n in enumerate(names)},
            }
        for e in experts:
            e["metrics"] = {"test": report["splits"]["test"]["experts"][e["name"]]}
        report["router_training"] = {"best_epoch": res.best_epoch, "history": res.history}
        np.savez(w.path("report/loss_matrix.npz"), expert_names=np.array(names),
                 **{f"{s}_loss": scores[s].loss for s in scores},
                 **{f"{s}_labels": splits[s].labels for s in scores if splits[s].labels is not None})
        import json

        w.path("report/report.json").write_text(json.dumps(report, indent=2))
        done("report")
        stage_s["total"] = round(time.perf_counter() - t_start, 2)

        manifest = {
            "created_with": _versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_config": cfg.to_manifest(),
            "task": {"kind": "image-classification", "num_classes": fp.num_classes,
                     "labels": {"path": "task/labels.json"}},
            "model": {"source": cfg.model.source, "arch": cfg.model.arch,
                      "origin": cfg.model.path if cfg.model.source == "onnx" else cfg.model.weights,
                      "fp": {"path": "fp/model.onnx"}},
            "preprocessing": {**asdict(cfg.preprocessing), "layout": "NCHW", "dtype": "float32",
                              "color": "RGB", "interpolation": "bilinear"},
            "io": {"input": {"name": fp.input_name, "shape": ["batch", 3, pre.crop, pre.crop], "dtype": "float32"},
                   "output": {"name": fp.output_name, "shape": ["batch", fp.num_classes], "dtype": "float32"}},
            "splits": {s: {"source_images": len(set(splits[s].sources)), "samples": int(len(splits[s].x)),
                           "augmentations_per_image": cfg.data.augmentations} for s in SPLITS}
                      | {"seed": cfg.data.seed, "disjoint_by": "source image"},
            "experts": experts,
            "router": {"path": "router/router.onnx", "weights": {"path": "router/router.safetensors"},
                       "input": "input", "output": "expert_probs", "config": asdict(cfg.router),
                       "best_epoch": res.best_epoch},
            "routing": {"enabled": True, "granularity": "per-input", "default_expert": names[best_k]},
            "backends": list(cfg.backends.targets),
            "report": {"path": "report/report.json", "loss_matrix": {"path": "report/loss_matrix.npz"},
                       "build_seconds": stage_s},
        }
        return w.commit(manifest)
