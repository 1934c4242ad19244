"""The image ``Runtime`` (``tasks/image/runtime.py``) on a tiny bundle: outputs and routing equal
the raw ONNX Runtime sessions of each expert, one-expert and mixed batches, thread safety and
the errors it raises."""

import threading

import numpy as np
import pytest

from moqe_compile import Runtime
from moqe_compile.errors import BackendError, InputError

from ...models import CROP


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    with Runtime.load(tiny_bundle) as r:
        yield r


def _batch(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)


def _raw_expert(bundle, manifest, name):
    """The expert's graph on a plain ONNX Runtime session: the oracle for Runtime's outputs."""
    import onnxruntime as ort

    e = next(e for e in manifest["experts"] if e["name"] == name)
    return ort.InferenceSession(str(bundle / e["variants"]["onnxruntime-cpu"]["path"]),
                                providers=["CPUExecutionProvider"])


def _alone(bundle, manifest, name, x1):
    raw = _raw_expert(bundle, manifest, name)
    return raw.run(None, {raw.get_inputs()[0].name: x1})[0][0]


def test_grouped_dispatch_equals_per_sample_expert(rt, tiny_bundle):
    x = _batch(24)
    res = rt.run(x)
    assert res.logits.shape == (24, 4) and len(res.experts) == 24
    assert np.all((res.confidence > 0) & (res.confidence <= 1))
    # Each sample's output is what its chosen expert's graph gives it alone on a plain
    # onnxruntime session (order kept); 1e-5: the same kernels on batch 1 vs a grouped batch.
    for i in range(24):
        solo = _alone(tiny_bundle, rt.manifest, res.experts[i], x[i : i + 1])
        np.testing.assert_allclose(res.logits[i], solo, rtol=1e-5, atol=1e-5)
    idx, _ = rt.route(x)
    assert [rt.expert_names[k] for k in idx] == res.experts


def test_forced_mixed_routing_keeps_order(rt, tiny_bundle, monkeypatch):
    # Make the grouping path non-trivial even if the tiny router prefers one expert.
    x = _batch(10, seed=1)
    forced = np.array([0, 1, 2, 0, 2, 1, 1, 0, 2, 2])
    monkeypatch.setattr(rt, "route", lambda b: (forced, np.ones(len(b), np.float32)))
    res = rt.run(x)
    for i, k in enumerate(forced):
        np.testing.assert_allclose(res.logits[i], _alone(tiny_bundle, rt.manifest, rt.expert_names[k], x[i : i + 1]),
                                   rtol=1e-5, atol=1e-5)


def test_threads_give_serial_results(rt):
    batches = [_batch(1 + i % 5, seed=i) for i in range(24)]
    serial = [rt.run(b) for b in batches]
    results = [None] * len(batches)

    def work(j):
        for i in range(j, len(batches), 4):
            results[i] = rt.run(batches[i])

    ts = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a.logits, b.logits)
        assert a.experts == b.experts


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 3, 8, 8), np.float32), r"shape \(2, 3, 8, 8\); expected \(N, 3, 32, 32\)"),
    (np.zeros((2, 3, CROP, CROP), np.float64), "dtype float64; expected float32"),
    (np.zeros((0, 3, CROP, CROP), np.float32), "batch is empty"),
])
def test_bad_batches(rt, bad, match):
    with pytest.raises(InputError, match=match):
        rt.run(bad)


def test_unknown_backend(tiny_bundle):
    from moqe_compile.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backend 'tpu'"):
        Runtime.load(tiny_bundle, backend="tpu")


def _gated(tiny_bundle, **kw):
    """The tiny bundle as if the gate had refused routing (the manifest Runtime is given)."""
    from moqe_compile.bundle import read_bundle

    b = read_bundle(tiny_bundle)
    m = {**b.manifest, "routing": {**b.manifest["routing"], "enabled": False}}
    return Runtime(b.root, m, "onnxruntime-cpu", **kw)


def test_gated_bundle_opens_its_expert_only_and_others_on_demand(tiny_bundle):
    with _gated(tiny_bundle) as g:
        default = g.expert_names[g.default_expert]
        assert [s is not None for s in g._experts] == [n == default for n in g.expert_names]
        assert not g.routed
        x = _batch(5, seed=3)
        res = g.run(x)
        raw = _raw_expert(tiny_bundle, g.manifest, default)
        np.testing.assert_allclose(res.logits, raw.run(None, {raw.get_inputs()[0].name: x})[0], rtol=1e-5, atol=1e-6)
        assert res.experts == [default] * 5
        other = next(n for n in g.expert_names if n != default)
        got = g.run_expert(other, x)  # opened now, once
        raw = _raw_expert(tiny_bundle, g.manifest, other)
        np.testing.assert_allclose(got, raw.run(None, {raw.get_inputs()[0].name: x})[0], rtol=1e-5, atol=1e-6)
        assert g._experts[g.expert_names.index(other)] is not None
    with _gated(tiny_bundle, all_experts=True) as g:
        assert all(s is not None for s in g._experts)


