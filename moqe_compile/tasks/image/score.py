"""Per-sample loss matrix of every expert, the oracle, and each expert's metrics vs FP.

L[i, k] is the cross-entropy of the label (targets = "labels") or KL(p_fp || p_k) to the
FP model's output (targets = "fp"; deployment data rarely has labels). The oracle picks
argmin_k L[i, k]; its metrics bound what any router can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moqe_compile.evaluate.losses import sample_losses


def expert_metrics(logits: np.ndarray, fp_logits: np.ndarray, labels: np.ndarray | None) -> dict:
    a, b = logits.astype(np.float64), fp_logits.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    m = {
        "n": int(len(a)),
        "fp_top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "output_cosine": float(cos.mean()),
        "kl_to_fp": float(sample_losses(a, b, None, "fp").mean()),
    }
    if labels is not None:
        m["top1"] = float((a.argmax(-1) == labels).mean())
    return m


@dataclass
class Scores:
    fp_logits: np.ndarray  # (N, C)
    expert_logits: np.ndarray  # (K, N, C)
    loss: np.ndarray  # (N, K)

    @property
    def oracle(self) -> np.ndarray:
        return self.loss.argmin(axis=1)


def run_batched(session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """``session`` is a backend Session (``run(x) -> y``)."""
    return np.concatenate([session.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def score(fp_session, expert_sessions: list, x: np.ndarray, labels: np.ndarray | None,
          targets: str, progress=None) -> Scores:
    fp = run_batched(fp_session, x)
    if progress:
        progress.update(1)
    outs = []
    for s in expert_sessions:
        outs.append(run_batched(s, x))
        if progress:
            progress.update(1)
    ex = np.stack(outs)
    loss = np.stack([sample_losses(e, fp, labels, targets) for e in ex], axis=1)
    return Scores(fp, ex, loss)


def diversity(expert_logits: np.ndarray, names: list[str], fp_logits: np.ndarray, labels: np.ndarray | None) -> dict:
    """How differently the experts err: pairwise top-1 disagreement, and the oracle (a sample
    counts when any expert gets it right; without labels, right = agrees with FP) vs the best
    single expert on the same samples. This is the headroom any router can win — and the
    design notes show it is largely a lottery unless compared with perturbed copies."""
    preds = expert_logits.argmax(-1)  # (K, N)
    target = labels if labels is not None else fp_logits.argmax(-1)
    correct = preds == target[None, :]
    single = correct.mean(axis=1)
    best = int(single.argmax())
    pair = {f"{names[a]}|{names[b]}": float((preds[a] != preds[b]).mean())
            for a in range(len(names)) for b in range(a + 1, len(names))}
    oracle = float(correct.any(axis=0).mean())
    return {"metric": "top1" if labels is not None else "fp_top1_agreement",
            "pairwise_disagreement": pair,
            "mean_pairwise_disagreement": float(np.mean(list(pair.values()))) if pair else 0.0,
            "best_single": names[best], "best_single_value": float(single[best]), "oracle_value": oracle,
            "oracle_gain": oracle - float(single[best])}
