"""Tiny models and images built in the tests themselves, so the suite runs in minutes on 2 CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from moqe_compile.tasks.image.config import (BuildConfig, ControlsConfig, DataConfig, ExpertRecipe, GateConfig, ModelConfig,
                                 PreprocessConfig, RouterConfig)

CROP = 32
NUM_CLASSES = 4


def pytest_collection_modifyitems(config, items):
    """The one shared GPU marker: ``@pytest.mark.gpu`` tests skip without an NVIDIA GPU
    (``MOQE_GPU_TESTS=1`` runs them wherever the device nodes are named differently)."""
    has_gpu = os.path.exists("/dev/nvidia0") or os.environ.get("MOQE_GPU_TESTS") == "1"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    from moqe_compile.tasks.image.model import export_torch

    torch.manual_seed(0)
    m = TinyCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    out = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_torch(m, out, CROP, 18)
    return out


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """16 labelled images (4 classes, class-dependent colour + noise) in class-index folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        c = i % NUM_CLASSES
        d = root / str(c)
        d.mkdir(exist_ok=True)
        base = np.zeros((40, 40, 3), np.float32)
        base[..., c % 3] = 160 + 20 * c
        img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img_{i:02d}.png")
    return root


def tiny_config(model_path: Path, images: Path, **data_kw) -> BuildConfig:
    return BuildConfig(
        model=ModelConfig(source="onnx", path=str(model_path), num_classes=NUM_CLASSES, labels=""),
        preprocessing=PreprocessConfig(resize=36, crop=CROP),
        data=DataConfig(source=str(images), augmentations=3, **data_kw),
        experts=[ExpertRecipe(name="minmax", calibration="minmax"),
                 ExpertRecipe(name="pct", calibration="percentile", percentile=99.9),
                 ExpertRecipe(name="entropy", calibration="entropy")],
        router=RouterConfig(input_size=8, epochs=3, batch_size=8),
        controls=ControlsConfig(copies=2),
        # The untrained tiny model's experts are indistinguishable, so the significance gate
        # would (rightly) refuse the router; tests of the routed path keep it. The gate's own
        # branches are tested in tests/evaluate/test_gate.py.
        gate=GateConfig(force_routing=True),
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_onnx, tiny_images) -> Path:
    from moqe_compile.build import build

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build(tiny_config(tiny_onnx, tiny_images), out, quiet=True)


GRAY_CROP = 28


@pytest.fixture(scope="session")
def tiny_gray_onnx(tmp_path_factory) -> Path:
    """TinyCNN with a 1-channel stem: input (batch, 1, 28, 28), NUM_CLASSES outputs."""
    from moqe_compile.tasks.image.model import export_torch

    torch.manual_seed(0)
    m = TinyCNN()
    m.body[0] = nn.Conv2d(1, 8, 3, padding=1)
    m.eval()
    out = tmp_path_factory.mktemp("tiny_gray") / "tiny_gray.onnx"
    export_torch(m, out, GRAY_CROP, 18, channels=1)
    return out


LM_EXPERTS = ["w8a8-rtn", "w4-awq", "w4-gptq"]  # w4-awq = rescale + re-export + ORT RTN; SmoothQuant: test_lm_parts.py


def tiny_lm_config(tmp: Path, **router):
    """The causal-LM recipe on the tiny Llama in ``tmp/model`` and the corpus ``tmp/corpus.txt``."""
    from moqe_compile.tasks.causal_lm.config import LMBuildConfig

    return LMBuildConfig.from_dict({
        "task": "causal-lm", "model": {"source": "transformers", "path": str(tmp / "model")},
        "data": {"corpora": [str(tmp / "corpus.txt")], "seq_len": 32, "calibration_sequences": 4},
        "experts": [{"name": n, "preset": n} for n in LM_EXPERTS],
        "router": {"prefix_tokens": 8, "epochs": 2, **router},
        "controls": {"copies": 2}})  # fewer copies than experts: their router has its own width


@pytest.fixture(scope="session")
def lm_bundle(tmp_path_factory):
    """(bundle directory, work directory) of a tiny causal-LM bundle (transformers needed)."""
    pytest.importorskip("transformers")
    from moqe_compile.build import build as build_lm

    from .lm.tiny import make_tiny_lm, write_corpus

    tmp = tmp_path_factory.mktemp("lm")
    make_tiny_lm(tmp / "model")
    write_corpus(tmp / "corpus.txt")
    return build_lm(tiny_lm_config(tmp), tmp / "bundle", quiet=True), tmp
