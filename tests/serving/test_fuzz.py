"""Request-body fuzzing of the v2 app: whatever the body, the answer is a 2xx, or a 4xx
with the v2 ``{"error": ...}`` body; never a 5xx, never an exception out of the app."""

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moqe_compile import Runtime  # noqa: E402
from moqe_compile.serving.app import create_app  # noqa: E402
from moqe_compile.serving.protocol import DTYPES  # noqa: E402

from ..models import CROP  # noqa: E402

PATH = "/v2/models/m/infer"
# Bounded so CI spends a few seconds here; bench-length runs raise max_examples.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                     max_size=4),
                           max_leaves=20)
datatypes = st.sampled_from([*DTYPES, "BYTES", "BF16", "FP8", ""])
shapes = st.lists(st.integers(-2, 4), max_size=5) | st.just([1, 3, CROP, CROP])
tensors = st.fixed_dictionaries({"name": st.sampled_from(["input", "image", "x"]) | json_values,
                                 "shape": shapes | json_values, "datatype": datatypes | json_values},
                                optional={"data": st.lists(st.floats() | st.integers() | st.text(max_size=6),
                                                           max_size=8) | json_values,
                                          "parameters": st.fixed_dictionaries(
                                              {"binary_data_size": st.integers(-1, 64) | json_values})})
requests = st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=2) | json_values},
                                 optional={"id": st.text(max_size=300) | json_values,
                                           "outputs": st.lists(st.fixed_dictionaries(
                                               {"name": st.sampled_from(["logits", "expert", "nope"]) | json_values}),
                                               max_size=3) | json_values,
                                           "parameters": json_values})


@pytest.fixture(scope="module")
def client(routed_bundle):
    with Runtime.load(routed_bundle) as rt, TestClient(create_app(rt, "m", close_on_shutdown=False),
                                                       raise_server_exceptions=True) as c:
        yield c


def _check(r):
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str)


@FUZZ
@given(body=requests, binary_tail=st.none() | st.binary(max_size=64))
def test_fuzzed_json_requests(client, body, binary_tail):
    raw = json.dumps(body).encode()
    headers = {}
    if binary_tail is not None:
        headers["Inference-Header-Content-Length"] = str(len(raw))
        raw += binary_tail
    _check(client.post(PATH, content=raw, headers=headers))


@FUZZ
@given(data=st.data())
def test_fuzzed_bytes_of_a_valid_request(client, data):
    good = bytearray(json.dumps({"id": "a", "inputs": [{"name": "input", "shape": [1, 3, CROP, CROP],
                                                        "datatype": "FP32",
                                                        "data": np.zeros(3 * CROP * CROP).tolist()}]}).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    header = data.draw(st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=6))
    _check(client.post(PATH, content=bytes(good),
                       headers={} if header is None else {"Inference-Header-Content-Length": header}))
