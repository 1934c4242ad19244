"""Fashion-MNIST (60k train + 10k test, 28x28 grayscale, 10 classes) from the Debian package.

``apt-get install -y dataset-fashion-mnist`` installs the four original idx files under
:data:`DATA_DIR`; they are parsed here with numpy alone (no extra dependency).

Visible domains (``[data] source = "fashion-mnist-domains"``): every image is shown
in one of several visibly different versions of itself (:data:`DOMAINS`), the domain fixed by
its index in its file (``domains[index % len(domains)]``), so it is the same image in the same
domain whichever split, subset or seed loads it, and the labels stay valid. The noise of the
``noise`` domain is seeded by the image's file and index alone. The FP model these bundles use
is trained on the same transformed train images (``bench/studies/fashion_mnist/train_cnn.py --domains ...``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from moqe_compile.errors import ConfigError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
SOURCE_NAME = "fashion-mnist"
DOMAINS_SOURCE = "fashion-mnist-domains"
# Each transform maps uint8 (N, 28, 28) images to uint8 images of the same shape.
DOMAINS = ("original", "inverted", "blur", "noise", "rot90")
BLUR_SIGMA = 1.5  # pixels; "blur" = Gaussian blur with this sigma (edges repeat the border pixel)
NOISE_STD = 48.0  # pixel levels of 0..255; "noise" = additive Gaussian noise, clipped and rounded
_NOISE_SEED = 10  # fixed: an image's noise never depends on a recipe (the FP model saw the same)
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

    Equals :class:`~moqe_compile.tasks.image.preprocess.Preprocess` with channels = 1 and
    resize = crop = 28 applied to each image, without a PIL round trip per image.
    """
    x = images.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((x - np.float32(mean)) / np.float32(std))[:, None])


def domain_of(indices: np.ndarray, domains: list[str] | tuple[str, ...]) -> np.ndarray:
    """The domain name of each image index (its position in the train or test file)."""
    return np.asarray(domains)[np.asarray(indices, np.int64) % len(domains)]


def _transform(domain: str, images: np.ndarray, indices: np.ndarray, split: str) -> np.ndarray:
    if domain == "original":
        return images
    if domain == "inverted":
        return 255 - images
    if domain == "rot90":
        return np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2)))
    if domain == "blur":
        from scipy.ndimage import gaussian_filter

        out = gaussian_filter(images.astype(np.float32), sigma=(0, BLUR_SIGMA, BLUR_SIGMA), mode="nearest")
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if domain == "noise":
        sid = list(_FILES).index(split)
        noise = np.stack([np.random.default_rng([_NOISE_SEED, sid, int(i)]).normal(0.0, NOISE_STD, images.shape[1:])
                          for i in indices]) if len(indices) else np.zeros(images.shape, np.float64)
        return np.clip(np.rint(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)
    raise ConfigError(f"[data] domains: {domain!r} is not one of {list(DOMAINS)}.")


def apply_domains(images: np.ndarray, indices: np.ndarray, domains: list[str] | tuple[str, ...],
                  split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) with their ``indices`` in the ``split`` file ("train" or "test")
    -> (each image in its domain, uint8 (N, 28, 28); the domain names (N,))."""
    if split not in _FILES:
        raise ValueError(f"split {split!r} is not one of {list(_FILES)}")
    indices = np.asarray(indices, np.int64)
    if len(indices) != len(images):
        raise ValueError(f"{len(images)} images but {len(indices)} indices")
    names = domain_of(indices, domains)
    out = np.array(images, dtype=np.uint8, copy=True)
    for d in dict.fromkeys(domains):
        m = names == d
        if m.any():
            out[m] = _transform(d, images[m], indices[m], split)
    return out, names
