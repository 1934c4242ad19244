"""``InputLimits`` and the readers that honour them: sizes are checked from headers, before decoding."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from moqe_compile.errors import ConfigError, InputError, InputLimitError
from moqe_compile.tasks.image.preprocess import (DEFAULT_LIMITS, InputLimits, Preprocess, decode_image,
                                                 list_images, load_inputs, open_regular, read_npy)

PRE = Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def _png(path, width, height):
    Image.new("RGB", (width, height), (10, 200, 30)).save(path)
    return path


def test_defaults():
    assert DEFAULT_LIMITS == InputLimits(max_image_pixels=50_000_000, max_aspect_ratio=20.0, max_images=256,
                                         max_total_pixels=200_000_000, max_array_bytes=1 << 30)


@pytest.mark.parametrize("kwargs", [{"max_images": 0}, {"max_image_pixels": -1}, {"max_aspect_ratio": 0.5},
                                    {"max_array_bytes": "1GB"}, {"max_total_pixels": True}])
def test_bad_limits_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        InputLimits(**kwargs)


def test_limits_are_inclusive():
    lim = InputLimits(max_image_pixels=400, max_aspect_ratio=4)
    assert lim.check_image(40, 10, "x") == 400  # both limits exactly
    with pytest.raises(InputLimitError, match="aspect ratio 4.1; the input limit max_aspect_ratio=4"):
        InputLimits(max_aspect_ratio=4).check_image(41, 10, "x")
    with pytest.raises(InputLimitError, match="max_image_pixels=400"):
        lim.check_image(21, 20, "x")
    with pytest.raises(InputError, match="empty image"):
        lim.check_image(0, 5, "x")


def test_per_image_lifts_only_the_per_call_bounds():
    lim = InputLimits(max_images=1, max_total_pixels=10, max_image_pixels=100).per_image()
    lim.check_count(10_000, "x")
    lim.check_total(10**12, "x")
    with pytest.raises(InputLimitError, match="max_image_pixels=100"):
        lim.check_image(20, 20, "x")


def test_decode_checks_the_header_before_decoding(tmp_path, monkeypatch):
    p = _png(tmp_path / "a.png", 30, 20)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the limit"))
    with open(p, "rb") as f, pytest.raises(InputLimitError, match="30x20 = 600 pixels"):
        decode_image(f, "a.png", InputLimits(max_image_pixels=599))


def test_images_within_the_limits_load_unchanged(tmp_path):
    _png(tmp_path / "wide.png", 400, 20)  # exactly 20:1
    names, x = load_inputs(tmp_path / "wide.png", PRE)
    assert names == [str(tmp_path / "wide.png")] and x.shape == (1, 3, 32, 32)
    with open(tmp_path / "wide.png", "rb") as f:
        np.testing.assert_array_equal(x[0], PRE(Image.open(f)))


def test_the_pixel_total_runs_over_a_directory(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 10, 10)
    assert len(load_inputs(tmp_path, PRE, InputLimits(max_total_pixels=300))[0]) == 3
    with pytest.raises(InputLimitError, match="holds 300 pixels in all .* max_total_pixels=299"):
        load_inputs(tmp_path, PRE, InputLimits(max_total_pixels=299))


def test_npy_reader_matches_numpy(tmp_path):
    for i, arr in enumerate([np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                             np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))]):
        np.save(tmp_path / f"{i}.npy", arr)
        got = read_npy(tmp_path / f"{i}.npy")
        np.testing.assert_array_equal(got, arr)
        assert got.dtype == arr.dtype
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ones(3, np.float32), version=(2, 0))
    (tmp_path / "v2.npy").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(read_npy(tmp_path / "v2.npy"), np.ones(3, np.float32))


def test_npy_size_is_checked_from_the_header(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.float64))  # 128 bytes
    assert read_npy(tmp_path / "a.npy", InputLimits(max_array_bytes=128)).shape == (4, 4)
    with pytest.raises(InputLimitError, match="claims 128 bytes .* max_array_bytes=127"):
        read_npy(tmp_path / "a.npy", InputLimits(max_array_bytes=127))


def test_npy_format_3_is_refused_by_name(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ones(3, np.float32), version=(3, 0))
    (tmp_path / "v3.npy").write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="format version 3.0"):
        read_npy(tmp_path / "v3.npy")


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_only_regular_files_are_opened(tmp_path, kind):
    p = tmp_path / "x.jpg"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    else:
        p = "/dev/null"
    with pytest.raises(InputError, match="is not a regular file"):
        open_regular(p)


def test_a_directory_listing_skips_fifos(tmp_path):
    _png(tmp_path / "a.png", 8, 8)
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "c.png").symlink_to(tmp_path / "b.png")
    assert list_images(tmp_path) == [tmp_path / "a.png"]
    assert load_inputs(tmp_path, PRE)[0] == [str(tmp_path / "a.png")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_samples_match_isfinite(dtype):
    # The oracle is numpy's element-wise isfinite, sample by sample; the one-pass check must
    # name exactly those samples, including huge finite values whose squares overflow.
    from moqe_compile.tasks.image.preprocess import all_finite, nonfinite_samples

    rng = np.random.default_rng(0)
    for trial in range(40):
        x = rng.normal(size=(6, 3, 8, 8)).astype(dtype)
        for _ in range(trial % 4):
            x[tuple(rng.integers(0, s) for s in x.shape)] = rng.choice([np.nan, np.inf, -np.inf])
        if trial % 5 == 0:
            x[tuple(rng.integers(0, s) for s in x.shape)] = np.finfo(dtype).max / 2
        expected = np.flatnonzero(~np.isfinite(x).reshape(6, -1).all(axis=1)).tolist()
        assert nonfinite_samples(x) == expected
        if all_finite(x):  # "clean" is never wrong; "maybe not" may be (overflow)
            assert np.isfinite(x).all()


def test_all_finite_reads_non_contiguous_batches():
    from moqe_compile.tasks.image.preprocess import all_finite

    x = np.zeros((4, 3, 8, 8), np.float32)
    x[2, 1, 3, 3] = np.nan
    assert all_finite(x[:, :, ::2]) and not all_finite(x[:, :, 1::2])


def test_big_endian_float32_batches_read_as_the_same_numbers(tmp_path):
    from moqe_compile.tasks.image.preprocess import load_inputs

    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "be.npy", x.astype(">f4"))
    _, got = load_inputs(tmp_path / "be.npy", PRE)
    assert got.dtype == np.float32 and got.dtype.byteorder in ("=", "<", "|")
    np.testing.assert_array_equal(got, x)
