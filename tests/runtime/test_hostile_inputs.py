"""Hostile inputs, one table per entry point: ``moqe-run``, ``load_inputs``, ``Runtime.run``/``submit``
and the server's image decoder. Each must end in one ``InputError`` (``moqe-run``: exit 3 and one
line on stderr) naming what is wrong: never a traceback, a hang or a huge allocation.

Every file is a few hundred bytes on disk: the sizes they claim are what the limits must refuse
before anything is allocated.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moqe_compile import Runtime
from moqe_compile.cli import run as run_cli
from moqe_compile.errors import InputError, InputLimitError
from moqe_compile.serving.protocol import ProtocolError, decode_images
from moqe_compile.tasks.image.preprocess import InputLimits, Preprocess, load_inputs

from ..models import CROP

NPY_56_GIB = (100_000, 3, 224, 224)  # float32: 60,211,200,000 bytes

# Pillow warns on a header over Image.MAX_IMAGE_PIXELS; the limits refuse such images anyway.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# ------------------------------------------------------------------ hostile files, made small
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels, with no pixel data: what a
    decompression bomb looks like before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def noise_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def npy_header_only(path: Path, shape: tuple[int, ...], descr: str = "<f4") -> None:
    """A .npy whose header claims ``shape`` and which holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})


def nonfinite_npy(value: float):
    def make(path: Path) -> None:
        x = np.zeros((3, 3, CROP, CROP), np.float32)
        x[1, 2, 5, 7] = value
        np.save(path, x)
    return make


def image_dir(n: int, size: int = 40):
    def make(path: Path) -> None:
        path.mkdir()
        for i in range(n):
            Image.new("RGB", (size, size), (i * 40, 90, 200)).save(path / f"{i}.png")
    return make


def make_fifo(path: Path) -> None:
    os.mkfifo(path)
    # Were the FIFO opened for reading, this opens its other end after a while, so a
    # regression fails the test (the read sees no image) instead of hanging the suite.
    def release() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: the FIFO was refused unopened
            pass
    timer = threading.Timer(20, release)
    timer.daemon = True
    timer.start()


# id: (file name, maker, InputLimits fields (moqe-run options), exception class, message fragment)
FILES = {
    "thin-png-1x20000": ("thin.png", lambda p: p.write_bytes(png_bytes(1, 20000)), {},
                         InputLimitError, "aspect ratio 20000.0; the input limit max_aspect_ratio=20"),
    "png-over-max-image-pixels": ("big.png", lambda p: p.write_bytes(header_only_png(10_000, 10_000)), {},
                                  InputLimitError, "= 100000000 pixels; the input limit max_image_pixels=50000000"),
    "decompression-bomb-png": ("bomb.png", lambda p: p.write_bytes(header_only_png(20_000, 20_000)), {},
                               InputLimitError, "is a decompression bomb"),
    "png-over-raised-limit": ("big.png", lambda p: p.write_bytes(header_only_png(300, 300)),
                              {"max_image_pixels": 50_000}, InputLimitError, "max_image_pixels=50000"),
    "empty-npy": ("empty.npy", lambda p: p.write_bytes(b""), {}, InputError, "is not a .npy array file"),
    "garbage-npy": ("junk.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\xff\xff{"), {},
                    InputError, "is not a .npy array file"),
    "npy-header-claims-56-gib": ("huge.npy", lambda p: npy_header_only(p, NPY_56_GIB), {},
                                 InputLimitError, "claims 60211200000 bytes of array data; the input limit "
                                                  "max_array_bytes=1073741824"),
    "npy-truncated": ("short.npy", lambda p: npy_header_only(p, (2, 3, CROP, CROP)), {},
                      InputError, "is truncated: its header claims 24576 bytes"),
    "npy-pickled-objects": ("obj.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), {},
                            InputError, "holds Python objects"),
    "uint8-empty-batch": ("none.npy", lambda p: np.save(p, np.zeros((0, 40, 40, 3), np.uint8)), {},
                          InputError, "holds an empty batch"),
    "uint8-zero-height": ("flat.npy", lambda p: np.save(p, np.zeros((1, 0, 40, 3), np.uint8)), {},
                          InputError, "is 40x0 pixels: an empty image"),
    "uint8-too-many-images": ("many.npy", lambda p: np.save(p, np.zeros((257, 8, 8, 3), np.uint8)), {},
                              InputLimitError, "holds 257 images; the input limit max_images=256"),
    "uint8-thin-images": ("thin.npy", lambda p: np.save(p, np.zeros((2, 1, 400, 3), np.uint8)), {},
                          InputLimitError, "max_aspect_ratio=20"),
    "float32-nan": ("nan.npy", nonfinite_npy(np.nan), {}, InputError, "nan.npy[1] hold(s) non-finite values"),
    "float32-inf": ("inf.npy", nonfinite_npy(-np.inf), {}, InputError, "inf.npy[1] hold(s) non-finite values"),
    "fifo-named-jpg": ("pipe.jpg", make_fifo, {}, InputError, "is not a regular file"),
    "directory-over-max-images": ("dir", image_dir(3), {"max_images": 2},
                                  InputLimitError, "holds 3 images; the input limit max_images=2"),
    "directory-over-max-total-pixels": ("dir", image_dir(3), {"max_total_pixels": 4000},
                                        InputLimitError, "the input limit max_total_pixels=4000"),
    "not-an-image": ("text.jpg", lambda p: p.write_text("not an image"), {}, InputError, "is not a readable image"),
}


