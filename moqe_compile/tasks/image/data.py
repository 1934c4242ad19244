"""Build-time image sets: source images, per-image augmentations, disjoint splits.

Splits are drawn over *source* images, so augmented views of one photo never land in
two splits (otherwise router validation would leak into training).

``source = "fashion-mnist"`` is different: calibration, router_train and router_val are
disjoint parts of its 60k train set (``max_samples`` of them, 0 = all) and test is its
official 10k test set; see :func:`fashion_mnist_splits`. ``source = "fashion-mnist-domains"``
splits the same way and shows each image in its domain (``[data] domains``,
:func:`fashion_mnist.apply_domains`), in every split alike; ``SplitData.domains`` names each
sample's domain and :func:`calibration_inputs` restricts an expert's calibration set to one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile.tasks.image.config import DataConfig
from moqe_compile.errors import ConfigError
from moqe_compile.tasks.image import fashion_mnist
from moqe_compile.tasks.image.preprocess import Preprocess, list_images, open_image

SPLITS = ("calibration", "router_train", "router_val", "test")


@dataclass
class Source:
    path: Path
    label: int | None


@dataclass
class SplitData:
    x: np.ndarray  # (N, channels, crop, crop) float32
    labels: np.ndarray | None  # (N,) int64, or None without labels
    sources: list[str]  # which source image each view came from
    domains: np.ndarray | None = None  # (N,) str: each sample's domain (fashion-mnist-domains), else None


def foolbox_dir() -> Path:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "[data] source = 'foolbox-imagenet' needs the foolbox package: "
            "pip install --no-deps foolbox==3.3.4"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


FASHION_MNIST_SOURCES = (fashion_mnist.SOURCE_NAME, fashion_mnist.DOMAINS_SOURCE)


def calibration_inputs(split: SplitData, domain: str = "") -> np.ndarray:
    """The calibration inputs of an expert: all of ``split``, or (``calibration_domain``) only
    the samples of one domain."""
    if not domain:
        return split.x
    if split.domains is None:
        raise ConfigError(f"calibration_domain = {domain!r} needs [data] source = "
                          f"{fashion_mnist.DOMAINS_SOURCE!r} (this data has no domains).")
    keep = split.domains == domain
    if not keep.any():
        raise ConfigError(f"calibration_domain = {domain!r}: the calibration split holds no sample of that domain "
                          f"(it has {sorted(set(split.domains.tolist()))}).")
    return split.x[keep]


def num_sources(cfg: DataConfig) -> int:
    """How many source images :func:`build_splits` will read (for a progress bar)."""
    if cfg.source in FASHION_MNIST_SOURCES:
        n_train, n_test = fashion_mnist.size("train"), fashion_mnist.size("test")
        return (min(cfg.max_samples, n_train) if cfg.max_samples else n_train) + n_test
    return len(list_sources(cfg.source))


def list_sources(source: str) -> list[Source]:
    if source in FASHION_MNIST_SOURCES:
        raise ConfigError(f"[data] source = {source!r} holds arrays, not image files; use build_splits.")
    if source == "foolbox-imagenet":
        files = sorted(foolbox_dir().glob("imagenet_*_*.jpg"))
        # Files are named imagenet_<index>_<label>.jpg.
        return [Source(f, int(f.stem.split("_")[2])) for f in files]
    root = Path(source)
    if not root.is_dir():
        raise ConfigError(
            f"[data] source = {source!r} is neither 'foolbox-imagenet', 'fashion-mnist', "
            "'fashion-mnist-domains' nor a directory."
        )
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if subdirs:
        out = []
        for d in subdirs:
            if not d.name.isdigit():
                raise ConfigError(f"[data] class folder {str(d)!r} must be named by an integer class index.")
            out += [Source(f, int(d.name)) for f in list_images(d)]
        return out
    return [Source(f, None) for f in list_images(root)]


def augmenter(seed: int):
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


def fashion_mnist_splits(cfg: DataConfig, pre: Preprocess, progress=None) -> dict[str, SplitData]:
    """Calibration / router_train / router_val from the train set, test = the official test set.

    ``max_samples`` train images (0 = all 60k) are drawn with ``seed``; calibration and
    router_val take round(fraction * n) of them, router_train the rest (``[data.split]
    test`` is ignored: the test split is always the official 10k test set). With
    ``source = "fashion-mnist-domains"`` each image is then shown in its domain (by its index
    in its file, the same in every split and for every seed).
    """
    fm = fashion_mnist
    if cfg.augmentations:
        raise ConfigError(
            f"[data] augmentations = {cfg.augmentations}: source {cfg.source!r} takes no augmented views; "
            "set augmentations = 0."
        )
    size = fm.IMAGE_SIZE
    if (pre.channels, pre.resize, pre.crop) != (1, size, size):
        raise ConfigError(
            f"[preprocessing] channels = {pre.channels}, resize = {pre.resize}, crop = {pre.crop}: source "
            f"{cfg.source!r} needs channels = 1, resize = {size}, crop = {size} (28x28 grayscale)."
        )
    domains = cfg.domains if cfg.source == fm.DOMAINS_SOURCE else None

    def shown(images: np.ndarray, idx: np.ndarray, file: str) -> tuple[np.ndarray, np.ndarray | None]:
        return fm.apply_domains(images[idx], idx, domains, file) if domains else (images[idx], None)

    x_train, y_train = fm.load("train")
    x_test, y_test = fm.load("test")
    n_all = len(x_train)
    if cfg.max_samples > n_all:
        raise ConfigError(f"[data] max_samples = {cfg.max_samples} exceeds the {n_all} Fashion-MNIST train images.")
    n = cfg.max_samples or n_all
    n_cal = max(1, int(round(cfg.split.calibration * n)))
    n_val = max(1, int(round(cfg.split.router_val * n)))
    n_tr = n - n_cal - n_val
    if n_tr < 1 or len(x_test) < 1:
        raise ConfigError(f"[data] max_samples = {n} is too small for non-empty calibration / router splits.")
    order = np.random.default_rng(cfg.seed).permutation(n_all)[:n]
    parts = {"calibration": order[:n_cal], "router_train": order[n_cal : n_cal + n_tr],
             "router_val": order[n_cal + n_tr :]}
    result = {}
    for name, idx in parts.items():
        idx = np.sort(idx)
        images, names = shown(x_train, idx, "train")
        result[name] = SplitData(fm.normalize(images, pre.mean[0], pre.std[0]), y_train[idx],
                                 [f"train[{i}]" for i in idx], names)
        if progress:
            progress.update(len(idx))
    images, names = shown(x_test, np.arange(len(x_test)), "test")
    result["test"] = SplitData(fm.normalize(images, pre.mean[0], pre.std[0]), y_test,
                               [f"t10k[{i}]" for i in range(len(x_test))], names)
    if progress:
        progress.update(len(x_test))
    return result


def build_splits(cfg: DataConfig, pre: Preprocess, progress=None) -> dict[str, SplitData]:
    if cfg.source in FASHION_MNIST_SOURCES:
        return fashion_mnist_splits(cfg, pre, progress)
    sources = list_sources(cfg.source)
    parts = split_sources(sources, cfg)
    aug = augmenter(cfg.seed) if cfg.augmentations else None
    labelled = all(s.label is not None for s in sources)
    if cfg.targets == "labels" and not labelled:
        raise ConfigError(f"[data] targets = 'labels' but {cfg.source!r} has unlabelled images; use targets = 'fp'.")
    result = {}
    for name, srcs in parts.items():
        xs, ys, names = [], [], []
        for s in srcs:
            views = source_views(s.path, pre, cfg.augmentations, aug)
            xs += views
            ys += [s.label if s.label is not None else -1] * len(views)
            names += [s.path.name] * len(views)
            if progress:
                progress.update(1)
        result[name] = SplitData(np.stack(xs), np.asarray(ys, np.int64) if labelled else None, names)
    return result


def source_views(path: Path, pre: Preprocess, augmentations: int, aug=None) -> list[np.ndarray]:
    """The photo at ``path`` and ``augmentations`` augmented views of it drawn from ``aug``
    (:func:`augmenter`; unused when ``augmentations`` is 0), preprocessed."""
    img = open_image(path).convert("RGB")
    return [pre(v) for v in [img] + [aug(img) for _ in range(augmentations)]]
