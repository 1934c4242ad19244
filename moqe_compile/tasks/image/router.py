"""The image router (``docs/design.md#routers``): a ResNet-8 over a downsampled image, then
(``arch = "se-resnet8-attn"``) self-attention over its positions, or (``"se-resnet8"``) just
their mean, then K logits.

The downsampling is part of the exported graph, so the router ONNX takes the same
preprocessed NCHW tensor as the experts and the runtime feeds one array to both.

Presets (``RouterConfig.preset``, values in ``presets.ROUTER_PRESETS``):

- ``paper``: the image average-pooled to 32x32, stages 16/32/64 with squeeze-excite in
  every block, 8 heads x 8 over the 8x8 positions (the source paper's shape).
- ``small``: the image *subsampled* (the centre pixel of each k x k cell) to 16x16, stages
  8/16/32, no squeeze-excite, 1 head x 32 over 4x4 positions. ``compact``: the same at
  16/32/64 with 1 head x 64.
- ``tiny``: ``small`` without the attention block.

Built for the latency budget (router <= 5% of one expert, bench/router_presets.py): at batch 1
ONNX Runtime's per-op overhead, paid again with cold caches after each expert run, and the
full-resolution average pool dominate, so the small presets cut ops, not FLOPs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moqe_compile.router.train import FitResult, Stabilizers, fit, make_targets, predict
from moqe_compile.tasks.image.config import RouterConfig


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(4, c // r), 1), nn.Conv2d(max(4, c // r), c, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SEBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, se: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return F.relu(y + self.short(x))


class TemperatureAttention(nn.Module):
    """Self-attention whose logit scale is a learned temperature (init 1/sqrt(head_dim)).

    Written so the exported graph stays short (Reshape, Transpose, Split; one head needs
    none of them): ONNX Runtime pays a few microseconds per op at batch 1.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(1.0 / math.sqrt(head_dim))))

    def forward(self, x):  # x: (B, T, C)
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        qkv = self.qkv(self.norm(x))  # (B, T, 3*H*D), columns ordered (3, H, D)
        if H == 1:
            q, k, v = qkv.split(D, dim=-1)  # (B, T, D) each
            att = torch.softmax((q @ k.transpose(-2, -1)) * self.log_tau.exp(), dim=-1)  # (B, T, T)
            return x + self.proj(att @ v)
        q, k, v = qkv.reshape(B, T, 3 * H, D).transpose(1, 2).split(H, dim=1)  # (B, H, T, D) each
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.log_tau.exp(), dim=-1)  # (B, H, T, T)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        return x + self.proj(y)


class CVRouterCore(nn.Module):
    """Operates on the already-downsampled image (B, in_channels, s, s); used for training."""

    def __init__(self, cfg: RouterConfig, num_experts: int, in_channels: int = 3):
        super().__init__()
        c1, c2, c3 = cfg.channels
        se = cfg.se
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.stages = nn.Sequential(SEBasicBlock(c1, c1, 1, se[0]), SEBasicBlock(c1, c2, 2, se[1]),
                                    SEBasicBlock(c2, c3, 2, se[2]))
        self.attn = TemperatureAttention(c3, cfg.heads, cfg.head_dim) if cfg.attention else None
        self.head = nn.Linear(c3, num_experts)

    def forward(self, x):
        f = self.stages(self.stem(x))  # (B, c3, s/4, s/4)
        if self.attn is None:
            return self.head(f.mean(dim=(2, 3)))
        t = f.flatten(2).transpose(1, 2)  # (B, T, c3)
        return self.head(self.attn(t).mean(dim=1))


def downsample(x: torch.Tensor, size: int, mode: str = "avgpool") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size). ``avgpool``: mean over each k x k cell (bilinear
    resize when H is not a multiple of ``size``); ``subsample``: the centre pixel of each cell,
    pixel floor((i + 1/2) * H / size) (a strided Slice in ONNX when H is a multiple of ``size``,
    a Gather of those rows and columns otherwise: reads 1/k of the rows, not the whole image)."""
    if mode == "subsample":
        if x.shape[-1] % size == 0 and x.shape[-2] % size == 0:
            kh, kw = x.shape[-2] // size, x.shape[-1] // size
            return x[:, :, kh // 2 :: kh, kw // 2 :: kw]
        # Not F.interpolate("nearest"): its ONNX Resize picks other pixels than torch does
        # (the export check failed at 28 -> 16 px); constant indices export as they run.
        rows, cols = (torch.tensor(centres(n, size)) for n in x.shape[-2:])
        return x.index_select(2, rows).index_select(3, cols)
    if x.shape[-1] % size == 0:
        k = x.shape[-1] // size
        return F.avg_pool2d(x, k)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def centres(n: int, size: int) -> list[int]:
    """The centre pixel of each of ``size`` equal cells of ``n`` pixels."""
    return [(2 * i + 1) * n // (2 * size) for i in range(size)]


class CVRouter(nn.Module):
    """Exported form: full preprocessed image in, expert probabilities out."""

    def __init__(self, core: CVRouterCore, input_size: int, mode: str = "avgpool"):
        super().__init__()
        self.core, self.input_size, self.mode = core, input_size, mode

    def forward(self, x):
        return torch.softmax(self.core(downsample(x, self.input_size, self.mode)), dim=-1)


def small_inputs(x: np.ndarray, size: int, mode: str = "avgpool") -> torch.Tensor:
    """The router's downsampled view of preprocessed images, computed once for training."""
    with torch.no_grad():
        return torch.cat([downsample(torch.from_numpy(x[i : i + 64]), size, mode) for i in range(0, len(x), 64)])


def predict_probs(core: CVRouterCore, xs: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Router probabilities for downsampled images ``xs`` (from :func:`small_inputs`)."""
    return predict(core, (xs,), batch)


def kl_to_fp_matrix(fp_logits: np.ndarray, expert_logits: np.ndarray) -> np.ndarray:
    """(N, K) per-sample KL(p_fp || p_k) from scored logits ((N, C) and (K, N, C))."""
    from moqe_compile.evaluate.losses import sample_losses

    return np.stack([sample_losses(e, fp_logits, None, "fp") for e in expert_logits], axis=1)


def train_router(cfg: RouterConfig, x_train: np.ndarray, loss_train: np.ndarray, x_val: np.ndarray,
                 loss_val: np.ndarray, progress=None, target_matrix: np.ndarray | None = None,
                 threads: int | None = 1) -> FitResult:
    """Train the image router on the (N, K) loss matrices (the build's L) with the one training
    loop (``router/train.py``). ``target_matrix``: the matrix the targets are made from when it
    is not ``loss_train`` (``fp-teacher`` on labelled data: the KL-to-FP matrix)."""
    torch.manual_seed(cfg.seed)
    core = CVRouterCore(cfg, loss_train.shape[1], in_channels=x_train.shape[1])
    xt = small_inputs(x_train, cfg.input_size, cfg.downsample)
    xv = small_inputs(x_val, cfg.input_size, cfg.downsample)
    yt = make_targets(loss_train if target_matrix is None else target_matrix, cfg.targets, cfg.temperature)
    stab = Stabilizers(tuple(cfg.stabilizers), cfg.balance_weight, cfg.usage_bias_strength, cfg.usage_bias_decay,
                       cfg.noise_std)
    return fit(core, (xt,), yt, (xv,), loss_val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               weight_decay=cfg.weight_decay, seed=cfg.seed, stabilizers=stab, min_batch=2, progress=progress,
               threads=threads)
