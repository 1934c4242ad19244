"""Fashion-MNIST (60k train + 10k test, 28x28 grayscale, 10 classes) from the Debian package.

``apt-get install -y dataset-fashion-mnist`` installs the four original idx files under
:data:`DATA_DIR`; they are parsed here with numpy alone (no extra dependency).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import ConfigError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
SOURCE_NAME = "fashion-mnist"
IMAGE_SIZE = 28
NUM_CLASSES = 10
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _path(name: str) -> Path:
    p = DATA_DIR / name
    if not p.is_file():
        raise ConfigError(f"[data] source = 'fashion-mnist' needs {str(p)!r}, which is missing: {APT_HINT}")
    return p


def read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) idx file of unsigned bytes into an array of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"{str(path)!r} is not a readable idx file: {e}.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{str(path)!r} is not an unsigned-byte idx file (bad magic {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4)) if ndim else ()
    if len(raw) - header != int(np.prod(shape)):
        raise ConfigError(f"{str(path)!r} holds {len(raw) - header} bytes of data; its header says {shape}.")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``"train"`` or ``"test"`` -> (uint8 images (N, 28, 28), int64 labels (N,))."""
    img_name, lab_name = _FILES[split]
    images, labels = read_idx(_path(img_name)), read_idx(_path(lab_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
            f"(expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) and (N,))."
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise ConfigError(f"Fashion-MNIST {split}: label {int(labels.max())} is out of range 0..9.")
    return images, labels.astype(np.int64)


def size(split: str) -> int:
    """Number of images in ``"train"`` or ``"test"`` (reads only the small label file)."""
    return len(read_idx(_path(_FILES[split][1])))


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W): pixels/255, then (x - mean) / std.

    Equals :class:`~moqe_compile.data.images.Preprocess` with channels = 1 and
    resize = crop = 28 applied to each image, without a PIL round trip per image.
    """
    x = images.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - np.float32(mean)) / np.float32(std))[:, None])
