"""Ray Serve on a local Ray instance: router ingress + expert deployments, 2 replicas of one."""

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve")
from moqe_compile.errors import ConfigError  # noqa: E402
from moqe_compile.serving.ray_serve import parse_replicas  # noqa: E402

from ..models import ROUTED_EXPERTS, routed_reference  # noqa: E402
from ..runtime.test_routed import ATOL, CONF_ATOL, RTOL, mixed_batch  # noqa: E402


@pytest.fixture(scope="module")
def deployed(ray_deployment):
    return ray_deployment


def test_ray_answers_each_sample_with_its_constructed_expert(deployed, routed_bundle):
    handle, _, names = deployed
    mixed = mixed_batch(40, seed=300)  # every expert and the fallback
    xs = [mixed[i:i + 1 + i % 4] for i in range(16)]
    pending = [handle.infer.remote(x) for x in xs]  # concurrent: the ingress merges some of them
    for x, p in zip(xs, pending):
        got = p.result(timeout_s=60)
        idx, conf, logits = routed_reference(routed_bundle, x)
        np.testing.assert_allclose(got.logits, logits, rtol=RTOL, atol=ATOL)
        assert got.experts == [ROUTED_EXPERTS[k] for k in idx]
        np.testing.assert_allclose(got.confidence, conf, atol=CONF_ATOL)


def test_expert_replicas_as_configured(deployed):
    _, _, names = deployed
    app = serve.status().applications["tiny"]
    running = {d: sum(st.replica_states.values()) if hasattr(st, "replica_states") else None
               for d, st in app.deployments.items()}
    assert running[f"expert_{names[0]}"] == 2
    assert all(running[f"expert_{n}"] == 1 for n in names[1:]) and running["router"] == 1


def test_ray_http_speaks_v2(deployed, routed_bundle):
    tc = pytest.importorskip("tritonclient.http")
    _, url, _ = deployed
    x = mixed_batch(12, seed=9)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = tc.InferenceServerClient(url).infer("tiny", [inp])
    idx, _, logits = routed_reference(routed_bundle, x)
    np.testing.assert_allclose(res.as_numpy("logits"), logits, rtol=RTOL, atol=ATOL)
    assert np.ravel(res.as_numpy("expert")).tolist() == idx.tolist()


def test_replica_flags_are_checked():
    assert parse_replicas(["a=2", "b=1"]) == {"a": 2, "b": 1}
    for bad in ("a", "a=0", "a=x"):
        with pytest.raises(ConfigError, match="EXPERT=N"):
            parse_replicas([bad])
