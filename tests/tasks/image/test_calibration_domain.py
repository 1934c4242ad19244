"""Per-domain calibration: an expert with ``calibration_domain`` is calibrated on that domain's
calibration samples only; the others (and the copies control) on the whole calibration split."""

import json
from dataclasses import asdict

import numpy as np

from moqe_compile.build import build
from moqe_compile.tasks.image import steps
from moqe_compile.tasks.image.config import (BuildConfig, ControlsConfig, DataConfig, ExpertRecipe, ModelConfig,
                                 PreprocessConfig, RouterConfig)
from moqe_compile.tasks.image import fashion_mnist as fm
from moqe_compile.tasks.image.data import build_splits
from moqe_compile.tasks.image.preprocess import Preprocess

from ...models import GRAY_CROP, NUM_CLASSES
from .helpers import MEAN, STD

DOMAINS = ["original", "inverted"]


def test_build_calibrates_each_expert_on_its_domain(fake_fmnist, tiny_gray_onnx, tmp_path, monkeypatch):
    seen = {}
    real = steps.build_expert

    def spy(prepared, input_name, calib, recipe, *a, **kw):
        seen[recipe.name] = np.array(calib)
        return real(prepared, input_name, calib, recipe, *a, **kw)

    monkeypatch.setattr(steps, "build_expert", spy)
    cfg = BuildConfig(
        model=ModelConfig(source="onnx", path=str(tiny_gray_onnx), num_classes=NUM_CLASSES, labels=""),
        preprocessing=PreprocessConfig(resize=GRAY_CROP, crop=GRAY_CROP, mean=[MEAN], std=[STD], channels=1),
        data=DataConfig(source=fm.DOMAINS_SOURCE, domains=DOMAINS, augmentations=0, targets="labels",
                        max_samples=120),
        experts=[ExpertRecipe(name="mix", calibration="minmax"),
                 ExpertRecipe(name="inv", calibration="minmax", calibration_domain="inverted")],
        router=RouterConfig(input_size=GRAY_CROP, epochs=1, batch_size=16),
        controls=ControlsConfig(copies=0),
    )
    out = build(cfg, tmp_path / "b", quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["calibration"]["samples"] == 30
    # "mix": the whole calibration split (both domains); "inv": its inverted samples only.
    mix, inv = seen["mix"], seen["inv"]
    assert len(mix) == 30 and 0 < len(inv) < 30
    cal = build_splits(cfg.data, Preprocess.from_dict(asdict(cfg.preprocessing)))["calibration"]
    assert np.array_equal(mix, cal.x)
    assert np.array_equal(inv, cal.x[cal.domains == "inverted"])
    idx = np.array([int(s[6:-1]) for s in cal.sources])[cal.domains == "inverted"]
    assert np.all(idx % 2 == 1)  # domains[index % 2]
    raw, _ = fake_fmnist["train"]
    assert np.array_equal(inv, fm.normalize(255 - raw[idx], MEAN, STD))
    # The recipe (and so the manifest) records the domain; the experts' ranges differ.
    recipes = {e["name"]: e["recipe"] for e in manifest["experts"]}
    assert recipes["inv"]["calibration_domain"] == "inverted" and recipes["mix"]["calibration_domain"] == ""
    ranges = {n: (out / f"experts/{n}/calibration.json").read_text() for n in ("mix", "inv")}
    assert ranges["mix"] != ranges["inv"]
    assert BuildConfig.from_manifest(manifest["build_config"]).to_dict() == cfg.to_dict()
