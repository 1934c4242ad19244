"""``build_bundle_engines`` and ``moqe-compile engines`` on their success path, with TensorRT's
builder replaced by a stand-in that writes the hash of the graph it was given (TensorRT is
not installed here): every expert gets its own engine, recorded and hash-checked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from moqe_compile.backends import tensorrt as trtb
from moqe_compile.bundle import read_bundle
from moqe_compile.cli.main import main


@pytest.fixture
def fake_builder(monkeypatch):
    """build_engine's stand-in: the "engine" is the sha256 of the ONNX graph it was built from."""
    calls = []

    def build_engine(onnx_path, out_path, *, min_batch=1, opt_batch=1, max_batch=64, hardware_compatibility="none",
                     version_compatible=False, workspace_mib=2048, device=None):
        digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
        Path(out_path).write_bytes(f"plan of {digest}".encode())
        calls.append((Path(onnx_path).name, opt_batch, max_batch, hardware_compatibility))
        return trtb.EngineRecord(Path(out_path).name, "9.0", "10.14.1", hardware_compatibility,
                                 version_compatible=version_compatible, onnx_sha256=digest, opt_batch=opt_batch,
                                 max_batch=max_batch)

    monkeypatch.setattr(trtb, "build_engine", build_engine)
    return calls


def _check_engines(root: Path, hardware: str, max_batch: int) -> None:
    m = read_bundle(root, verify=True).manifest  # every engine is hashed under `files`
    for e in m["experts"]:
        (rec,) = e["variants"]["tensorrt"]["engines"]
        graph = (root / e["variants"]["tensorrt"]["path"]).read_bytes()
        # this expert's own S8S8 graph, not another expert's
        assert (root / rec["path"]).read_bytes() == f"plan of {hashlib.sha256(graph).hexdigest()}".encode()
        assert rec["hardware_compatibility"] == hardware and rec["max_batch"] == max_batch
        assert rec["path"].startswith(f"experts/{e['name']}/tensorrt/")
    assert not list(root.glob(".*.partial"))  # the partial files were moved into place


def test_build_bundle_engines_records_one_engine_per_expert(bundle, fake_builder):
    recs = trtb.build_bundle_engines(bundle, max_batch=16, opt_batch=4, hardware_compatibility="ampere_plus")
    assert len(recs) == 3 and len(fake_builder) == 3
    assert {c[1:] for c in fake_builder} == {(4, 16, "ampere_plus")}
    _check_engines(bundle, "ampere_plus", 16)


def test_engines_command_builds_them(bundle, fake_builder, capsys):
    assert main(["engines", str(bundle), "--trt-max-batch", "8"]) == 0
    _check_engines(bundle, "none", 8)


def test_engines_for_a_bundle_without_tensorrt_graphs_is_a_config_error(tiny_bundle, fake_builder, capsys):
    """The bundle is sound (not exit 4): it was built for other backends, and the message says how to build one."""
    from moqe_compile.errors import ConfigError

    assert main(["engines", str(tiny_bundle)]) == ConfigError.exit_code
    assert "has no tensorrt variant" in capsys.readouterr().err and not fake_builder
