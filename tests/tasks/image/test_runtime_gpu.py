"""``GpuRuntime``'s logic on the CPU: a hand-made bundle (router = softmax of channel means,
so the input decides the routing; expert k = channel means times k + 1, so outputs show
which expert ran) served through the IOBinding sessions under the CPU provider with a
host-memory device. Checked against the CPU ``Runtime`` on the same bundle, plus the
stream/sync bookkeeping. The real GPU path runs in tests/gpu and bench/gpu/check.sh."""

from __future__ import annotations

import numpy as np
import pytest

from moqe_compile.errors import BackendError, InputError
from moqe_compile import Runtime
from moqe_compile.tasks.image.runtime_gpu import GpuRuntime, _runs

from ...models import HANDMADE_C as C
from ...models import HANDMADE_K as K
from ...models import HANDMADE_S as S
from ...backends.fakes import HostDevice, host_factory
from ...models import make_handmade_bundle


@pytest.fixture
def bundle(tmp_path):
    return make_handmade_bundle(tmp_path / "bundle")


def batch_routed_to(experts: list[int]) -> np.ndarray:
    """One sample per entry whose largest channel mean (so its routing) is that expert."""
    x = np.random.default_rng(len(experts)).uniform(0, 0.1, (len(experts), C, S, S)).astype(np.float32)
    for i, k in enumerate(experts):
        x[i, k] += 5.0
    return x


def test_matches_the_cpu_runtime_with_mixed_routing(bundle):
    dev = HostDevice()
    route = [2, 0, 0, 1, 2, 2, 0, 1]
    x = batch_routed_to(route)
    with GpuRuntime.load(bundle, device=dev, session_factory=host_factory) as g, Runtime.load(bundle) as cpu:
        assert g.variant == "tensorrt" and g.routed
        got, want = g.run(x), cpu.run(x)
        assert list(got.expert_index) == route == list(want.expert_index)
        assert got.experts == want.experts
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6)
        np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-6)
        # expert k's output is (k + 1) x channel means: each sample was served by its expert
        np.testing.assert_allclose(got.logits, x.mean((2, 3)) * (np.array(route)[:, None] + 1), rtol=1e-5)
        assert set(got.timing_ms) == {"router", "experts", "total"}


def test_streams_syncs_and_gathers_per_batch(bundle):
    dev = HostDevice()
    g = GpuRuntime.load(bundle, device=dev, session_factory=host_factory)
    # one stream per expert, one for the router, one join stream
    assert dev.count("stream") == K + 2
    streams = {s.name: s.stream for s in g._experts + [g._router]}
    dev.log.clear()
    g.run(batch_routed_to([0, 0, 1, 0, 0]))
    # two host syncs per routed batch: router probabilities, then all experts at once
    assert [e for e in dev.log if e[0] == "sync"] == [("sync", streams["router"]), ("sync", g._join)]
    d2d = [e for e in dev.log if e[:2] == ("copy", "d2d")]
    # expert 0 gathers rows 0-1 and 3-4 (two runs), expert 1 row 2 (one run)
    assert [e[3] for e in d2d] == [streams["e0"]] * 2 + [streams["e1"]]
    row = C * S * S * 4
    assert [e[2] for e in d2d] == [2 * row, 2 * row, row]
    # each expert's stream waits for the input, then signals the join stream
    assert sum(1 for e in dev.log if e[0] == "wait" and e[1] == g._join) == 2
    g.run(batch_routed_to([2, 2, 2]))  # expert 2's first batch allocates its output buffers
    dev.log.clear()
    g.run(batch_routed_to([2, 2, 2]))  # one expert takes the batch: no gather, nothing allocated
    assert not [e for e in dev.log if e[:2] == ("copy", "d2d")]
    assert dev.count("malloc") == 0 and dev.count("malloc_host") == 0
    g.close()
    assert dev.live() == 0


def test_single_expert_and_unrouted_paths(bundle):
    dev = HostDevice()
    x = batch_routed_to([0, 2, 1])
    with GpuRuntime.load(bundle, device=dev, session_factory=host_factory, only_expert="e2") as g:
        assert not g.routed and g._experts[0] is None
        res = g.run(x)
        assert res.experts == ["e2"] * 3 and dev.count("sync") == 1  # no router: one sync
        np.testing.assert_allclose(res.logits, g.run_expert("e2", x), rtol=1e-6)
        with pytest.raises(InputError, match="'e0' was not loaded"):
            g.run_expert("e0", x)


def test_errors_name_the_problem(bundle):
    dev = HostDevice()
    with pytest.raises(BackendError, match="unknown GPU backend 'cuda'"):
        GpuRuntime.load(bundle, backend="cuda", device=dev, session_factory=host_factory)
    with pytest.raises(BackendError, match="no 'int4' graph"):
        GpuRuntime.load(bundle, device=dev, session_factory=host_factory, variant="int4")
    with GpuRuntime.load(bundle, device=dev, session_factory=host_factory, variant="onnxruntime-cpu") as g:
        with pytest.raises(InputError, match=r"expected \(N, 3, 8, 8\)"):
            g.run(np.zeros((1, 3, 4, 4), np.float32))
        with pytest.raises(InputError, match="dtype float64"):
            g.run(np.zeros((1, 3, 8, 8)))
    from moqe_compile.backends.onnxruntime_cpu import OrtCpuSession

    with pytest.raises(BackendError, match="OrtCpuSession.*cannot run on the GPU"):
        GpuRuntime.load(bundle, device=dev, session_factory=lambda n, p, d: OrtCpuSession(n, p))


