"""The v2 app against Triton's own HTTP client, on loopback: every test runs against
moqe-serve and against the Ray Serve ingress (the ``served`` fixture), which serve the same app."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")

from moqe_compile import Runtime  # noqa: E402
from moqe_compile.serving.server import ServeConfig, ServerThread  # noqa: E402

from ..models import CROP, ROUTED_EXPERTS, routed_reference  # noqa: E402
from ..runtime.test_routed import ATOL, CONF_ATOL, RTOL, mixed_batch  # noqa: E402

from .conftest import NAME  # noqa: E402


def _batch(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)


def _client(url):
    return tritonclient_http.InferenceServerClient(url, concurrency=4)


def _infer(client, x, outputs=None, binary=True):
    inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = None if outputs is None else [tritonclient_http.InferRequestedOutput(o, binary_data=binary)
                                         for o in outputs]
    return client.infer(NAME, [inp], outputs=outs)


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_in_process_runtime(served, binary):
    url, ref = served
    c = _client(url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(NAME)
    x = mixed_batch(8, seed=2)  # every expert and the fallback, small enough for JSON under 1 MB
    res = _infer(c, x, outputs=None if binary else ["logits", "expert", "expert_name", "router_confidence"],
                 binary=binary)
    idx, conf, logits = routed_reference(ref.root, x)
    np.testing.assert_allclose(res.as_numpy("logits"), logits, rtol=RTOL, atol=ATOL)
    assert np.ravel(res.as_numpy("expert")).tolist() == idx.tolist()
    assert [e.decode() if isinstance(e, bytes) else e for e in np.ravel(res.as_numpy("expert_name"))] == \
        [ROUTED_EXPERTS[k] for k in idx]
    np.testing.assert_allclose(np.ravel(res.as_numpy("router_confidence")), conf, atol=CONF_ATOL)


def test_metadata_lists_io_and_experts(served, routed_bundle):
    url, ref = served
    meta = _client(url).get_model_metadata(NAME)
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, CROP, CROP]}
    assert [o["name"] for o in meta["outputs"]] == ["logits", "expert", "expert_name", "router_confidence"]
    assert [e["name"] for e in meta["experts"]] == ref.expert_names
    assert meta["routing"]["routed"] is True


def test_concurrent_clients_each_get_their_own_answer(served):
    url, ref = served
    c = _client(url)
    mixed = mixed_batch(40, seed=50)
    xs = [mixed[i:i + 1 + i % 3] for i in range(16)]
    pending = []
    for x in xs:
        inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        pending.append(c.async_infer(NAME, [inp]))
    for x, p in zip(xs, pending):
        got = p.get_result()
        idx, _, logits = routed_reference(ref.root, x)
        np.testing.assert_allclose(got.as_numpy("logits"), logits, rtol=RTOL, atol=ATOL)
        assert np.ravel(got.as_numpy("expert")).tolist() == idx.tolist()


def test_encoded_images_as_bytes_input(served, tiny_images):
    url, ref = served
    files = [sorted((tiny_images / str(c)).iterdir())[0] for c in range(4)]  # one image per class
    blobs = np.array([f.read_bytes() for f in files], dtype=object)
    inp = tritonclient_http.InferInput("image", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(blobs)
    res = _client(url).infer(NAME, [inp])
    # class c lights channel c % 3: the image of class c goes to expert c % 3
    assert np.ravel(res.as_numpy("expert")).tolist() == [int(f.parent.name) % 3 for f in files]
    for f, got in zip(files, res.as_numpy("logits")):
        np.testing.assert_allclose(got, routed_reference(ref.root, ref.load_inputs(f)[1])[2][0], rtol=RTOL, atol=ATOL)


def _post(url, path, body: bytes, headers=None):
    req = urllib.request.Request(f"http://{url}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _json_req(x, name="input", datatype="FP32"):
    return json.dumps({"inputs": [{"name": name, "shape": list(np.shape(x)), "datatype": datatype,
                                   "data": np.asarray(x).ravel().tolist()}]}).encode()


@pytest.mark.parametrize("path,body,status,needle", [
    (f"/v2/models/{NAME}/infer", b"{not json", 400, "not valid JSON"),
    (f"/v2/models/{NAME}/infer", b"[1, 2]", 400, "must be a JSON object"),
    (f"/v2/models/{NAME}/infer", b"{}", 400, "request.inputs is missing"),
    (f"/v2/models/{NAME}/infer", _json_req(np.zeros((1, 3, 8, 8))), 400, "inputs[0] (input).shape [1, 3, 8, 8]"),
    (f"/v2/models/{NAME}/infer", _json_req(np.zeros((1, 3, CROP, CROP)), datatype="FP64"), 400,
     "inputs[0] (input).datatype FP64"),
    (f"/v2/models/{NAME}/infer", json.dumps({"inputs": [{"name": "input", "shape": [2, 3, CROP, CROP],
                                                       "datatype": "FP32", "data": [0.0] * 10}]}).encode(), 400,
     "inputs[0] (input).data has 10 elements but shape [2, 3, 32, 32] needs 6144"),
    (f"/v2/models/{NAME}/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 3],
                                                       "datatype": "FP32", "data": ["a", "b", "c"]}]}).encode(), 400,
     "inputs[0] (input).data cannot be read as FP32"),
    (f"/v2/models/{NAME}/infer", _json_req(np.zeros(3), name="pixels"), 400, "'pixels' is not an input"),
    (f"/v2/models/{NAME}/infer", _json_req(np.zeros(3), datatype="FP8"), 400, "'FP8' is not a v2 datatype"),
    (f"/v2/models/{NAME}/infer", json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                       "data": ["aGVsbG8="]}]}).encode(), 400,
     "element 0 is not a readable image"),
    ("/v2/models/other/infer", _json_req(np.zeros(3)), 404, "'other' is not served here"),
    (f"/v2/models/{NAME}/versions/7/infer", _json_req(np.zeros(3)), 404, "no version '7'"),
    (f"/v2/models/{NAME}/infer", b"x" * (2 << 20), 413, "at most 1048576"),
])
def test_bad_requests_are_4xx_naming_the_field(served, path, body, status, needle):
    url, _ = served
    code, out, _ = _post(url, path, body)
    assert code == status, out
    assert needle in json.loads(out)["error"]


def test_binary_header_length_checked(served):
    url, _ = served
    code, out, _ = _post(url, f"/v2/models/{NAME}/infer", b"{}", {"Inference-Header-Content-Length": "99"})
    assert code == 400 and "outside the body" in json.loads(out)["error"]


def test_metrics_count_requests_errors_and_experts(served):
    url, _ = served
    _infer(_client(url), _batch(3, seed=9))
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for needle in ('moqe_requests_total{code="200",model="tiny",version="1"}', 'moqe_request_errors_total{'
                   'model="tiny",reason="bad_request",version="1"}', "moqe_expert_samples_total",
                   "moqe_request_latency_seconds_bucket", 'moqe_queue_wait_seconds_bucket{le="0.001",model="tiny",'
                   'version="1"}', "moqe_router_confidence_bucket", 'moqe_requests_in_flight{model="tiny",version="1"}',
                   "moqe_batch_size_bucket", "moqe_router_seconds_total"):
        assert needle in text, needle
    served_samples = sum(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("moqe_expert_samples_total{"))
    assert served_samples >= 3


def test_unrouted_bundle_reports_one_expert_and_full_confidence(single_bundle):
    with Runtime.load(single_bundle) as rt, ServerThread(rt, "s", ServeConfig(port=0)) as url:
        c = tritonclient_http.InferenceServerClient(url)
        assert c.get_model_metadata("s")["routing"]["gate"]["decision"] == "single"
        x = _batch(4, seed=2)
        inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer("s", [inp])
        assert set(res.as_numpy("expert").tolist()) == {rt.default_expert}
        assert res.as_numpy("router_confidence").tolist() == [1.0] * 4


def test_fuzzed_requests_never_get_a_5xx(served):
    """Random corruptions of a valid request (bytes, JSON values, shapes) -> 2xx or 4xx only."""
    url, _ = served
    rng = np.random.default_rng(0)
    good = {"id": "a", "inputs": [{"name": "input", "shape": [1, 3, CROP, CROP], "datatype": "FP32",
                                   "data": [0.5] * (3 * CROP * CROP)}], "outputs": [{"name": "expert"}]}
    junk = [None, -1, 0, 1.5, "x", [], {}, [None], {"a": 1}, True, 2**70, [-3], "FP32", [[1]]]
    bodies = []
    for _ in range(40):
        req = json.loads(json.dumps(good))
        node = req
        paths = [("id",), ("inputs",), ("outputs",), ("parameters",), ("inputs", 0), ("inputs", 0, "name"),
                 ("inputs", 0, "shape"), ("inputs", 0, "datatype"), ("inputs", 0, "data"),
                 ("inputs", 0, "parameters"), ("outputs", 0), ("outputs", 0, "parameters")]
        path = paths[rng.integers(len(paths))]
        for k in path[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = path[-1]
        value = junk[rng.integers(len(junk))]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        bodies.append(json.dumps(req).encode())
    raw = json.dumps(good).encode()
    for _ in range(10):
        b = bytearray(raw)
        for j in rng.integers(0, len(b), 5):
            b[j] = int(rng.integers(0, 256))
        bodies.append(bytes(b))
    for body in bodies:
        code, out, _ = _post(url, f"/v2/models/{NAME}/infer", body)
        assert code < 500, (body[:200], out)


def _metrics(url) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}


def _bomb_png() -> bytes:
    """A tiny PNG that decodes to more pixels than Pillow's decompression-bomb limit."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def _image_req(blob: bytes) -> bytes:
    import base64

    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(blob).decode()]}]}).encode()


