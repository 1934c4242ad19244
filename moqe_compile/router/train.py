"""Train the router on a loss matrix; keep the epoch with the lowest validation routed loss."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RouterConfig
from .cv import CVRouterCore, downsample


@dataclass
class TrainResult:
    core: CVRouterCore
    best_epoch: int
    history: list[dict]


def _targets(loss: np.ndarray, temperature: float) -> torch.Tensor:
    L = torch.from_numpy(loss).float()
    if temperature > 0:
        return torch.softmax(-L / temperature, dim=1)
    return F.one_hot(L.argmin(1), L.shape[1]).float()


@torch.no_grad()
def predict(core: CVRouterCore, xs: torch.Tensor, batch: int = 256) -> np.ndarray:
    core.eval()
    return torch.cat([torch.softmax(core(xs[i : i + batch]), -1) for i in range(0, len(xs), batch)]).numpy()


def small_inputs(x: np.ndarray, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([downsample(torch.from_numpy(x[i : i + 64]), size) for i in range(0, len(x), 64)])


def train_router(cfg: RouterConfig, x_train: np.ndarray, loss_train: np.ndarray, x_val: np.ndarray,
                 loss_val: np.ndarray, progress=None) -> TrainResult:
    torch.manual_seed(cfg.seed)
    K = loss_train.shape[1]
    core = CVRouterCore(cfg, K)
    xt, xv = small_inputs(x_train, cfg.input_size), small_inputs(x_val, cfg.input_size)
    yt = _targets(loss_train, cfg.soft_temperature)
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_loss, best_epoch, history = None, float("inf"), -1, []
    idx_v = np.arange(len(loss_val))
    for epoch in range(cfg.epochs):
        core.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            if len(b) < 2:  # BatchNorm cannot train on a single sample
                continue
            logits = core(xt[b])
            loss = -(yt[b] * F.log_softmax(logits, -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        sched.step()
        route = predict(core, xv).argmax(1)
        val_loss = float(loss_val[idx_v, route].mean())
        history.append({"epoch": epoch, "train_ce": total / len(xt), "val_routed_loss": val_loss,
                        "val_router_accuracy": float((route == loss_val.argmin(1)).mean())})
        if val_loss < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(core.state_dict()), val_loss, epoch
        if progress:
            progress.update(1)
    core.load_state_dict(best)
    core.eval()
    return TrainResult(core, best_epoch, history)