def test_runs_of_consecutive_indices():
    assert _runs(np.array([0, 1, 3, 4, 5, 9])) == [(0, 0, 2), (3, 2, 3), (9, 5, 1)]
    assert _runs(np.array([7])) == [(7, 0, 1)]
    assert _runs(np.array([], int)) == []


def test_tensorrt_backend_without_engines_runs_the_onnx_graphs_on_the_gpu_sessions(bundle, monkeypatch):
    import types

    from moqe_compile.backends import tensorrt as trtb

    monkeypatch.setattr(trtb, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.14.1"))
    dev = HostDevice()

    def factory(name, path, device):
        return trtb.TensorRTSession(name, path, device=device, fallback=lambda n, p, t, d: host_factory(n, p, d))

    x = batch_routed_to([1, 2, 0])
    with GpuRuntime.load(bundle, backend="tensorrt", device=dev, session_factory=factory) as g:
        assert all("records no TensorRT engine" in s.fallback_reason for s in g._sessions)
        assert list(g.run(x).expert_index) == [1, 2, 0]


def test_cpu_runtime_with_the_tensorrt_backend_falls_back_to_the_onnx_graphs(bundle):
    # no engines in the bundle: every session runs its S8S8 graph on ONNX Runtime (CPU here)
    x = batch_routed_to([0, 1, 2, 2])
    with Runtime.load(bundle, backend="tensorrt") as rt, Runtime.load(bundle) as cpu:
        assert rt.backend == "tensorrt"
        got, want = rt.run(x), cpu.run(x)
        assert list(got.expert_index) == [0, 1, 2, 2]
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5)


def test_a_failed_load_releases_the_sessions_already_made(bundle):
    dev = HostDevice()

    def factory(name, path, device):
        if name == "e1":
            raise BackendError("e1 does not load")
        return host_factory(name, path, device)

    with pytest.raises(BackendError, match="e1 does not load"):
        GpuRuntime.load(bundle, device=dev, session_factory=factory)
    assert dev.count("stream") == dev.count("destroy_stream") == 1


def graph_factory(name, path, device):
    from moqe_compile.backends.onnxruntime_cuda import OrtCudaSession

    return OrtCudaSession(name, path, device=device, providers=["CPUExecutionProvider"], device_type="cpu",
                          cuda_graph=True, max_graphs=3)


def test_cuda_graph_mode_binds_fixed_buffers_per_batch_size(bundle):
    # Batch sizes that grow and shrink: with shared buffers, which grow and move, every
    # return to a size would bind new addresses and use up the graph slots.
    dev = HostDevice()
    batches = [[0, 0, 1, 0, 0], [2] * 8, [0, 0, 1, 0, 0], [1], [2] * 8, [1], [0, 2, 1, 0, 1, 2, 0, 0], [1]]
    with GpuRuntime.load(bundle, device=dev, session_factory=graph_factory) as g, Runtime.load(bundle) as cpu:
        for route in batches:
            x = batch_routed_to(route)
            got, want = g.run(x), cpu.run(x)
            assert list(got.expert_index) == route
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6)
        assert g._router.graph_sizes == [1, 5, 8] and g._router.graph_count == 3
        # e1 saw size 1 as a subset (own buffer) and as a whole batch (the input buffer)
        assert g._experts[1].graph_sizes == [1, 2] and g._experts[1].graph_count == 3
        assert "cuda_graphs" in g.describe()
        dev.log.clear()
        g.run(batch_routed_to([2] * 8))  # a size seen before: nothing allocated, no gather
        assert dev.count("malloc") == 0 and not [e for e in dev.log if e[:2] == ("copy", "d2d")]


def test_cuda_graph_needs_onnxruntime_cuda(bundle):
    with pytest.raises(BackendError, match="cuda_graph needs the 'onnxruntime-cuda' backend"):
        GpuRuntime.load(bundle, backend="tensorrt", device=HostDevice(), cuda_graph=True)


def test_speculative_small_batches_run_every_expert_and_keep_the_routed_rows(bundle):
    dev = HostDevice()
    with GpuRuntime.load(bundle, device=dev, session_factory=graph_factory, speculate_below=2) as g, \
            Runtime.load(bundle) as cpu:
        for route in ([1], [2, 0], [0], [0, 1, 2, 2]):  # the last is above the threshold: routed path
            x = batch_routed_to(route)
            dev.log.clear()
            got, want = g.run(x), cpu.run(x)
            assert list(got.expert_index) == route and got.experts == want.experts
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6)
            np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-6)
            ran = {e[1] for e in dev.log if e[0] == "wait" and e[1] != g._join}  # streams that took input
            experts_ran = {s.stream for s in g._experts} & ran
            if len(route) <= 2:  # every expert ran, on the whole batch: no gathers
                assert experts_ran == {s.stream for s in g._experts}
                assert not [e for e in dev.log if e[:2] == ("copy", "d2d")]
            else:
                assert experts_ran == {g._experts[k].stream for k in set(route)}
            assert dev.count("sync") == 2
    with pytest.raises(InputError, match="speculate_below = -1"):
        GpuRuntime.load(bundle, device=HostDevice(), session_factory=graph_factory, speculate_below=-1)