@pytest.mark.parametrize("body,status,reason,needle", [
    (b"[" * 100_000 + b"]" * 100_000, 400, "bad_request", "nests 100000 levels deep"),
    (json.dumps({"id": "x" * 5000, "inputs": []}).encode(), 400, "bad_request", "id is 5000 characters"),
    (_json_req(np.zeros((1, 3, CROP, CROP)), datatype="UINT16"), 400, "bad_request",
     "datatype UINT16: this model takes FP32"),
    (_json_req(np.zeros((1, 3, CROP, CROP)), datatype="UINT64"), 400, "bad_request",
     "datatype UINT64: this model takes FP32"),
    (_json_req(np.zeros((1, 3, CROP, CROP)), datatype="BF16"), 400, "bad_request", "send input as FP32"),
    (_json_req(np.zeros(1), name="image", datatype="UINT32"), 400, "bad_request", "must be BYTES"),
    (_image_req(_bomb_png()), 413, "too_large", "decompression bomb"),
])
def test_hostile_bodies_get_a_v2_error_and_a_metric(served, body, status, reason, needle):
    url, _ = served
    before = _metrics(url)
    code, out, headers = _post(url, f"/v2/models/{NAME}/infer", body)
    assert code == status, out[:300]
    assert headers.get("content-type", headers.get("Content-Type")) == "application/json"
    assert needle in json.loads(out)["error"]
    after = _metrics(url)
    key = f'moqe_requests_total{{code="{status}",model="{NAME}",version="1"}}'
    assert after[key] == before.get(key, 0) + 1
    err = f'moqe_request_errors_total{{model="{NAME}",reason="{reason}",version="1"}}'
    assert after[err] == before[err] + 1


def test_unknown_routes_and_methods_answer_a_v2_error(served):
    url, _ = served
    code, out, _ = _post(url, "/v2/nothing/here", b"{}")
    assert code == 404 and "error" in json.loads(out)
    with urllib.request.urlopen(urllib.request.Request(f"http://{url}/v2/health/ready"), timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"ready": True}


def test_metadata_platform_names_the_format(served):
    url, _ = served
    meta = _client(url).get_model_metadata(NAME)
    assert meta["platform"] == "moqe_onnxruntime_onnx" and meta["versions"] == ["1"]
