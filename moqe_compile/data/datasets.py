"""Build-time image sets: source images, per-image augmentations, disjoint splits.

Splits are drawn over *source* images, so augmented views of one photo never land in
two splits (otherwise router validation would leak into training).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError
from .images import Preprocess, list_images, open_image

SPLITS = ("calibration", "router_train", "router_val", "test")


@dataclass
class Source:
    path: Path
    label: int | None


@dataclass
class SplitData:
    x: np.ndarray  # (N, 3, crop, crop) float32
    labels: np.ndarray | None  # (N,) int64, or None without labels
    sources: list[str]  # which source image each view came from


def foolbox_dir() -> Path:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "[data] source = 'foolbox-imagenet' needs the foolbox package: "
            "pip install --no-deps foolbox==3.3.4"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def list_sources(source: str) -> list[Source]:
    if source == "foolbox-imagenet":
        files = sorted(foolbox_dir().glob("imagenet_*_*.jpg"))
        # Files are named imagenet_<index>_<label>.jpg.
        return [Source(f, int(f.stem.split("_")[2])) for f in files]
    root = Path(source)
    if not root.is_dir():
        raise ConfigError(f"[data] source = {source!r} is neither 'foolbox-imagenet' nor a directory.")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if subdirs:
        out = []
        for d in subdirs:
            if not d.name.isdigit():
                raise ConfigError(f"[data] class folder {str(d)!r} must be named by an integer class index.")
            out += [Source(f, int(d.name)) for f in list_images(d)]
        return out
    return [Source(f, None) for f in list_images(root)]


def _augmenter(seed: int):
    import torch
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    # Views a camera could plausibly take of the same scene: crops, flips, light changes.
    return v2.Compose([
        v2.RandomResizedCrop(256, scale=(0.3, 1.0), ratio=(0.75, 1.33)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
    ])


def split_sources(sources: list[Source], cfg: DataConfig) -> dict[str, list[Source]]:
    n = len(sources)
    fr = [getattr(cfg.split, s) for s in SPLITS]
    counts = [max(1, int(round(f * n))) for f in fr]
    counts[1] = n - counts[0] - counts[2] - counts[3]  # router_train takes the remainder
    if n < len(SPLITS) or counts[1] < 1:
        raise ConfigError(f"[data] source {cfg.source!r} has {n} images; need enough for 4 non-empty splits.")
    order = np.random.default_rng(cfg.seed).permutation(n)
    out, start = {}, 0
    for name, c in zip(SPLITS, counts):
        out[name] = [sources[i] for i in sorted(order[start : start + c])]
        start += c
    return out


def build_splits(cfg: DataConfig, pre: Preprocess, progress=None) -> dict[str, SplitData]:
    sources = list_sources(cfg.source)
    parts = split_sources(sources, cfg)
    aug = _augmenter(cfg.seed) if cfg.augmentations else None
    labelled = all(s.label is not None for s in sources)
    if cfg.targets == "labels" and not labelled:
        raise ConfigError(f"[data] targets = 'labels' but {cfg.source!r} has unlabelled images; use targets = 'fp'.")
    result = {}
    for name, srcs in parts.items():
        xs, ys, names = [], [], []
        for s in srcs:
            img = open_image(s.path).convert("RGB")
            views = [img] + [aug(img) for _ in range(cfg.augmentations)] if aug else [img]
            for v in views:
                xs.append(pre(v))
                ys.append(s.label if s.label is not None else -1)
                names.append(s.path.name)
            if progress:
                progress.update(1)
        result[name] = SplitData(np.stack(xs), np.asarray(ys, np.int64) if labelled else None, names)
    return result
