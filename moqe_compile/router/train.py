"""The one router training loop: both tasks' routers train here on a loss matrix, keeping the
epoch with the lowest validation routed loss. The task supplies the network and its inputs
(``tasks/<task>/router.py``); this module knows tensors and numbers only.

Targets, from a per-sample matrix M[i, k]:
  hard        one-hot argmin_k L[i, k] (L = the build's loss matrix);
  soft        softmax(-L[i, :] / T);
  fp-teacher  softmax(-KL[i, :] / T) with KL[i, k] = KL(p_fp || p_k), the per-sample divergence
              of expert k from the FP model: needs no labels (equals "soft" when the build's
              loss is already KL-to-FP, ``[data] targets = "fp"``).

Stabilizers (:class:`Stabilizers`), applied to the *training* logits only; the
router that is validated and exported is the plain network:
  balance     + balance_weight * K * sum_k f_k * P_k (Switch Transformer): f_k the share of the
              batch routed to k (argmax of the training logits, no gradient), P_k the mean
              router probability of k. Its gradient lowers the probability of over-used experts.
  usage-bias  an EMA of f (decay usage_bias_decay, started uniform) is fed back into the
              training logits: z + usage_bias_strength * log(K * u). The log keeps the bias
              zero for balanced usage. Training on z + bias and serving z is logit
              adjustment (Menon et al., 2021): the experts the router over-uses get a head
              start in training, so the network need not learn their prior and the served
              logits z favour them less. The opposite sign (subtracting usage from the
              training logits) trains z to absorb the bias and makes the served router
              collapse more (tests/router/test_stabilizers.py constructs that case).
  noise       z + N(0, s^2) with s decaying linearly from noise_std to 0 over training.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Routers are tiny: torch's intra-op threads cost more in hand-offs than they save, and far more
# when other processes share the cores (docs/results.md#demo-bundle-build-time-and-cpu-latency).
TRAIN_THREADS = 1


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (``None``: leave them), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Stabilizers:
    """Which training-logit stabilizers run, and their strengths (the module docstring)."""

    names: tuple[str, ...] = ()
    balance_weight: float = 0.0
    usage_bias_strength: float = 0.0
    usage_bias_decay: float = 0.9
    noise_std: float = 0.0


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    history: list[dict]
    final_usage_ema: list[float] = field(default_factory=list)


def make_targets(matrix: np.ndarray, kind: str, temperature: float) -> torch.Tensor:
    """(N, K) loss-like matrix (lower is better) -> (N, K) target distribution."""
    M = torch.from_numpy(np.asarray(matrix, np.float64)).float()
    if kind == "hard":
        return F.one_hot(M.argmin(1), M.shape[1]).float()
    return torch.softmax(-M / temperature, dim=1)


@torch.no_grad()
def predict(model: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int = 256) -> np.ndarray:
    """Router probabilities (N, K) for the tensors ``inputs`` (the model's positional arguments)."""
    model.eval()
    n = len(inputs[0])
    return torch.cat([torch.softmax(model(*(t[i : i + batch] for t in inputs)), -1)
                      for i in range(0, n, batch)]).numpy()


def usage_entropy(route: np.ndarray, num_experts: int) -> float:
    """Entropy (nats) of the share of samples routed to each expert: 0 = one expert only."""
    f = np.bincount(route, minlength=num_experts) / max(1, len(route))
    f = f[f > 0]
    return float(-(f * np.log(f)).sum())


def fit(model: nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor,
        val_inputs: tuple[torch.Tensor, ...], val_loss: np.ndarray, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float, seed: int, stabilizers: Stabilizers | None = None, min_batch: int = 1,
        predict_batch: int = 256, progress=None, threads: int | None = TRAIN_THREADS) -> FitResult:
    """AdamW + cosine schedule on soft or one-hot ``targets`` (N, K); after each epoch the
    validation routed loss mean_i val_loss[i, argmax router] is measured and the best epoch's
    weights are kept. ``min_batch``: smaller trailing batches are skipped (BatchNorm cannot
    train on one sample)."""
    with torch_threads(threads):
        return _fit(model, inputs, targets, val_inputs, val_loss, epochs, batch_size, lr, weight_decay, seed,
                    stabilizers or Stabilizers(), min_batch, predict_batch, progress)


def _fit(model, inputs, targets, val_inputs, val_loss, epochs, batch_size, lr, weight_decay, seed, stab,
         min_batch, predict_batch, progress) -> FitResult:
    torch.manual_seed(seed)
    K, n = targets.shape[1], len(targets)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    usage = torch.full((K,), 1.0 / K)  # EMA of the share of each batch routed to each expert
    steps_per_epoch = max(1, sum(1 for i in range(0, n, batch_size) if n - i >= min_batch))
    total_steps, step = epochs * steps_per_epoch, 0
    best, best_loss, best_epoch, history = None, float("inf"), -1, []
    idx_v = np.arange(len(val_loss))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, total_aux, n_seen = 0.0, 0.0, 0
        for i in range(0, n, batch_size):
            b = perm[i : i + batch_size]
            if len(b) < min_batch:
                continue
            z = _stabilized(model(*(t[b] for t in inputs)), stab, usage, step / total_steps, gen)
            ce = -(targets[b] * F.log_softmax(z, -1)).sum(-1).mean()
            loss = ce
            with torch.no_grad():
                f = F.one_hot(z.argmax(-1), K).float().mean(0)
            if "balance" in stab.names:
                aux = K * (f * torch.softmax(z, -1).mean(0)).sum()
                loss = loss + stab.balance_weight * aux
                total_aux += aux.item() * len(b)
            usage = stab.usage_bias_decay * usage + (1.0 - stab.usage_bias_decay) * f
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += ce.item() * len(b)
            n_seen += len(b)
            step += 1
        sched.step()
        route = predict(model, val_inputs, predict_batch).argmax(1)
        routed = float(val_loss[idx_v, route].mean())
        h = {"epoch": epoch, "train_ce": total / max(1, n_seen), "val_routed_loss": routed,
             "val_router_accuracy": float((route == val_loss.argmin(1)).mean()),
             "val_usage_entropy": usage_entropy(route, K)}
        if "balance" in stab.names:
            h["train_balance_aux"] = total_aux / max(1, n_seen)
        history.append(h)
        if routed < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(model.state_dict()), routed, epoch
        if progress:
            progress.update(1)
    model.load_state_dict(best)
    model.eval()
    return FitResult(model, best_epoch, history, [round(float(u), 4) for u in usage])


def _stabilized(z: torch.Tensor, stab: Stabilizers, usage: torch.Tensor, progress: float,
                gen: torch.Generator) -> torch.Tensor:
    """The training logits after the noise and usage-bias stabilizers (served logits are ``z``)."""
    if "noise" in stab.names and stab.noise_std > 0:
        z = z + stab.noise_std * max(0.0, 1.0 - progress) * torch.randn(z.shape, generator=gen)
    if "usage-bias" in stab.names:
        z = z + stab.usage_bias_strength * torch.log(len(usage) * usage.clamp_min(1e-6))
    return z
