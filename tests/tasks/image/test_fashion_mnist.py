"""Fashion-MNIST source and 1-channel preprocessing, on tiny fake idx files (no apt package needed)."""

import gzip
import json
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import moqe_compile
from moqe_compile.tasks.image.config import (BuildConfig, DataConfig, ExpertRecipe, ModelConfig, PreprocessConfig,
                                 RouterConfig, load_recipe)
from moqe_compile.tasks.image import fashion_mnist as fm
from moqe_compile.tasks.image.data import SPLITS, build_splits, num_sources
from moqe_compile.tasks.image.preprocess import Preprocess, load_inputs
from moqe_compile.errors import ConfigError

from ...models import FMNIST_TEST as N_TEST
from ...models import FMNIST_TRAIN as N_TRAIN
from ...models import GRAY_CROP, NUM_CLASSES
from .helpers import MEAN, STD, gray_pre


def fmnist_data(**kw) -> DataConfig:
    return DataConfig(source="fashion-mnist", augmentations=kw.pop("augmentations", 0), targets="labels", **kw)


def test_parse_idx_files(fake_fmnist):
    for split in ("train", "test"):
        x, y = fm.load(split)
        ex, ey = fake_fmnist[split]
        assert x.dtype == np.uint8 and x.shape == ex.shape == (len(ey), 28, 28)
        assert y.dtype == np.int64 and np.array_equal(x, ex) and np.array_equal(y, ey)
    assert fm.size("train") == N_TRAIN and fm.size("test") == N_TEST
    assert len(fm.LABELS) == fm.NUM_CLASSES == 10


def test_missing_files_name_the_path_and_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DATA_DIR", tmp_path / "nowhere")
    with pytest.raises(ConfigError) as e:
        fm.load("train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_corrupt_idx_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + b"abc")  # float magic
    with pytest.raises(ConfigError, match="unsigned-byte idx"):
        fm.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ConfigError, match="header says"):
        fm.read_idx(short)


def test_normalize_equals_grayscale_preprocess(fake_fmnist):
    x, _ = fake_fmnist["test"]
    pre = gray_pre()
    assert pre.input_shape == (1, 28, 28)
    ref = np.stack([pre(Image.fromarray(im)) for im in x[:8]])
    assert np.array_equal(fm.normalize(x[:8], MEAN, STD), ref)


def test_splits_are_disjoint_sized_and_labelled(fake_fmnist):
    cfg = fmnist_data(max_samples=100, seed=3)
    s = build_splits(cfg, gray_pre())
    assert list(s) == list(SPLITS)
    sizes = {k: len(v.x) for k, v in s.items()}
    assert sizes == {"calibration": 25, "router_train": 60, "router_val": 15, "test": N_TEST}
    assert num_sources(cfg) == 100 + N_TEST
    train_names = [set(s[k].sources) for k in SPLITS[:3]]
    assert sum(map(len, train_names)) == 100 and len(set.union(*train_names)) == 100
    assert all(n.startswith("train[") for names in train_names for n in names)
    assert s["test"].sources == [f"t10k[{i}]" for i in range(N_TEST)]
    xtr, ytr = fake_fmnist["train"]
    for k in SPLITS[:3]:
        d = s[k]
        assert d.x.dtype == np.float32 and d.x.shape[1:] == (1, 28, 28)
        idx = np.array([int(n[len("train["):-1]) for n in d.sources])
        assert np.array_equal(d.labels, ytr[idx])
        assert np.allclose(d.x[:, 0] * STD + MEAN, xtr[idx] / 255.0, atol=1e-6)
    xte, yte = fake_fmnist["test"]
    assert np.array_equal(s["test"].labels, yte) and s["test"].x.shape == (N_TEST, 1, 28, 28)
    # Seeded: the same seed gives the same split, another seed another one.
    assert build_splits(cfg, gray_pre())["calibration"].sources == s["calibration"].sources
    assert build_splits(fmnist_data(max_samples=100, seed=4), gray_pre())["calibration"].sources != \
        s["calibration"].sources


def test_max_samples_zero_uses_the_whole_train_set(fake_fmnist):
    s = build_splits(fmnist_data(), gray_pre())
    assert sum(len(s[k].x) for k in SPLITS[:3]) == N_TRAIN


