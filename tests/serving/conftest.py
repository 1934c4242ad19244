import pytest

from ..models import tiny_config


@pytest.fixture(scope="session")
def routed_bundle(tiny_bundle):
    """The shared tiny bundle, built with force_routing: serving is tested on the routed path."""
    return tiny_bundle


@pytest.fixture(scope="session")
def single_bundle(tmp_path_factory, tiny_onnx, tiny_images):
    """A tiny bundle whose gate refused routing (a threshold no paired test can pass)."""
    from moqe_compile.tasks.image.config import ControlsConfig, GateConfig
    from moqe_compile.build import build

    cfg = tiny_config(tiny_onnx, tiny_images)
    cfg.gate = GateConfig(p_value=1e-12)
    cfg.controls = ControlsConfig(copies=0)
    return build(cfg, tmp_path_factory.mktemp("bundles") / "tiny-single", quiet=True)
