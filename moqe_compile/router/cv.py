"""CV router (DESIGN.md section 4): SE-ResNet-8 over a downsampled image + multi-head attention.

The downsampling is part of the exported graph, so the router ONNX takes the same
preprocessed NCHW tensor as the experts and the runtime feeds one array to both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(4, c // r), 1), nn.Conv2d(max(4, c // r), c, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SEBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return F.relu(y + self.short(x))


class TemperatureAttention(nn.Module):
    """Self-attention whose logit scale is a learned temperature (init 1/sqrt(head_dim))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(1.0 / math.sqrt(head_dim))))

    def forward(self, x):  # x: (B, T, C)
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.log_tau.exp(), dim=-1)  # (B, nh, T, T)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return x + self.proj(y)


class CVRouterCore(nn.Module):
    """Operates on the already-downsampled image (B, 3, s, s); used for training."""

    def __init__(self, cfg: RouterConfig, num_experts: int):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(3, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.stages = nn.Sequential(SEBasicBlock(c1, c1, 1), SEBasicBlock(c1, c2, 2), SEBasicBlock(c2, c3, 2))
        self.attn = TemperatureAttention(c3, cfg.heads, cfg.head_dim)
        self.head = nn.Linear(c3, num_experts)

    def forward(self, x):
        f = self.stages(self.stem(x))  # (B, c3, s/4, s/4)
        t = f.flatten(2).transpose(1, 2)  # (B, T, c3)
        return self.head(self.attn(t).mean(dim=1))


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size == 0:
        k = x.shape[-1] // size
        return F.avg_pool2d(x, k)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


class CVRouter(nn.Module):
    """Exported form: full preprocessed image in, expert probabilities out."""

    def __init__(self, core: CVRouterCore, input_size: int):
        super().__init__()
        self.core, self.input_size = core, input_size

    def forward(self, x):
        return torch.softmax(self.core(downsample(x, self.input_size)), dim=-1)
