"""Train the router on a loss matrix; keep the epoch with the lowest validation routed loss.

Targets (``RouterConfig.targets``), from a per-sample matrix M[i, k]:
  hard        one-hot argmin_k L[i, k] (L = the build's loss matrix);
  soft        softmax(-L[i, :] / T);
  fp-teacher  softmax(-KL[i, :] / T) with KL[i, k] = KL(p_fp || p_k), the per-sample divergence
              of expert k from the FP model: needs no labels (equals "soft" when the build's
              loss is already KL-to-FP, ``[data] targets = "fp"``).

Stabilizers (``RouterConfig.stabilizers``), applied to the *training* logits only; the
router that is validated and exported is the plain network:
  balance     + balance_weight * K * sum_k f_k * P_k (Switch Transformer): f_k the share of the
              batch routed to k (argmax of the training logits, no gradient), P_k the mean
              router probability of k. Its gradient lowers the probability of over-used experts.
  usage-bias  an EMA of f (decay usage_bias_decay, started uniform) is fed back into the
              training logits: z + usage_bias_strength * log(K * u). The log keeps the bias
              zero for balanced usage. Training on z + bias and serving z is logit
              adjustment (Menon et al., 2021): the experts the router over-uses get a head
              start in training, so the network need not learn their prior and the served
              logits z favour them less. (Applying the bias with the opposite sign, i.e.
              subtracting usage from the training logits, trains z to *absorb* the bias and
              makes the served router collapse more: measured on the constructed case of
              tests/router/test_stabilizers.py.)
  noise       z + N(0, s^2) with s decaying linearly from noise_std to 0 over training.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from moqe_compile.tasks.image.config import RouterConfig
from moqe_compile.tasks.image.router import CVRouterCore, downsample


# Routers are tiny: torch's intra-op threads cost more in hand-offs than they save, and far
# more when other processes share the cores (measured on 2 busy cores: 10 epochs of the default
# router on 225 images took 9-11 s on one thread, 40-63 s on two).
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
class TrainResult:
    core: CVRouterCore
    best_epoch: int
    history: list[dict]
    final_usage_ema: list[float] = field(default_factory=list)


def make_targets(matrix: np.ndarray, kind: str, temperature: float) -> torch.Tensor:
    """(N, K) loss-like matrix (lower is better) -> (N, K) target distribution."""
    M = torch.from_numpy(np.asarray(matrix, np.float64)).float()
    if kind == "hard":
        return F.one_hot(M.argmin(1), M.shape[1]).float()
    return torch.softmax(-M / temperature, dim=1)


def kl_to_fp_matrix(fp_logits: np.ndarray, expert_logits: np.ndarray) -> np.ndarray:
    """(N, K) per-sample KL(p_fp || p_k) from Scores' logits ((N, C) and (K, N, C))."""
    from moqe_compile.evaluate.losses import sample_losses

    return np.stack([sample_losses(e, fp_logits, None, "fp") for e in expert_logits], axis=1)


@torch.no_grad()
def predict(core: CVRouterCore, xs: torch.Tensor, batch: int = 256) -> np.ndarray:
    core.eval()
    return torch.cat([torch.softmax(core(xs[i : i + batch]), -1) for i in range(0, len(xs), batch)]).numpy()


def small_inputs(x: np.ndarray, size: int, mode: str = "avgpool") -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([downsample(torch.from_numpy(x[i : i + 64]), size, mode) for i in range(0, len(x), 64)])


def usage_entropy(route: np.ndarray, num_experts: int) -> float:
    """Entropy (nats) of the share of samples routed to each expert: 0 = one expert only."""
    f = np.bincount(route, minlength=num_experts) / max(1, len(route))
    f = f[f > 0]
    return float(-(f * np.log(f)).sum())