def test_gated_bundle_opens_an_expert_once_under_threads(tiny_bundle):
    with _gated(tiny_bundle) as g:
        other = next(n for n in g.expert_names if n != g.expert_names[g.default_expert])
        x = _batch(2, seed=4)
        seen = []
        ts = [threading.Thread(target=lambda: seen.append(g.run_expert(other, x))) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(seen) == 4 and all(np.array_equal(seen[0], s) for s in seen)
        assert g._experts[g.expert_names.index(other)] is not None


def test_only_expert_still_refuses_the_others(tiny_bundle):
    with Runtime.load(tiny_bundle, only_expert="minmax") as r:
        other = next(n for n in r.expert_names if n != "minmax")
        with pytest.raises(InputError, match="was not loaded"):
            r.run_expert(other, _batch(1))
        with pytest.raises(InputError, match="not in this bundle"):
            r.run_expert("nope", _batch(1))


@pytest.mark.parametrize("forced", [[1] * 7, [2, 0, 2, 2, 1, 0, 2]])
def test_run_equals_raw_expert_sessions(rt, monkeypatch, forced):
    # One expert for the whole batch (the batch passed as it is) and mixed groups (gathered and
    # scattered back) give each sample exactly its expert's raw-session output.
    x = _batch(7, seed=5)
    monkeypatch.setattr(rt, "route", lambda b: (np.array(forced), np.ones(len(b), np.float32)))
    res = rt.run(x)
    for k in set(forced):
        raw = _raw_expert(rt.root, rt.manifest, rt.expert_names[k])
        rows = [i for i, f in enumerate(forced) if f == k]
        want = raw.run(None, {raw.get_inputs()[0].name: x[rows]})[0]
        np.testing.assert_allclose(res.logits[rows], want, rtol=1e-5, atol=1e-6)
    assert res.experts == [rt.expert_names[k] for k in forced]


def test_run_refuses_nonfinite_samples_by_index(rt):
    x = _batch(4, seed=6)
    x[2, 0, 1, 1] = np.inf
    with pytest.raises(InputError, match="batch sample 2 hold"):
        rt.run(x)


def _manifest(bundle):
    import json

    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.update(crop=p["crop"] + 4), "preprocessing.crop disagrees"),
    (lambda p: p.update(channels=1, mean=[0.5], std=[0.5]), "preprocessing.channels disagrees"),
    (lambda p: p.update(mean=p["mean"][:2]), "one value per channel"),
])
def test_preprocessing_that_disagrees_with_the_graphs_is_the_bundles_fault(tiny_bundle, edit, match):
    """A bundle whose preprocessing makes inputs of another shape than its graphs take is
    refused at load, not blamed on the user's inputs at run time."""
    from moqe_compile.errors import BundleError

    m = _manifest(tiny_bundle)
    edit(m["preprocessing"])
    with pytest.raises(BundleError, match=match):
        Runtime(tiny_bundle, m, "onnxruntime-cpu")


def test_labels_must_name_every_class(tiny_bundle, tmp_path):
    import hashlib
    import json
    import shutil

    from moqe_compile.errors import BundleError

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    m = _manifest(root)
    if not m["task"].get("labels"):
        m["task"]["labels"] = {"path": "task/labels.json"}
    rel = m["task"]["labels"]["path"]
    data = json.dumps(["a", "b"]).encode()
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="names 2 classes; task.num_classes is"):
        Runtime.load(root)


def test_run_expert_on_a_closed_runtime_is_refused(tiny_bundle):
    from moqe_compile.errors import MoqeError

    r = Runtime.load(tiny_bundle)
    name = r.expert_names[0]
    r.close()
    with pytest.raises(MoqeError, match="closed"):
        r.run_expert(name, _batch(1))


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_topk_needs_a_positive_integer(rt, k):
    with pytest.raises(InputError, match="k must be a positive integer"):
        rt.run(_batch(1)).topk(k)


def test_a_graph_that_fails_at_run_time_is_a_backend_error_naming_it(tiny_bundle):
    from moqe_compile.backends.onnxruntime_cpu import OrtCpuSession

    m = _manifest(tiny_bundle)
    s = OrtCpuSession("minmax-expert", tiny_bundle / m["experts"][0]["variants"]["onnxruntime-cpu"]["path"])
    with pytest.raises(BackendError, match="minmax-expert: ONNX Runtime failed on a batch of shape \\(1, 3, 5, 5\\)"):
        s.run(np.zeros((1, 3, 5, 5), np.float32))
    s.close()
    with pytest.raises(BackendError, match="closed"):
        s.run(_batch(1))


@pytest.mark.parametrize("kw, match", [({"intra_op_threads": -5}, "intra_op_threads = -5"),
                                       ({"router_threads": 1.5}, "router_threads = 1.5"),
                                       ({"queue": "x"}, "queue must be a QueueConfig, not str")])
def test_bad_runtime_options_are_config_errors(tiny_bundle, kw, match):
    from moqe_compile.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        Runtime.load(tiny_bundle, **kw)


def test_load_and_load_inputs_name_wrong_argument_types(rt):
    import moqe_compile
    from moqe_compile.errors import BundleError

    with pytest.raises(BundleError, match="not NoneType"):
        moqe_compile.load(None)
    with pytest.raises(InputError, match="not int"):
        rt.load_inputs(123)
    with pytest.raises(InputError, match="limits must be an InputLimits, not dict"):
        rt.load_inputs("x.npy", limits={"max_images": 1})