@pytest.mark.parametrize("kw,pre,match", [
    ({"augmentations": 2}, None, "augmentations = 2"),
    ({"max_samples": N_TRAIN + 1}, None, "max_samples = 201 exceeds"),
    ({"max_samples": 2}, None, "too small"),
    ({}, Preprocess(32, 28, (MEAN,), (STD,), channels=1), "resize = 32"),
    ({}, Preprocess(28, 28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "channels = 3"),
])
def test_bad_settings_are_named(fake_fmnist, kw, pre, match):
    with pytest.raises(ConfigError, match=match):
        build_splits(fmnist_data(**kw), pre or gray_pre())


def test_preprocess_config_channels():
    assert PreprocessConfig().channels == 3
    PreprocessConfig(resize=28, crop=28, mean=[0.3], std=[0.4], channels=1)
    with pytest.raises(ConfigError, match=r"mean = \[0.3\] must have 3 value"):
        PreprocessConfig(mean=[0.3])
    with pytest.raises(ConfigError, match=r"std = .* must have 1 value"):
        PreprocessConfig(mean=[0.3], std=[0.2, 0.2, 0.2], channels=1)
    with pytest.raises(ConfigError, match="channels = 2"):
        PreprocessConfig(channels=2)
    with pytest.raises(ConfigError, match="max_samples"):
        DataConfig(max_samples=-1)
    # Manifests written before grayscale support have no "channels": RGB.
    old = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.from_dict(old).channels == 3 and Preprocess.from_dict(old).input_shape == (3, 224, 224)


def test_recipe_keeps_named_source_and_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "r.toml").write_text(
        '[model]\nsource = "onnx"\npath = "~/m/model.onnx"\nnum_classes = 10\nlabels = "labels.txt"\n'
        '[preprocessing]\nchannels = 1\nresize = 28\ncrop = 28\nmean = [0.286]\nstd = [0.353]\n'
        '[data]\nsource = "fashion-mnist"\naugmentations = 0\nmax_samples = 100\n'
    )
    cfg = load_recipe(tmp_path / "r.toml")
    assert cfg.data.source == "fashion-mnist" and cfg.data.max_samples == 100
    assert cfg.model.path == str(tmp_path / "home" / "m" / "model.onnx")
    assert cfg.model.labels == str(tmp_path / "labels.txt")
    assert cfg.preprocessing.channels == 1


def test_shipped_fmnist_recipe_is_valid():
    cfg = load_recipe(Path(moqe_compile.__file__).parent / "recipes" / "fmnist-cnn.toml")
    assert (cfg.preprocessing.channels, cfg.preprocessing.crop, cfg.router.input_size) == (1, 28, 28)
    assert cfg.data.source == "fashion-mnist" and cfg.data.augmentations == 0
    assert cfg.model.path.endswith("fmnist_cnn/model.onnx") and "~" not in cfg.model.path


def test_grayscale_build_end_to_end(fake_fmnist, tiny_gray_onnx, tmp_path):
    from moqe_compile import Runtime
    from moqe_compile.build import build

    cfg = BuildConfig(
        model=ModelConfig(source="onnx", path=str(tiny_gray_onnx), num_classes=NUM_CLASSES, labels=""),
        preprocessing=PreprocessConfig(resize=GRAY_CROP, crop=GRAY_CROP, mean=[MEAN], std=[STD], channels=1),
        data=fmnist_data(max_samples=120),
        experts=[ExpertRecipe(name="minmax", calibration="minmax"),
                 ExpertRecipe(name="entropy", calibration="entropy")],
        router=RouterConfig(input_size=GRAY_CROP, epochs=2, batch_size=16),
    )
    out = build(cfg, tmp_path / "gray", quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["io"]["input"]["shape"] == ["batch", 1, GRAY_CROP, GRAY_CROP]
    assert manifest["preprocessing"]["channels"] == 1 and manifest["preprocessing"]["color"] == "L"
    assert manifest["splits"]["test"]["samples"] == N_TEST
    assert manifest["splits"]["calibration"]["samples"] == 30
    assert BuildConfig.from_manifest(manifest["build_config"]).to_dict() == cfg.to_dict()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["splits"]["test"]["n"] == N_TEST and report["targets"] == "labels"

    # The runtime prepares raw grayscale inputs exactly as the build did.
    x_raw, _ = fake_fmnist["test"]
    np.save(tmp_path / "raw.npy", x_raw[:5])
    Image.fromarray(x_raw[0]).save(tmp_path / "one.png")
    with Runtime.load(out) as rt:
        assert rt.preprocess == Preprocess.from_dict(asdict(cfg.preprocessing))
        _, batch = rt.load_inputs(tmp_path / "raw.npy")
        assert batch.shape == (5, 1, GRAY_CROP, GRAY_CROP)
        assert np.array_equal(batch, fm.normalize(x_raw[:5], MEAN, STD))
        _, one = load_inputs(tmp_path / "one.png", rt.preprocess)
        assert np.array_equal(one, batch[:1])
        res = rt.run(batch)
        assert res.logits.shape == (5, NUM_CLASSES) and set(res.experts) <= {"minmax", "entropy"}
