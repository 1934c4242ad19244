"""export-triton: configs parse as Triton's ModelConfig, and the BLS model.py, run against a
stand-in for Triton's ``triton_python_backend_utils`` (Triton itself cannot be installed
here), answers exactly like the in-process Runtime."""

import asyncio
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tritonclient.grpc")
from google.protobuf import json_format  # noqa: E402

import moqe_compile  # noqa: E402
from moqe_compile import Runtime  # noqa: E402
from moqe_compile.errors import BackendError, BundleError, ConfigError, InputError  # noqa: E402
from moqe_compile.serving.triton import TritonExport, export_triton, parse_config, plan_models  # noqa: E402

from ..models import CROP, ROUTED_EXPERTS, ROUTED_FALLBACK, routed_oracle, routed_reference  # noqa: E402
from ..runtime.test_routed import ATOL, CONF_ATOL, RTOL, mixed_batch  # noqa: E402


@pytest.fixture(scope="module")
def repo(routed_bundle, tmp_path_factory):
    return export_triton(routed_bundle, tmp_path_factory.mktemp("triton") / "repo", TritonExport(name="moqe"))


def test_repository_layout_and_configs_parse(repo, routed_bundle):
    rt = Runtime.load(routed_bundle)
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted(["moqe", "router", *[f"expert_{e}" for e in rt.expert_names]])
    for d in repo.iterdir():
        cfg = parse_config((d / "config.pbtxt").read_text(), d.name)
        assert cfg.name == d.name and cfg.max_batch_size == 64
        if d.name == "moqe":
            assert cfg.backend == "python" and cfg.dynamic_batching.max_queue_delay_microseconds == 2000
            assert [o.name for o in cfg.output] == ["logits", "expert", "expert_name", "router_confidence"]
        else:
            assert cfg.platform == "onnxruntime_onnx" and (d / "1" / "model.onnx").is_file()
            assert list(cfg.input[0].dims) == [3, CROP, CROP]
    rt.close()


def test_bls_ships_the_runtimes_own_dispatch_code(repo):
    pkg = Path(moqe_compile.__file__).parent
    assert (repo / "moqe/1/moqe_dispatch.py").read_bytes() == (pkg / "runtime/dispatch.py").read_bytes()
    assert (repo / "moqe/1/moqe_fallback.py").read_bytes() == (pkg / "router/fallback.py").read_bytes()


# --- a stand-in for triton_python_backend_utils, backed by ONNX Runtime ------------------

def _fake_pb_utils(repo: Path, router_override=None):
    pb = types.ModuleType("triton_python_backend_utils")
    sessions, calls = {}, []

    class Tensor:
        def __init__(self, name, arr):
            self._name, self._arr = name, np.asarray(arr)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._arr

    class TritonError:
        def __init__(self, msg):
            self._msg = msg

        def message(self):
            return self._msg

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self._error = output_tensors, error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

        async def async_exec(self):
            calls.append((self.model_name, len(self.inputs[0].as_numpy())))
            if self.model_name == "router" and router_override is not None:
                return InferenceResponse([Tensor(self.outputs[0], router_override(self.inputs[0].as_numpy()))])
            if self.model_name not in sessions:
                sessions[self.model_name] = ort.InferenceSession(str(repo / self.model_name / "1/model.onnx"))
            s = sessions[self.model_name]
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            y = s.run(self.outputs, feeds)
            return InferenceResponse([Tensor(n, v) for n, v in zip(self.outputs, y)])

    def get_tensor(obj, name):
        ts = obj.inputs if hasattr(obj, "inputs") else obj.output_tensors
        return next((t for t in ts if t.name() == name), None)

    class TritonModelException(Exception):
        pass

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = (Tensor, TritonError, InferenceResponse,
                                                                            InferenceRequest)
    pb.get_input_tensor_by_name = pb.get_output_tensor_by_name = get_tensor
    pb.TritonModelException = TritonModelException
    pb.calls = calls
    return pb


def _load_bls(repo, monkeypatch, router_override=None):
    pb = _fake_pb_utils(repo, router_override)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("moqe_bls_model", repo / "moqe/1/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = parse_config((repo / "moqe/config.pbtxt").read_text(), "moqe")
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True))})
    return model, pb


class _Req:
    def __init__(self, pb, x):
        self.inputs = [pb.Tensor("input", x)]


def _batch(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)


