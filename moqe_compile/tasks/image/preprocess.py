"""Image decoding and preprocessing shared by the build and the runtime.

Only numpy and Pillow: the runtime must not need torch. The same function prepares
images at build time (calibration, scoring) and at serving time, so the experts are
calibrated on exactly the tensors they will see.

Every input is checked against :class:`InputLimits` before anything large is allocated:
image sizes from the file header (before decoding), ``.npy`` sizes from the array header
(before reading), and the number of images before the first is decoded.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from moqe_compile.errors import ConfigError, InputError, InputLimitError

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



@dataclass(frozen=True)
class InputLimits:
    """What one call (``load_inputs``, one ``moqe-run``, one server request) may decode.

    The defaults bound one call to roughly a few hundred MB and a few seconds of decoding on
    one core, whatever the request's size on disk: a small PNG can claim a huge canvas, and
    a thin one (1x20000) would be resized to 256 x 5,120,000 by the aspect-preserving resize.
    """

    max_image_pixels: int = 50_000_000  # width x height of one image: a 48 MP photo passes
    max_aspect_ratio: float = 20.0  # long side / short side, checked before the resize
    max_images: int = 256  # images (or samples of a .npy batch) in one call
    max_total_pixels: int = 200_000_000  # width x height summed over one call's images
    max_array_bytes: int = 1 << 30  # a .npy's data, from its header, before reading it

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"InputLimits.{f.name} = {v!r} must be a positive number.")
        if self.max_aspect_ratio < 1:
            raise ConfigError(f"InputLimits.max_aspect_ratio = {self.max_aspect_ratio} must be >= 1.")

    def per_image(self) -> "InputLimits":
        """These limits without the per-call count and pixel total: for a local dataset read
        image by image (evaluation), where only one decoded image is held at a time."""
        return replace(self, max_images=2**62, max_total_pixels=2**62)

    def check_count(self, n: int, what: str) -> None:
        if n > self.max_images:
            raise InputLimitError(f"{what} holds {n} images; the input limit max_images={self.max_images} "
                             f"bounds one call: split the input or raise the limit.")

    def check_image(self, width: int, height: int, what: str) -> int:
        """The image's pixel count, or an ``InputError`` naming the limit it breaks."""
        if width <= 0 or height <= 0:
            raise InputError(f"{what} is {width}x{height} pixels: an empty image.")
        pixels = width * height
        if pixels > self.max_image_pixels:
            raise InputLimitError(f"{what} is {width}x{height} = {pixels} pixels; the input limit "
                             f"max_image_pixels={self.max_image_pixels}: downscale it or raise the limit.")
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise InputLimitError(f"{what} is {width}x{height} pixels, aspect ratio {ratio:.1f}; the input limit "
                             f"max_aspect_ratio={self.max_aspect_ratio:g}: crop or pad it, or raise the limit.")
        return pixels

    def check_total(self, pixels: int, what: str) -> None:
        if pixels > self.max_total_pixels:
            raise InputLimitError(f"{what} holds {pixels} pixels in all (or more); the input limit "
                             f"max_total_pixels={self.max_total_pixels} bounds one call: split the input "
                             f"or raise the limit.")

    def check_array_bytes(self, nbytes: int, what: str) -> None:
        if nbytes > self.max_array_bytes:
            raise InputLimitError(f"{what} claims {nbytes} bytes of array data; the input limit "
                             f"max_array_bytes={self.max_array_bytes}: split it or raise the limit.")


DEFAULT_LIMITS = InputLimits()


class PixelBudget:
    """Checks each image of one call as it is opened, and the call's running pixel total."""

    def __init__(self, limits: InputLimits, what: str):
        self.limits, self.what, self.total = limits, what, 0

    def admit(self, width: int, height: int, name: str) -> None:
        self.total += self.limits.check_image(width, height, name)
        self.limits.check_total(self.total, self.what)


