"""Image decoding and preprocessing shared by the build and the runtime.

Only numpy and Pillow: the runtime must not need torch. The same function prepares
images at build time (calibration, scoring) and at serving time, so the experts are
calibrated on exactly the tensors they will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moqe_compile.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    resize: int
    crop: int
    mean: tuple[float, ...]  # one value per channel
    std: tuple[float, ...]
    channels: int = 3  # 3: RGB, 1: grayscale ("L")

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        # Bundles written before grayscale support have no "channels" key: they are RGB.
        return cls(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]), int(d.get("channels", 3)))

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.crop, self.crop)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """PIL image -> float32 CHW: resize shorter side, center crop, scale to [0,1], normalize."""
        img = img.convert(self.mode)
        w, h = img.size
        s = self.resize / min(w, h)
        img = img.resize((max(self.crop, round(w * s)), max(self.crop, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        img = img.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(img, dtype=np.float32) / 255.0
        if x.ndim == 2:  # "L" images decode to (H, W)
            x = x[:, :, None]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{str(path)!r} is not a readable image ({e.__class__.__name__}: {e}).") from e
    return img


def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_inputs(path: str | Path, pre: Preprocess) -> tuple[list[str], np.ndarray]:
    """An image file, a directory of images or a ``.npy`` batch -> (names, float32 NCHW batch).

    A ``.npy`` holds either preprocessed float32 ``(N,C,crop,crop)`` / ``(C,crop,crop)`` or
    raw uint8 ``(N,H,W,3)`` / ``(H,W,3)`` images, which are preprocessed here; with
    ``channels = 1`` also raw grayscale uint8 ``(N,H,W)`` batches.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input {str(p)!r} does not exist.")
    if p.is_dir():
        files = list_images(p)
        if not files:
            raise InputError(f"directory {str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        return [str(f) for f in files], np.stack([pre(open_image(f)) for f in files])
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{str(p)!r} is not a plain numpy array file: {e}.") from e
        return _from_array(arr, pre, str(p))
    return [str(p)], pre(open_image(p))[None]


def _from_array(arr: np.ndarray, pre: Preprocess, name: str) -> tuple[list[str], np.ndarray]:
    chw = pre.input_shape
    if arr.dtype == np.uint8 and arr.ndim in (3, 4) and arr.shape[-1] == 3:
        imgs = arr[None] if arr.ndim == 3 else arr
        batch = np.stack([pre(Image.fromarray(im)) for im in imgs])
    elif arr.dtype == np.uint8 and arr.ndim == 3 and pre.channels == 1:  # (N, H, W) grayscale
        batch = np.stack([pre(Image.fromarray(im)) for im in arr])
    elif arr.dtype == np.float32 and arr.ndim in (3, 4) and tuple(arr.shape[-3:]) == chw:
        batch = np.ascontiguousarray(arr[None] if arr.ndim == 3 else arr)
    else:
        raise InputError(
            f"{name!r} has shape {tuple(arr.shape)} and dtype {arr.dtype}; expected float32 "
            f"(N,{chw[0]},{chw[1]},{chw[2]}) preprocessed or uint8 (N,H,W,3) images"
            + (" or (N,H,W) grayscale images." if pre.channels == 1 else ".")
        )
    if batch.shape[0] == 0:
        raise InputError(f"{name!r} holds an empty batch.")
    return [f"{name}[{i}]" for i in range(batch.shape[0])], batch