def test_bls_answers_each_request_with_its_constructed_expert(repo, routed_bundle, monkeypatch):
    model, pb = _load_bls(repo, monkeypatch)
    mixed = mixed_batch(24, seed=20)  # every expert and the fallback
    xs = [mixed[:3], mixed[3:17], mixed[17:]]
    resps = asyncio.run(model.execute([_Req(pb, x) for x in xs]))
    for x, r in zip(xs, resps):
        idx, conf, logits = routed_reference(routed_bundle, x)
        got = {t.name(): t.as_numpy() for t in r.output_tensors}
        np.testing.assert_allclose(got["logits"], logits, rtol=RTOL, atol=ATOL)
        assert got["expert"].ravel().tolist() == idx.tolist()
        assert [e.decode() for e in got["expert_name"].ravel()] == [ROUTED_EXPERTS[k] for k in idx]
        np.testing.assert_allclose(got["router_confidence"].ravel(), conf, atol=CONF_ATOL)
    # One router call for the three merged requests, then one call per expert with its share.
    counts = np.bincount(routed_oracle(mixed)[0], minlength=3)
    assert pb.calls[0] == ("router", 24)
    assert sorted(pb.calls[1:]) == sorted((f"expert_{n}", int(c)) for n, c in zip(ROUTED_EXPERTS, counts))


def test_bls_applies_the_fallback_threshold_of_the_manifest(repo, monkeypatch):
    # Router probabilities on either side of the bundle's threshold (0.6): below it the
    # fallback expert serves, at or above it the router's choice.
    probs = np.array([[0.59, 0.01, 0.40], [0.60, 0.10, 0.30], [0.05, 0.35, 0.60], [0.20, 0.2, 0.59999]],
                     np.float32)
    model, pb = _load_bls(repo, monkeypatch, router_override=lambda x: probs[:len(x)])
    (resp,) = asyncio.run(model.execute([_Req(pb, _batch(4, seed=4))]))
    got = {t.name(): t.as_numpy() for t in resp.output_tensors}
    assert got["expert"].ravel().tolist() == [ROUTED_FALLBACK, 0, 2, ROUTED_FALLBACK]
    np.testing.assert_allclose(got["router_confidence"].ravel(), probs.max(1))


def test_bls_groups_forced_mixed_routing_one_request_per_expert(repo, routed_bundle, monkeypatch):
    forced = np.array([2, 0, 1, 2, 0, 0])

    def router(x):
        p = np.full((len(x), 3), 0.05, np.float32)
        p[np.arange(len(x)), forced[: len(x)]] = 0.9
        return p

    model, pb = _load_bls(repo, monkeypatch, router_override=router)
    x = _batch(6, seed=3)
    (resp,) = asyncio.run(model.execute([_Req(pb, x)]))
    got = {t.name(): t.as_numpy() for t in resp.output_tensors}
    assert got["expert"].ravel().tolist() == forced.tolist()
    assert sorted(pb.calls[1:]) == sorted(("expert_" + n, c) for n, c in zip(ROUTED_EXPERTS, (3, 1, 2)))
    for i, k in enumerate(forced):  # each expert's graph alone, in plain onnxruntime
        alone = ort.InferenceSession(str(routed_bundle / f"experts/{ROUTED_EXPERTS[k]}/onnxruntime-cpu.onnx"))
        np.testing.assert_allclose(got["logits"][i], alone.run(None, {"input": x[i:i + 1]})[0][0],
                                   rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory, tiny_onnx, tiny_images):
    """A tiny bundle with the tensorrt (S8S8) variant and engines recorded by the real
    ``add_engines``; the engine files are stand-in bytes (TensorRT is not installed here)."""
    from moqe_compile.backends.tensorrt import EngineRecord, add_engines
    from moqe_compile.build import build

    from ..models import tiny_config

    cfg = tiny_config(tiny_onnx, tiny_images)
    cfg.backends.targets = ["onnxruntime-cpu", "tensorrt"]
    tmp = tmp_path_factory.mktemp("engines")
    root = build(cfg, tmp / "bundle", quiet=True)
    first = json.loads((root / "manifest.json").read_text())["experts"][0]["name"]
    for cc, hw in (("9.0", "none"), ("8.0", "ampere_plus"), ("9.0", "ampere_plus")):
        f = tmp / f"{cc}-{hw}.bin"
        f.write_bytes(f"engine {cc} {hw}".encode())
        add_engines(root, {first: (f, EngineRecord(f.name, cc, "10.14.1", hw))})
    return root, first