def train_router(cfg: RouterConfig, x_train: np.ndarray, loss_train: np.ndarray, x_val: np.ndarray,
                 loss_val: np.ndarray, progress=None, target_matrix: np.ndarray | None = None,
                 threads: int | None = TRAIN_THREADS) -> TrainResult:
    """``loss_train``/``loss_val``: (N, K) loss matrices (the build's L); the validation routed
    loss mean_i L_val[i, argmax router] picks the epoch kept. ``target_matrix``: the (N, K)
    matrix the targets are made from when it is not ``loss_train`` (``fp-teacher`` on
    labelled data: the KL-to-FP matrix). ``threads``: torch intra-op threads while training."""
    with torch_threads(threads):
        return _train(cfg, x_train, loss_train, x_val, loss_val, progress, target_matrix)


def _train(cfg, x_train, loss_train, x_val, loss_val, progress, target_matrix) -> TrainResult:
    torch.manual_seed(cfg.seed)
    K = loss_train.shape[1]
    core = CVRouterCore(cfg, K, in_channels=x_train.shape[1])
    xt = small_inputs(x_train, cfg.input_size, cfg.downsample)
    xv = small_inputs(x_val, cfg.input_size, cfg.downsample)
    yt = make_targets(loss_train if target_matrix is None else target_matrix, cfg.targets, cfg.temperature)
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    stab = set(cfg.stabilizers)
    usage = torch.full((K,), 1.0 / K)  # EMA of the share of each batch routed to each expert
    steps_per_epoch = max(1, sum(1 for i in range(0, len(xt), cfg.batch_size) if len(xt) - i >= 2))
    total_steps, step = cfg.epochs * steps_per_epoch, 0
    best, best_loss, best_epoch, history = None, float("inf"), -1, []
    idx_v = np.arange(len(loss_val))
    for epoch in range(cfg.epochs):
        core.train()
        perm = torch.randperm(len(xt), generator=gen)
        total, total_aux, n_seen = 0.0, 0.0, 0
        for i in range(0, len(xt), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            if len(b) < 2:  # BatchNorm cannot train on a single sample
                continue
            z = core(xt[b])
            if "noise" in stab and cfg.noise_std > 0:
                std = cfg.noise_std * max(0.0, 1.0 - step / total_steps)
                z = z + std * torch.randn(z.shape, generator=gen)
            if "usage-bias" in stab:
                z = z + cfg.usage_bias_strength * torch.log(K * usage.clamp_min(1e-6))
            ce = -(yt[b] * F.log_softmax(z, -1)).sum(-1).mean()
            loss = ce
            with torch.no_grad():
                f = F.one_hot(z.argmax(-1), K).float().mean(0)
            if "balance" in stab:
                aux = K * (f * torch.softmax(z, -1).mean(0)).sum()
                loss = loss + cfg.balance_weight * aux
                total_aux += aux.item() * len(b)
            usage = cfg.usage_bias_decay * usage + (1.0 - cfg.usage_bias_decay) * f
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += ce.item() * len(b)
            n_seen += len(b)
            step += 1
        sched.step()
        route = predict(core, xv).argmax(1)
        val_loss = float(loss_val[idx_v, route].mean())
        h = {"epoch": epoch, "train_ce": total / max(1, n_seen), "val_routed_loss": val_loss,
             "val_router_accuracy": float((route == loss_val.argmin(1)).mean()),
             "val_usage_entropy": usage_entropy(route, K)}
        if "balance" in stab:
            h["train_balance_aux"] = total_aux / max(1, n_seen)
        history.append(h)
        if val_loss < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(core.state_dict()), val_loss, epoch
        if progress:
            progress.update(1)
    core.load_state_dict(best)
    core.eval()
    return TrainResult(core, best_epoch, history, [round(float(u), 4) for u in usage])


__all__ = ["TrainResult", "make_targets", "kl_to_fp_matrix", "predict", "small_inputs", "usage_entropy",
           "train_router", "torch_threads", "TRAIN_THREADS"]
