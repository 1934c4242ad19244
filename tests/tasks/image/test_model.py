import onnx
import pytest
import timm
import torch

from moqe_compile.tasks.image.config import ModelConfig, PreprocessConfig
from moqe_compile.errors import BuildError, ConfigError
from moqe_compile.tasks.image.model import load_fp_model
from moqe_compile.tasks.image.model import check_fp_onnx

from ...models import CROP, TinyCNN


def test_onnx_source_keeps_symbolic_batch(tiny_onnx, tmp_path):
    fp = load_fp_model(ModelConfig(source="onnx", path=str(tiny_onnx), num_classes=4, labels=""),
                       PreprocessConfig(resize=36, crop=CROP), tmp_path / "fp.onnx")
    dim0 = onnx.load(str(fp.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert fp.labels == ["class_0", "class_1", "class_2", "class_3"]


def test_fixed_batch_onnx_is_rejected(tmp_path):
    p = tmp_path / "fixed.onnx"
    torch.onnx.export(TinyCNN().eval(), (torch.randn(1, 3, CROP, CROP),), str(p), input_names=["x"],
                      opset_version=18, dynamo=False)
    with pytest.raises(BuildError, match="fixed batch dimension"):
        check_fp_onnx(p, CROP, 4)


def test_timm_state_dict_source(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    cfg = ModelConfig(source="timm", arch="test_resnet", weights=str(tmp_path / "w.pth"), num_classes=4, labels="")
    fp = load_fp_model(cfg, PreprocessConfig(resize=36, crop=CROP), tmp_path / "fp.onnx")
    assert fp.path.is_file() and not (tmp_path / "fp.onnx.data").exists()


def test_weights_that_do_not_match_arch(tmp_path):
    torch.save(TinyCNN().state_dict(), tmp_path / "w.pth")
    cfg = ModelConfig(source="torchvision", arch="mobilenet_v2", weights=str(tmp_path / "w.pth"),
                      num_classes=4, labels="")
    with pytest.raises(ConfigError, match="do not match arch 'mobilenet_v2'"):
        load_fp_model(cfg, PreprocessConfig(), tmp_path / "fp.onnx")


def test_unknown_arch_and_missing_package(tmp_path):
    with pytest.raises(ConfigError, match="not a timm model name"):
        load_fp_model(ModelConfig(source="timm", arch="no_such_net", weights="x.pth", labels=""),
                      PreprocessConfig(), tmp_path / "fp.onnx")
    with pytest.raises(ConfigError, match="package 'not_a_pkg_xyz' is not installed"):
        load_fp_model(ModelConfig(weights="package:not_a_pkg_xyz/w.pth"), PreprocessConfig(), tmp_path / "f.onnx")


def test_timm_pretrained_without_hub_is_a_clear_error(tmp_path, monkeypatch):
    # Whether the hub is reachable or the weights cached differs between machines: timm is made
    # to fail as it does offline with an empty cache, so this test has one outcome everywhere.
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(arch, pretrained=False, **kw):
        if pretrained:
            raise LocalEntryNotFoundError("cannot find the requested files in the disk cache")
        return real(arch, pretrained=False, **kw)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    cfg = ModelConfig(source="timm", arch="test_resnet", weights="pretrained", num_classes=4, labels="")
    with pytest.raises(ConfigError, match="timm could not load pretrained 'test_resnet'.*state-dict file"):
        load_fp_model(cfg, PreprocessConfig(resize=36, crop=CROP), tmp_path / "fp.onnx")
    assert not (tmp_path / "fp.onnx").exists()
    with pytest.raises(ConfigError, match="is for source = 'timm'"):
        ModelConfig(source="torchvision", weights="pretrained")


def test_timm_pretrained_weights_are_exported_when_timm_has_them(tmp_path, monkeypatch):
    # A machine with the weights cached: timm returns the model, which is exported.
    real = timm.create_model
    asked = []

    def cached(arch, pretrained=False, **kw):
        asked.append(pretrained)
        return real(arch, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", cached)
    cfg = ModelConfig(source="timm", arch="test_resnet", weights="pretrained", num_classes=4, labels="")
    fp = load_fp_model(cfg, PreprocessConfig(resize=36, crop=CROP), tmp_path / "fp.onnx")
    assert asked == [True] and fp.path.is_file()