def test_tensorrt_engines_become_plan_models(engine_bundle, tmp_path):
    root, first = engine_bundle
    repo = export_triton(root, tmp_path / "r", TritonExport(name="b", instance_kind="KIND_GPU"))
    d = repo / f"expert_{first}"
    cfg = parse_config((d / "config.pbtxt").read_text(), d.name)
    assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    # One file per compute capability, exact build first; the portable engine is the default.
    assert dict(cfg.cc_model_filenames) == {"9.0": "sm90-trt10.14.1.plan",
                                            "8.0": "sm80-trt10.14.1-hw_ampere_plus.plan"}
    assert cfg.default_model_filename == "sm80-trt10.14.1-hw_ampere_plus.plan"
    assert sorted(p.name for p in (d / "1").iterdir()) == sorted(cfg.cc_model_filenames.values())
    assert (d / "1" / "sm90-trt10.14.1.plan").read_bytes() == b"engine 9.0 none"
    # Experts without engines keep their ONNX graph; the BLS model always runs on the CPU.
    others = [p for p in repo.iterdir() if p.name.startswith("expert_") and p != d]
    assert others and all(parse_config((p / "config.pbtxt").read_text(), p.name).platform == "onnxruntime_onnx"
                          for p in others)
    bls = parse_config((repo / "b" / "config.pbtxt").read_text(), "b")
    assert bls.instance_group[0].kind == bls.instance_group[0].KIND_CPU


def test_engines_are_ignored_on_cpu_instances_and_checked_against_the_batch_size(engine_bundle):
    from moqe_compile.bundle import read_bundle

    root, first = engine_bundle
    manifest = read_bundle(root).manifest
    cfgs = {c.name: files for c, files in plan_models(manifest, TritonExport(), "b")}
    assert list(cfgs[f"expert_{first}"]) == ["model.onnx"]
    with pytest.raises(ConfigError, match="takes batches up to 64, below max_batch_size 128; pass --max-batch 64"):
        plan_models(manifest, TritonExport(instance_kind="KIND_GPU", max_batch_size=128), "b")


def test_variant_tensorrt_ships_each_experts_s8s8_graph(engine_bundle, tmp_path, capsys):
    from moqe_compile.cli.main import main

    root, _ = engine_bundle
    assert main(["export-triton", str(root), "-o", str(tmp_path / "r"), "--name", "m", "--variant", "tensorrt"]) == 0
    capsys.readouterr()
    manifest = json.loads((root / "manifest.json").read_text())
    for e in manifest["experts"]:
        shipped = (tmp_path / "r" / f"expert_{e['name']}" / "1" / "model.onnx").read_bytes()
        assert shipped == (root / e["variants"]["tensorrt"]["path"]).read_bytes()
        assert shipped != (root / e["variants"]["onnxruntime-cpu"]["path"]).read_bytes()