def all_finite(batch: np.ndarray) -> bool:
    """True when a float batch holds no NaN or infinity, in one pass over its memory.

    A batch's dot product with itself is NaN or inf exactly when it holds a NaN or an inf,
    or when the squares of huge finite values overflow. The BLAS dot reads the batch once,
    where min and max read it twice (docs/results.md#runtime-performance-gated-bundles-routers-int8-openvino-4-bit-lms),
    so a clean batch costs one memory pass. False therefore means "maybe": callers look
    sample by sample (:func:`nonfinite_samples`).
    """
    if batch.dtype not in (np.float32, np.float64):
        return bool(np.isfinite(batch).all())
    flat = batch.reshape(-1)  # a view for the contiguous batches run() passes; a copy otherwise
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.dot(flat, flat)))


def nonfinite_samples(batch: np.ndarray) -> list[int]:
    """Indices of the samples of a float batch that hold a NaN or an infinity."""
    if all_finite(batch):
        return []
    bad = ~np.isfinite(batch)
    if not bad.any():
        return []
    return np.flatnonzero(bad.reshape(len(batch), -1).any(axis=1)).tolist()


def refuse_nonfinite(batch: np.ndarray, names: list[str] | str | None = None) -> None:
    """An ``InputError`` naming the samples holding NaN/inf: the experts would answer them
    with confident, meaningless predictions. ``names``: one per sample, or a format string
    with ``{}`` for the index (built only when a sample is refused)."""
    bad = nonfinite_samples(batch)
    if bad:
        if isinstance(names, str):
            shown = [names.format(i) for i in bad[:5]]
        else:
            shown = [names[i] if names else f"sample {i}" for i in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(f"{', '.join(map(str, shown))}{more} hold(s) non-finite values (NaN or inf); "
                         f"fix or drop those samples.")

def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, or an ``InputError`` unless it is a regular file.

    O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever. The type is checked
    on the opened descriptor, so nothing can be swapped in between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise InputError(f"cannot open {str(path)!r}: {e.strerror}.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{str(path)!r} is not a regular file (a FIFO, device or socket); give an image "
                         f"file, a directory of images or a .npy file.")
    return os.fdopen(fd, "rb")


def decode_image(fp: BinaryIO, name: str, limits: InputLimits = DEFAULT_LIMITS,
                 budget: PixelBudget | None = None) -> Image.Image:
    """An encoded image (file object), decoded only after the size in its header passed the
    limits (``budget``: the call's running total); ``name`` is how errors name it."""
    try:
        img = Image.open(fp)
        (budget or PixelBudget(limits, name)).admit(*img.size, name)
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own cap (2 x Image.MAX_IMAGE_PIXELS; 1 x where its warning is an error)
        # refused it while reading the header.
        raise InputLimitError(f"{name} is a decompression bomb ({e}); the input limit "
                         f"max_image_pixels={limits.max_image_pixels}.") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not a readable image (not a format Pillow identifies).") from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        # What Pillow's decoders raise on corrupt or truncated data.
        raise InputError(f"{name} is not a readable image ({e.__class__.__name__}: {e}).") from None
    return img


def open_image(path: Path, limits: InputLimits = DEFAULT_LIMITS, budget: PixelBudget | None = None) -> Image.Image:
    """The image file at ``path``, decoded within ``limits`` (see ``decode_image``)."""
    with open_regular(path) as f:
        return decode_image(f, repr(str(path)), limits, budget)


def list_images(directory: Path) -> list[Path]:
    """The regular image files (by suffix) directly in ``directory``, sorted."""
    try:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as e:
        raise InputError(f"cannot list directory {str(directory)!r}: {e.strerror}.") from None


def read_npy(path: Path, limits: InputLimits = DEFAULT_LIMITS) -> np.ndarray:
    """A plain (no pickle) ``.npy`` array; its header's size is checked before the data is read."""
    name = repr(str(path))
    with open_regular(path) as f:
        shape, dtype = _npy_header(f, name)
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
        limits.check_array_bytes(nbytes, name)
        left = os.fstat(f.fileno()).st_size - f.tell()
        if left < nbytes:
            raise InputError(f"{name} is truncated: its header claims {nbytes} bytes of array data, "
                             f"the file holds {left}.")
        f.seek(0)
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{name} is not a plain numpy array file: {e}.") from None


def _npy_header(f: BinaryIO, name: str) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    try:
        version = fmt.read_magic(f)
        if version not in readers:
            raise InputError(f"{name} is .npy format version {version[0]}.{version[1]}; this reads versions "
                             f"1.0 and 2.0 (what numpy.save writes for plain arrays).")
        shape, _, dtype = readers[version](f)
    except ValueError as e:
        raise InputError(f"{name} is not a .npy array file ({e}).") from None
    if dtype.hasobject:
        raise InputError(f"{name} holds Python objects (dtype {dtype}); only plain numeric arrays are read.")
    return shape, dtype


def load_inputs(path: str | Path, pre: Preprocess,
                limits: InputLimits = DEFAULT_LIMITS) -> tuple[list[str], np.ndarray]:
    """An image file, a directory of images or a ``.npy`` batch -> (names, float32 NCHW batch).

    A ``.npy`` holds either preprocessed float32 ``(N,C,crop,crop)`` / ``(C,crop,crop)`` or
    raw uint8 ``(N,H,W,3)`` / ``(H,W,3)`` images, which are preprocessed here; with
    ``channels = 1`` also raw grayscale uint8 ``(N,H,W)`` batches. ``limits`` bound what
    one call decodes (``InputLimits``); breaking one, or a non-finite float sample, is an
    ``InputError``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"input must be a path (a str or a path object), not {type(path).__name__}.")
    if not isinstance(limits, InputLimits):
        raise InputError(f"limits must be an InputLimits, not {type(limits).__name__}.")
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except (OSError, ValueError) as e:
        raise InputError(f"input {str(p)!r} cannot be read: {e}.") from None
    if not exists:
        raise InputError(f"input {str(p)!r} does not exist.")
    if is_dir:
        return _from_directory(p, pre, limits)
    if p.suffix.lower() == ".npy":
        return _from_array(read_npy(p, limits), pre, str(p), limits)
    return [str(p)], pre(open_image(p, limits))[None]


def _from_directory(p: Path, pre: Preprocess, limits: InputLimits) -> tuple[list[str], np.ndarray]:
    files = list_images(p)
    if not files:
        raise InputError(f"directory {str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    limits.check_count(len(files), f"directory {str(p)!r}")
    budget = PixelBudget(limits, f"directory {str(p)!r}")
    return [str(f) for f in files], np.stack([pre(open_image(f, limits, budget)) for f in files])


def _from_array(arr: np.ndarray, pre: Preprocess, name: str,
                limits: InputLimits = DEFAULT_LIMITS) -> tuple[list[str], np.ndarray]:
    chw = pre.input_shape
    if arr.dtype == np.dtype(">f4"):  # float32 written big-endian: the same numbers, byte-swapped
        arr = arr.astype(np.float32)
    rgb = arr.dtype == np.uint8 and arr.ndim in (3, 4) and arr.shape[-1] == 3
    if rgb or (arr.dtype == np.uint8 and arr.ndim == 3 and pre.channels == 1):  # (N, H, W) grayscale
        imgs = arr[None] if rgb and arr.ndim == 3 else arr
        _check_raw_batch(imgs.shape, name, limits)
        batch = np.stack([pre(Image.fromarray(im)) for im in imgs])
    elif arr.dtype == np.float32 and arr.ndim in (3, 4) and tuple(arr.shape[-3:]) == chw:
        batch = np.ascontiguousarray(arr[None] if arr.ndim == 3 else arr)
        if len(batch) == 0:
            raise InputError(f"{name!r} holds an empty batch.")
        limits.check_count(len(batch), repr(name))
    else:
        raise InputError(
            f"{name!r} has shape {tuple(arr.shape)} and dtype {arr.dtype}; expected float32 "
            f"(N,{chw[0]},{chw[1]},{chw[2]}) preprocessed or uint8 (N,H,W,3) images"
            + (" or (N,H,W) grayscale images." if pre.channels == 1 else ".")
        )
    names = [f"{name}[{i}]" for i in range(batch.shape[0])]
    refuse_nonfinite(batch, names)
    return names, batch


def _check_raw_batch(shape: tuple[int, ...], name: str, limits: InputLimits) -> None:
    """A uint8 (N, H, W[, 3]) batch's count and image size, before any image is preprocessed."""
    n, h, w = shape[:3]
    if n == 0:
        raise InputError(f"{name!r} holds an empty batch.")
    limits.check_count(n, repr(name))
    pixels = limits.check_image(w, h, f"each image of {name!r}")
    limits.check_total(n * pixels, repr(name))