def _make(tmp_path: Path, case: str) -> tuple[Path, dict, type, str]:
    name, make, limits, exc, fragment = FILES[case]
    path = tmp_path / name
    make(path)
    return path, limits, exc, fragment


def _options(limits: dict) -> list[str]:
    return [a for k, v in limits.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("case", FILES)
def test_moqe_run_refuses_in_one_line(tiny_bundle, tmp_path, capsys, case):
    path, limits, _, fragment = _make(tmp_path, case)
    code = run_cli.main([str(tiny_bundle), "--input", str(path), *_options(limits)])
    out, err = capsys.readouterr()
    assert (code, out) == (3, "")
    assert err.startswith("moqe-run: error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("case", FILES)
def test_load_inputs_refuses(tmp_path, case):
    path, limits, exc, fragment = _make(tmp_path, case)
    pre = Preprocess(resize=36, crop=CROP, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(exc) as e:
        load_inputs(path, pre, InputLimits(**limits))
    assert fragment in str(e.value)


def test_pillow_bomb_warning_as_error_is_an_input_error(tmp_path):
    """Under ``python -W error`` Pillow raises its warning: still one InputError."""
    p = tmp_path / "big.png"
    p.write_bytes(header_only_png(10_000, 10_000))
    with warnings.catch_warnings(), pytest.raises(InputLimitError, match="is a decompression bomb"):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        load_inputs(p, Preprocess(resize=36, crop=CROP, mean=(0.5,) * 3, std=(0.25,) * 3))


def test_a_thin_image_is_refused_before_the_resize(tmp_path, monkeypatch):
    """The aspect check runs before the aspect-preserving resize that would make 256 x 5,120,000."""
    p = tmp_path / "thin.png"
    p.write_bytes(png_bytes(1, 20000))
    pre = Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.25,) * 3)
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized a refused image"))
    with pytest.raises(InputLimitError, match="max_aspect_ratio"):
        load_inputs(p, pre)


# ------------------------------------------------------------------ Runtime.run / submit
def _with(value: float, sample: int = 1) -> np.ndarray:
    x = np.zeros((3, 3, CROP, CROP), np.float32)
    x[sample, 0, 3, 4] = value
    return x


RUN_CASES = {
    "nan": (_with(np.nan), InputError, "batch sample 1 hold(s) non-finite values (NaN or inf)"),
    "inf": (_with(np.inf, 2), InputError, "batch sample 2 hold(s) non-finite values"),
    "minus-inf": (_with(-np.inf, 0), InputError, "batch sample 0 hold(s) non-finite values"),
    "empty": (np.zeros((0, 3, CROP, CROP), np.float32), InputError, "batch is empty"),
    "zero-height": (np.zeros((1, 3, 0, CROP), np.float32), InputError, "expected (N, 3, 32, 32)"),
    "float64": (np.zeros((1, 3, CROP, CROP)), InputError, "dtype float64; expected float32"),
    "a-list": ([[0.0]], InputError, "batch has shape list"),
}


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    with Runtime.load(tiny_bundle) as r:
        yield r


@pytest.mark.parametrize("case", RUN_CASES)
@pytest.mark.parametrize("call", ["run", "submit"])
def test_runtime_refuses(rt, case, call):
    batch, exc, fragment = RUN_CASES[case]
    with pytest.raises(exc) as e:
        getattr(rt, call)(batch)
    assert fragment in str(e.value)


# ------------------------------------------------------------------ the server's image decoder
DECODER_CASES = {
    "thin-png": ([png_bytes(1, 20000)], {}, 413, "element 0 is 1x20000 pixels, aspect ratio"),
    "over-max-image-pixels": ([header_only_png(10_000, 10_000)], {}, 413, "max_image_pixels=50000000"),
    "decompression-bomb": ([header_only_png(20_000, 20_000)], {}, 413, "is a decompression bomb"),
    "too-many-images": ([png_bytes(1, 1)] * 257, {}, 413, "holds 257 images; the input limit max_images=256"),
    "over-max-total-pixels": ([png_bytes(40, 40)] * 3, {"max_total_pixels": 4000}, 413,
                              "max_total_pixels=4000"),
    "not-an-image": ([png_bytes(4, 4), b"GIF89a garbage"], {}, 400, "element 1 is not a readable image"),
    "truncated-png": ([noise_png(40, 40)[:400]], {}, 400, "element 0 is not a readable image"),
}


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_refuses(case):
    items, limits, status, fragment = DECODER_CASES[case]
    pre = Preprocess(resize=36, crop=CROP, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ProtocolError) as e:
        decode_images(items, pre, InputLimits(**limits))
    assert e.value.status == status and fragment in str(e.value)


def test_decoder_takes_images_within_the_limits():
    pre = Preprocess(resize=36, crop=CROP, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = decode_images([png_bytes(40, 30), png_bytes(20, 400)], pre, InputLimits(max_total_pixels=9200))
    assert x.shape == (2, 3, CROP, CROP) and x.dtype == np.float32 and np.isfinite(x).all()


def test_load_takes_input_limits(tiny_bundle, tiny_images):
    import moqe_compile

    with moqe_compile.load(tiny_bundle, input_limits=InputLimits(max_images=3)) as r:
        assert r.input_limits.max_images == 3
        with pytest.raises(InputLimitError, match="holds 4 images; the input limit max_images=3"):
            r.load_inputs(tiny_images / "0")
        assert len(r.load_inputs(tiny_images / "0", InputLimits(max_images=4))[0]) == 4