def test_bad_options_and_existing_output_are_refused(routed_bundle, tmp_path):
    with pytest.raises(ConfigError, match="no 'tensorrt' graph"):
        export_triton(routed_bundle, tmp_path / "a", TritonExport(variant="tensorrt"))
    with pytest.raises(ConfigError, match="instance kind 'KIND_TPU'"):
        export_triton(routed_bundle, tmp_path / "a", TritonExport(instance_kind="KIND_TPU"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(BundleError, match="exists and is not empty; pass --force"):
        export_triton(routed_bundle, tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").is_file()
    export_triton(routed_bundle, tmp_path / "b", overwrite=True)
    assert not (tmp_path / "b" / "keep.txt").exists() and (tmp_path / "b" / "router" / "config.pbtxt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_without_tritonclient_the_export_says_what_to_install(routed_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # makes the import fail
    with pytest.raises(BackendError, match=r"pip install 'moqe-compile\[triton\]'"):
        export_triton(routed_bundle, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_config_parse_error_names_the_file():
    with pytest.raises(ConfigError, match="x/config.pbtxt: not a valid Triton ModelConfig"):
        parse_config('name: "x"\nmax_batch_sise: 4\n', "x/config.pbtxt")


def test_cli_export_triton(routed_bundle, tmp_path, capsys):
    from moqe_compile.cli.main import main

    assert main(["export-triton", str(routed_bundle), "-o", str(tmp_path / "r"), "--name", "m"]) == 0
    assert "Triton model repository written" in capsys.readouterr().out
    assert (tmp_path / "r" / "m" / "1" / "model.py").is_file()
    assert main(["export-triton", str(routed_bundle), "-o", str(tmp_path / "r"), "--kind", "KIND_TPU"]) == ConfigError.exit_code
    assert "instance kind 'KIND_TPU'" in capsys.readouterr().err


def test_bls_on_an_unrouted_bundle_serves_the_default_expert(single_bundle, tmp_path, monkeypatch):
    with Runtime.load(single_bundle) as rt:
        assert not rt.routed
        repo = export_triton(single_bundle, tmp_path / "r", TritonExport(name="moqe"))
        assert not (repo / "router").exists()
        model, pb = _load_bls(repo, monkeypatch)
        x = _batch(4, seed=1)
        (resp,) = asyncio.run(model.execute([_Req(pb, x)]))
        got = {t.name(): t.as_numpy() for t in resp.output_tensors}
        want = rt.run(x)
        np.testing.assert_allclose(got["logits"], want.logits, rtol=1e-5, atol=1e-5)
        assert set(got["expert"].ravel().tolist()) == {rt.default_expert}
        assert [c[0] for c in pb.calls] == [f"expert_{rt.expert_names[rt.default_expert]}"]


def _listing(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("flag, value", [("--name", "../../evil"), ("--name", ".hidden"), ("--name", "-x"),
                                         ("--prefix", "a/b"), ("--prefix", "../")])
def test_unsafe_name_or_prefix_is_refused_before_writing(routed_bundle, tmp_path, capsys, flag, value):
    from moqe_compile.cli.main import main

    out = tmp_path / "a" / "b" / "r"
    assert main(["export-triton", str(routed_bundle), "-o", str(out), f"{flag}={value}"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert f"{flag} {value!r} is not allowed" in err and f"Pass another {flag}" in err
    assert _listing(tmp_path) == set()  # neither the repository nor anything beside it


def test_model_names_must_be_safe_folder_names(routed_bundle, tmp_path):
    odd = tmp_path / "my bundle"  # the default --name is the bundle directory's name
    shutil.copytree(routed_bundle, odd)
    with pytest.raises(ConfigError, match="model name 'my bundle' is not allowed.*Pass --name"):
        export_triton(odd, tmp_path / "r")
    export_triton(odd, tmp_path / "r", TritonExport(name="my-bundle"))
    with pytest.raises(ConfigError, match=r"model name 'p{125}expert_\w+' is not allowed.*shorter --prefix"):
        export_triton(routed_bundle, tmp_path / "r2", TritonExport(name="m", prefix="p" * 125))


def test_expert_name_from_a_manifest_cannot_escape_the_output(routed_bundle, tmp_path, monkeypatch):
    from moqe_compile.bundle.reader import Bundle
    from moqe_compile.errors import BundlePathError
    from moqe_compile.serving import server, triton

    bundle = tmp_path / "work" / "b"
    shutil.copytree(routed_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    old, m["experts"][0]["name"] = m["experts"][0]["name"], "x/../../../escaped"
    m["routing"] = {k: "x/../../../escaped" if v == old else v for k, v in m["routing"].items()}
    (bundle / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "work" / "out" / "r"
    with pytest.raises(BundleError, match=r"expert name 'x/\.\./\.\./\.\./escaped' is not allowed"):
        export_triton(bundle, out, TritonExport(name="m"))
    # Past every name check (as a future bug might let it), the writer still keeps each path inside.
    monkeypatch.setattr(triton, "read_bundle", lambda p: Bundle(Path(p), m))
    monkeypatch.setattr(server, "check_servable", lambda p: None)
    monkeypatch.setattr(triton, "_check_model_names", lambda models: None)
    with pytest.raises(BundlePathError, match="must be relative and stay inside the output folder"):
        export_triton(bundle, out, TritonExport(name="m"))
    assert not list(tmp_path.rglob("escaped")) and not list((tmp_path / "work" / "out").iterdir())


def test_output_inside_the_bundle_or_holding_it_is_refused(routed_bundle, tmp_path):
    from moqe_compile.bundle import read_bundle

    bundle = tmp_path / "b"
    shutil.copytree(routed_bundle, bundle)
    before = _listing(bundle)
    with pytest.raises(InputError, match=r"-o '.*/b/repo' is inside the bundle .*Choose a directory outside it"):
        export_triton(bundle, bundle / "repo", TritonExport(name="m"))
    with pytest.raises(InputError, match="holds the bundle .*--force would delete it"):
        export_triton(bundle, tmp_path, TritonExport(name="m"), overwrite=True)
    assert _listing(bundle) == before
    read_bundle(bundle)


def test_the_repository_gets_the_users_permissions_not_mkdtemps(routed_bundle, tmp_path):
    """A Triton server running as another user must be able to read it (mkdtemp makes 0700)."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        repo = export_triton(routed_bundle, tmp_path / "repo", TritonExport(name="moqe"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755


def test_a_file_as_output_is_named_and_forcing_replaces_it_whole(routed_bundle, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(BundleError, match="is a file; choose a directory"):
        export_triton(routed_bundle, f, TritonExport(name="moqe"))
    export_triton(routed_bundle, f, TritonExport(name="moqe"), overwrite=True)
    assert f.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no .afile.old left


def test_a_terminated_export_removes_its_staging_folder(routed_bundle, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from moqe_compile.cli.main import main
    from moqe_compile.serving import triton

    monkeypatch.setattr(triton, "_write_models", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export-triton", str(routed_bundle), "-o", str(out / "repo")]) == 143
    assert list(out.iterdir()) == []
