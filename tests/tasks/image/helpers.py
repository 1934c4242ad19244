"""Shared by the image tests: a prepared tiny model with calibration data, an expert build and a
plain ONNX Runtime run (expert-building tests); Fashion-MNIST's normalization and grayscale
preprocessing (data tests)."""

import numpy as np
import onnxruntime as ort

from moqe_compile.quantize import prepare_for_quantization
from moqe_compile.tasks.image.experts import build_expert
from moqe_compile.tasks.image.preprocess import Preprocess

from ...models import CROP

MEAN, STD = 0.286, 0.353  # Fashion-MNIST's pixel mean and std (0..1)


def gray_pre() -> Preprocess:
    return Preprocess(28, 28, (MEAN,), (STD,), channels=1)


def make_setup(tiny_onnx, d, n: int, seed: int):
    x = np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)
    return prepare_for_quantization(tiny_onnx, d / "prep.onnx"), x, d


def run_ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def build(setup, recipe, backends=("onnxruntime-cpu", "tensorrt")):
    """(expert info, {backend: path}) of ``recipe`` built on ``setup``."""
    prep, x, d = setup
    outs = {b: d / f"{recipe.name}.{b}.onnx" for b in backends}
    return build_expert(prep, "input", x, recipe, list(backends), outs, d / f"{recipe.name}.json", d), outs
