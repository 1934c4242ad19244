"""Task-free pieces of every MoQE report: one paired bootstrap table over all per-sample
vectors of a split, the statistics read from it, and their Markdown formatting.

A report resamples every vector (each model's metrics, each control, each difference) with
the same resamples, so all of its intervals and paired p-values are paired
(docs/design.md#controls-and-the-gate).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from moqe_compile.bundle.manifest import check_outside
from moqe_compile.errors import InputError
from moqe_compile.evaluate.stats import bootstrap_means, bootstrap_p_value, is_clustered

MIN_UNITS = 30  # fewer independent samples (or source images) than this: intervals are not to be trusted
RATE_METRICS = ("top1", "fp_top1_agreement")  # 0/1 per sample, shown in percent
METRIC_TITLES = {"top1": "top-1", "fp_top1_agreement": "FP top-1 agreement", "kl_to_fp": "KL to FP",
                 "output_cosine": "output cosine", "mean_loss": "mean loss"}


class BootstrapTable:
    """Means and percentile intervals of named per-sample vectors from one set of resamples.

    ``vectors``: key -> (N,) vector; ``groups``: optional source id per sample (the bootstrap
    then resamples sources, see :func:`moqe_compile.evaluate.stats.is_clustered`)."""

    def __init__(self, vectors: dict, n_boot: int, seed: int, groups=None, level: float = 0.95):
        self.keys = list(vectors)
        n = len(next(iter(vectors.values())))
        mat = np.stack([vectors[k] for k in self.keys])
        self.clustered = is_clustered(groups, n)
        self.boot = bootstrap_means(mat, n_boot, seed, groups if self.clustered else None)
        q = np.quantile(self.boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
        self.stat = {k: {"value": float(mat[j].mean()), "ci95": [float(q[0, j]), float(q[1, j])]}
                     for j, k in enumerate(self.keys)}
        self.units = int(len(np.unique(np.asarray(groups)))) if self.clustered else int(n)

    def __getitem__(self, key) -> dict:
        return self.stat[key]

    def value(self, key) -> float:
        return self.stat[key]["value"]

    def resamples(self, key) -> np.ndarray:
        return self.boot[:, self.keys.index(key)]

    def p_value(self, key) -> float:
        """Paired-bootstrap p-value of a difference vector's mean being 0."""
        return bootstrap_p_value(self.value(key), self.resamples(key))

    def diff(self, key, metric: str) -> dict:
        return {"metric": metric, "diff": self.value(key), "ci95": self.stat[key]["ci95"]}


def default_out(bundle: str | Path) -> Path:
    """Where ``eval`` writes by default: ``<bundle>-eval`` beside the bundle."""
    b = Path(bundle).resolve()
    return b.with_name(b.name + "-eval")


def prepare_out(root: Path, out: str | Path | None, option: str = "--out") -> Path:
    """The report folder, checked before anything is scored (a bad ``--out`` used to fail only
    after the whole evaluation): outside the bundle, and a writable directory or creatable in
    one. Not created here, so an evaluation that fails leaves nothing behind; the writer makes it."""
    out_dir = check_outside(root, out or default_out(root), option)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{option} {str(out_dir)!r} exists and is not a directory; choose a directory.")
    try:
        existing = out_dir
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"{option} {str(out_dir)!r} cannot be created or written: {e.strerror or e}; "
                         "choose a writable directory.") from e
    return out_dir


def headroom(moqe: float, best: float, oracle: float) -> float | None:
    """(MoQE - best) / (oracle - best): the share of the oracle's headroom MoQE captures."""
    den = oracle - best
    return None if abs(den) < 1e-12 else float((moqe - best) / den)


def unit_warnings(units: int, clustered: bool) -> list[str]:
    if units >= MIN_UNITS:
        return []
    return [f"only {units} independent {'source images' if clustered else 'samples'}: bootstrap "
            f"intervals and p-values are unreliable below about {MIN_UNITS} (they understate the "
            "uncertainty); treat every number here as descriptive."]


def flat_metrics(entry: dict, n: int) -> dict:
    """``{"n", metric: value}`` of one report entry (the manifest's ``experts[].metrics.test``)."""
    return {"n": int(n), **{k: v["value"] for k, v in entry.items() if isinstance(v, dict) and "value" in v}}


# ---------------------------------------------------------------- Markdown


def fmt(metric: str, v: float) -> str:
    if metric in RATE_METRICS:
        return f"{100 * v:.2f}"
    return f"{v:.4f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"


def cell(metric: str, m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{fmt(metric, m['value'])} [{fmt(metric, lo)}, {fmt(metric, hi)}]"


def signed(metric: str, v: float) -> str:
    if metric in RATE_METRICS:
        return f"{100 * v:+.2f}"
    return f"{v:+.4f}" if v == 0 or abs(v) >= 0.01 else f"{v:+.3g}"


def diff_text(metric: str, d: dict) -> str:
    unit = " points" if metric in RATE_METRICS else ""
    return f"{signed(metric, d['diff'])}{unit} [95% CI {signed(metric, d['ci95'][0])}, {signed(metric, d['ci95'][1])}]"


def p_text(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else "< 0.001"


def loss_title(targets: str) -> str:
    return "cross-entropy" if targets == "labels" else "KL to FP"


def latency_markdown(lat: dict) -> str:
    rows = lat["batches"]
    first = next(iter(rows.values()))
    cands = [k for k in first if isinstance(first[k], dict) and "median_ms" in first[k]]
    L = [f"Latency, ONNX Runtime CPU, median ms over {lat['repeats']} interleaved rounds ({lat.get('cpu', '')}):", "",
         "| batch | " + " | ".join(cands) + " |", "|---:|" + "---:|" * len(cands)]
    for bs, row in rows.items():
        L.append(f"| {bs} | " + " | ".join(f"{row[c]['median_ms']:.2f}" for c in cands) + " |")
    return "\n".join(L)


class ControlsText:
    """How a task phrases each control of a report's ``controls`` in Markdown. Each method
    returns the lines of its control; the defaults say nothing. :func:`controls_markdown`
    walks the controls in one order for every task."""

    def random_router(self, r: dict) -> list[str]:
        return []

    def mixture(self, m: dict) -> list[str]:
        return []

    def corpus_route(self, key: str, r: dict) -> list[str]:
        return []

    def copies(self, co: dict) -> list[str]:
        return []

    def copies_router(self, co: dict) -> list[str]:
        return []

    def no_copies(self) -> list[str]:
        return []

    def cost_matched(self, cm: dict) -> list[str]:
        return []

    def cost_not_applicable(self, cm: dict) -> list[str]:
        return []


def controls_markdown(ctl: dict, text: ControlsText) -> list[str]:
    """The Markdown lines of a report's ``controls``: random router, mixture, the corpus
    routes (where the data has several corpora), copies (their oracle, the router trained on
    them), cost-matched."""
    L = []
    if ctl.get("random_router"):
        L += text.random_router(ctl["random_router"])
    if ctl.get("mixture"):
        L += text.mixture(ctl["mixture"])
    for key in ("true_corpus", "corpus_oracle"):
        if ctl.get(key):
            L += text.corpus_route(key, ctl[key])
    co = ctl.get("copies_oracle")
    if co:
        L += text.copies(co)
        if co.get("router"):
            L += text.copies_router(co)
    else:
        L += text.no_copies()
    cm = ctl.get("cost_matched") or {}
    if cm.get("applicable"):
        L += text.cost_matched(cm)
    elif cm:
        L += text.cost_not_applicable(cm)
    return L
