"""Language models: run the FP decoder and every expert over token windows -> per-sequence loss
matrix (mean next-token NLL, docs/design.md#the-loss-matrix) plus per-sequence KL(FP || expert) and top-1 agreement.

numpy + onnxruntime only: the runtime and ``moqe-compile eval`` score with this same code.
Sequences run one at a time: dynamic W8A8 experts quantize activations per tensor, so a
batched score would depend on which other sequences share the batch (and a served request
runs alone too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile.bundle.reader import Graph
from moqe_compile.evaluate.losses import log_softmax


class DecoderSession:
    """One ONNX decoder graph (``tasks/causal_lm/model.py`` layout) on ONNX Runtime CPU."""

    def __init__(self, name: str, path: Path | Graph, layers: int, kv_heads: int, head_dim: int, threads: int = 0,
                 add_shared=None):
        """``path``: a graph file, or a bundle ``Graph`` (verified bytes: ONNX Runtime never opens
        the file, and the graph brings its shared tensors). ``add_shared(SessionOptions)``:
        supplies initializers the bundle stores once (bundle/shared_weights.py), e.g. the FP
        embedding table."""
        from moqe_compile.backends.onnxruntime_cpu import session

        if isinstance(path, Graph):
            add_shared, src, what = path.configure, path.model, path.rel
        else:
            src, what = Path(path), str(path)
        self.sess = session(src, threads=threads, add_shared=add_shared, name=f"{name} ({what})")
        self.name, self.layers, self.kv_heads, self.head_dim = name, layers, kv_heads, head_dim
        self.past_names = [i.name for i in self.sess.get_inputs()][2:]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, past))})
        return out[0], out[1:]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(B, T, V) logits of whole sequences (no padding), empty past."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self.step(ids, np.ones_like(ids), self.empty_past(len(ids)))[0]


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(B, T-1) next-token negative log-likelihood."""
    lp = log_softmax(logits[:, :-1], dtype=None)
    return -np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]


@dataclass
class LMScores:
    nll: np.ndarray  # (N,) FP mean token NLL
    loss: np.ndarray  # (N, K) experts' mean token NLL
    kl: np.ndarray  # (N, K) mean per-token KL(FP || expert)
    agree: np.ndarray  # (N, K) share of tokens whose argmax equals FP's
    # (N,) mean token NLL of the output-averaging mixture of the first ``mix_of`` experts (the
    # authors' soft mixture: every expert runs, next-token probabilities averaged): a control.
    mix: np.ndarray | None = None

    def to_npz(self, prefix: str) -> dict:
        return {f"{prefix}_{k}": getattr(self, k) for k in ("nll", "loss", "kl", "agree", "mix")
                if getattr(self, k) is not None}

    def columns(self, sl: slice) -> "LMScores":
        """The same windows, experts ``sl`` only (the mixture column is not per expert: dropped)."""
        return LMScores(self.nll, self.loss[:, sl], self.kl[:, sl], self.agree[:, sl])


def score_windows(fp: DecoderSession | None, experts: list[DecoderSession], ids: np.ndarray, progress=None,
                  mix_of: int | None = None, detail_of: int | None = None) -> LMScores:
    """``mix_of``: how many leading experts the mixture control averages (None: all; 0: none).
    ``detail_of``: how many leading experts also get KL to FP and top-1 agreement (None: all); the
    others (controls that only need their loss, e.g. the copies) get NaN there. ``fp = None``: no
    FP pass (where only the experts' losses are needed): FP NLL, KL and agreement are NaN."""
    n, k = len(ids), len(experts)
    m = k if mix_of is None else mix_of
    d = 0 if fp is None else k if detail_of is None else detail_of
    nll, loss, kl, agree = np.full(n, np.nan), np.zeros((n, k)), np.full((n, k), np.nan), np.full((n, k), np.nan)
    mix = np.zeros(n) if m else None
    buf: dict[str, np.ndarray] = {}
    for i in range(n):
        x = ids[i : i + 1]
        if fp is not None:
            # float32 throughout: a 256-token window is 12.6 M logits for SmolLM2, and float64 here
            # cost about as much as the expert's forward pass on 2 cores.
            logits = fp.logits(x)[:, :-1]
            flp = log_softmax(logits, dtype=None, scratch=_like(buf, "scratch", logits))
            fp_top = flp.argmax(-1)
            nll[i] = -np.take_along_axis(flp, x[:, 1:, None], -1).mean()
            p = np.exp(flp, out=_like(buf, "p", flp))
        tgt = []
        for j, e in enumerate(experts):
            logits = e.logits(x)[:, :-1]
            scratch = _like(buf, "scratch", logits)
            elp = log_softmax(logits, dtype=None, scratch=scratch)
            t = np.take_along_axis(elp, x[:, 1:, None], -1)[..., 0].astype(np.float64)
            loss[i, j] = -t.mean()
            if j < m:
                tgt.append(t)
            if j < d:
                agree[i, j] = (elp.argmax(-1) == fp_top).mean()
                np.subtract(flp, elp, out=scratch)
                scratch *= p
                kl[i, j] = scratch.sum(-1, dtype=np.float64).mean()
        if m:
            t = np.stack(tgt)  # (m, 1, T-1) log p_j(next token)
            top = t.max(0)
            mix[i] = -(top + np.log(np.exp(t - top).mean(0))).mean()
        if progress is not None:
            progress.update(1)
    return LMScores(nll, loss, kl, agree, mix)


def _like(buf: dict, key: str, a: np.ndarray) -> np.ndarray:
    """``buf[key]``: a buffer of ``a``'s shape and dtype, reused while windows keep their length."""
    b = buf.get(key)
    if b is None or b.shape != a.shape:
        b = buf[key] = np.empty_like(a)
    return b
