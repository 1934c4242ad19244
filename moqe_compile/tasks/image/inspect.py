"""``moqe-compile inspect`` for image-classification bundles: the manifest, human-readable."""

from __future__ import annotations

from moqe_compile.target import frontier_section, summary_lines


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


_RECIPE_DEFAULTS = {"per_channel": True, "symmetric_activations": False, "weight_bits": 8, "weight_clip": "minmax",
                    "weight_rounding": "nearest", "sequential_activations": False, "bias_correction": False,
                    "equalization": False,
                    "exclude_nodes": [], "exclude_sensitive": 0, "high_precision_nodes": []}


def _recipe(r: dict) -> str:
    """The recipe's distinguishing fields: calibration, its knobs, and every non-default field."""
    parts = [f"preset={r['preset']}"] if r.get("preset") else []
    parts.append(f"calibration={r['calibration']}")
    if r["calibration"] == "percentile":
        parts.append(f"p={r['percentile']}")
    if r["calibration"] in ("percentile", "entropy", "mse"):
        parts.append(f"bins={r['num_bins']}")
    parts += [f"{k}={r[k]}" for k, d in _RECIPE_DEFAULTS.items() if k in r and r[k] != d]
    if r.get("weight_rounding") == "adaround":
        parts.append(f"adaround_iters={r['adaround_iters']}")
    if r.get("weight_rounding") == "gptq":
        parts.append(f"gptq_damp={r['gptq_damp']}")
    return " ".join(parts)


def _gate_line(m: dict) -> str:
    g = m.get("router", {}).get("gate")
    if not g:
        return "gate        none recorded (bundle built before significance-gated routing)"
    forced = " FORCED" if g.get("forced") else ""
    return (f"gate        {g['decision']}{forced}: val gain {g['val_gain']:+.4f} {g.get('metric', '')}, "
            f"p = {g['p_value']:.3g} (< {g.get('threshold', 0.05)} needed); {g['reason']}")


def render(b) -> str:
    """The summary of a read image bundle ``b`` (``bundle.Bundle``)."""
    m = b.manifest
    L = [f"bundle      {b.root}",
         f"schema      v{m['schema_version']}  built {m['created_at']} with moqe-compile {m['created_with']['moqe_compile']}"
         f" (onnxruntime {m['created_with']['onnxruntime']}, torch {m['created_with']['torch']})",
         f"model       {m['model']['source']}:{m['model']['arch'] if m['model']['source'] != 'onnx' else m['model']['origin']}"
         f"  task {m['task']['kind']} ({m['task']['num_classes']} classes)",
         f"input       {m['io']['input']['name']} {m['io']['input']['shape']} {m['io']['input']['dtype']};"
         f" resize {m['preprocessing']['resize']}, crop {m['preprocessing']['crop']}",
         f"backends    {', '.join(m['backends'])}",
         f"routing     {'on' if m['routing']['enabled'] else 'OFF'} ({m['routing']['granularity']});"
         f" default/best-on-val expert: {m['routing']['default_expert']}",
         _gate_line(m),
         *summary_lines(m),
         "splits      " + ", ".join(f"{k}={v['samples']} ({v['source_images']} images)"
                                    for k, v in m["splits"].items() if isinstance(v, dict)),
         "", "experts (metrics on the test split, vs FP):"]
    for e in m["experts"]:
        r = e["recipe"]
        t = e["metrics"]["test"]
        L.append(f"  {e['name']:<14} " + _recipe(r))
        L.append("  " + " " * 15 + "  ".join(f"{k}={_fmt(v)}" for k, v in t.items()))
        for bname, v in e["variants"].items():
            line = f"  {'':<15}{bname}: {v['format']} W{v.get('weight_bits', 8)} reduce_range={v['reduce_range']}"
            check = v.get("check")
            if check is not None:
                line += f" check-qdq={'ok' if check['ok'] else 'FAIL'}"
            if "kernels" in v:
                line += f" kernels={v['kernels']['integer']}" + (f" float={v['kernels']['float']}" if v["kernels"]["float"] else "")
            if v.get("excluded_nodes"):
                line += f" FP nodes={v['excluded_nodes']}"
            L.append(line)
        if e.get("steps"):
            L.append(f"  {'':<15}steps: " + ", ".join(f"{k}={v}" for k, v in e["steps"].items()))
    rc = m["router"]["config"]
    attention = f"heads {rc['heads']}x{rc['head_dim']}" if rc.get("heads") else "no attention"
    preset = f" ({rc['preset']})" if rc.get("preset") else ""
    L += ["", f"router      {rc['arch']}{preset} input {rc['input_size']}px channels {rc['channels']} "
              f"{attention} epochs {rc['epochs']} (best {m['router']['best_epoch']})"]
    rep = m.get("report", {})
    if rep.get("build_seconds"):
        L.append("build time  " + ", ".join(f"{k} {v:.1f}s" for k, v in rep["build_seconds"].items()))
    L += frontier_section(b.root, m)
    L += ["", "files:"]
    for rel, meta in sorted(m["files"].items()):
        L.append(f"  {rel:<48} {meta['size']:>11,d} B  sha256 {meta['sha256'][:16]}…")
    return "\n".join(L)
