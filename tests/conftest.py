"""Session fixtures over the tiny models of tests/models.py, so the suite runs in minutes on 2 CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .models import (make_routed_bundle, make_tiny_lm, tiny_config, tiny_lm_config, write_cnn, write_corpus, write_fake_fmnist,
                     write_gray_cnn, write_images)


def pytest_collection_modifyitems(config, items):
    """The one shared GPU marker: ``@pytest.mark.gpu`` tests skip without an NVIDIA GPU
    (``MOQE_GPU_TESTS=1`` runs them wherever the device nodes are named differently)."""
    has_gpu = os.path.exists("/dev/nvidia0") or os.environ.get("MOQE_GPU_TESTS") == "1"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """The ``cnn`` model: (batch, 3, CROP, CROP) -> NUM_CLASSES logits."""
    return write_cnn(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """16 labelled images (4 classes, class-dependent colour + noise) in class-index folders."""
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_onnx, tiny_images) -> Path:
    """The tiny image bundle (three experts, routing forced)."""
    from moqe_compile.build import build

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build(tiny_config(tiny_onnx, tiny_images), out, quiet=True)


@pytest.fixture(scope="session")
def routed_bundle(tmp_path_factory) -> Path:
    """The ``routed-bundle``: routes by the input's brightest channel, with a fallback, by
    construction (``models.routed_oracle`` / ``routed_reference`` are its oracles)."""
    return make_routed_bundle(tmp_path_factory.mktemp("bundles") / "routed")


@pytest.fixture(scope="session")
def tiny_gray_onnx(tmp_path_factory) -> Path:
    """The ``gray-cnn`` model: (batch, 1, GRAY_CROP, GRAY_CROP) -> NUM_CLASSES logits."""
    return write_gray_cnn(tmp_path_factory.mktemp("tiny_gray"))


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST in the original idx gz files ({split: (images, labels)}); the
    ``fashion-mnist`` data source reads it (its DATA_DIR points at it)."""
    from moqe_compile.tasks.image import fashion_mnist as fm

    data = write_fake_fmnist(tmp_path)
    monkeypatch.setattr(fm, "DATA_DIR", tmp_path)
    return data

@pytest.fixture(scope="session")
def lm_bundle(tmp_path_factory):
    """(bundle directory, work directory) of a tiny causal-LM bundle (transformers needed)."""
    pytest.importorskip("transformers")
    from moqe_compile.build import build as build_lm

    tmp = tmp_path_factory.mktemp("lm")
    make_tiny_lm(tmp / "model")
    write_corpus(tmp / "corpus.txt")
    return build_lm(tiny_lm_config(tmp), tmp / "bundle", quiet=True), tmp


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train tiny routers (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    with several intra-op threads (and other processes on the cores) torch spends more time
    handing work between threads than computing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
