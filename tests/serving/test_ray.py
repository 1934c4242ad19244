"""Ray Serve on a local Ray instance: router ingress + expert deployments, 2 replicas of one."""

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve")
from moqe_compile import Runtime  # noqa: E402
from moqe_compile.errors import ConfigError  # noqa: E402
from moqe_compile.serving.ray_serve import parse_replicas  # noqa: E402

from ..models import CROP  # noqa: E402


@pytest.fixture(scope="module")
def deployed(ray_deployment):
    return ray_deployment


def _batch(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, CROP, CROP)).astype(np.float32)


def test_ray_results_equal_in_process_runtime(deployed, routed_bundle):
    handle, _, names = deployed
    xs = [_batch(1 + i % 4, seed=300 + i) for i in range(12)]
    pending = [handle.infer.remote(x) for x in xs]  # concurrent: the ingress merges some of them
    with Runtime.load(routed_bundle) as rt:
        for x, p in zip(xs, pending):
            got, want = p.result(timeout_s=60), rt.run(x)
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert got.experts == want.experts
            np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-5)


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
    x = _batch(3, seed=9)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = tc.InferenceServerClient(url).infer("tiny", [inp])
    with Runtime.load(routed_bundle) as rt:
        want = rt.run(x)
    np.testing.assert_allclose(res.as_numpy("logits"), want.logits, rtol=1e-5, atol=1e-5)
    assert res.as_numpy("expert").tolist() == want.expert_index.tolist()


def test_replica_flags_are_checked():
    assert parse_replicas(["a=2", "b=1"]) == {"a": 2, "b": 1}
    for bad in ("a", "a=0", "a=x"):
        with pytest.raises(ConfigError, match="EXPERT=N"):
            parse_replicas([bad])
