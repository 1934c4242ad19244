"""The one CPU session factory: sessions stay on the CPUs the process was given."""

import os
import subprocess
import sys
import textwrap

import pytest

from moqe_compile.backends import onnxruntime_cpu
from moqe_compile.backends.onnxruntime_cpu import allowed_cpus_if_restricted

LINUX_AFFINITY = hasattr(os, "sched_getaffinity")


@pytest.mark.parametrize("allowed, machine, expected", [({0}, 4, 1), ({0, 2}, 4, 2), ({0, 1, 2, 3}, 4, 0)])
def test_a_restricted_process_gets_a_thread_per_allowed_cpu(monkeypatch, allowed, machine, expected):
    monkeypatch.setattr(onnxruntime_cpu.os, "sched_getaffinity", lambda pid: allowed, raising=False)
    monkeypatch.setattr(onnxruntime_cpu.os, "cpu_count", lambda: machine)
    assert allowed_cpus_if_restricted() == expected


def test_without_an_affinity_call_the_default_is_left_to_onnx_runtime(monkeypatch):
    monkeypatch.delattr(onnxruntime_cpu.os, "sched_getaffinity", raising=False)
    assert allowed_cpus_if_restricted() == 0


@pytest.mark.skipif(not LINUX_AFFINITY or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and two CPUs")
def test_no_session_thread_leaves_the_cpu_the_process_was_pinned_to():
    """ONNX Runtime's own default pins a worker per physical core whatever the process's
    affinity; through the factory every thread stays on the one CPU (a child process started
    on that CPU, as ``taskset`` starts one, so the suite's own affinity is untouched)."""
    cpu = min(os.sched_getaffinity(0))
    code = textwrap.dedent(f"""
        import os
        import numpy as np
        from onnx import TensorProto, helper
        from moqe_compile.backends.onnxruntime_cpu import session

        w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32))
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])], [w])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        s = session(m.SerializeToString())
        s.run(None, {{"x": np.ones((64, 64), np.float32)}})
        tasks = os.listdir(f"/proc/{{os.getpid()}}/task")
        print(len(tasks), sorted({{c for t in tasks for c in os.sched_getaffinity(int(t))}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert res.returncode == 0, res.stderr[-2000:]
    threads, cpus = res.stdout.split(" ", 1)
    assert cpus.strip() == f"[{cpu}]", res.stdout


def _relu_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
                             ).SerializeToString()


def _spin_entries(sess) -> tuple[str, str | None]:
    o = sess.get_session_options()
    try:
        stop = o.get_session_config_entry("session.force_spinning_stop")
    except Exception:  # noqa: BLE001 - ORT raises when the entry was never set
        stop = None
    return o.get_session_config_entry("session.intra_op.allow_spinning"), stop


@pytest.mark.parametrize("env, expected", [(None, ("1", "1")), ("in-run", ("1", "1")), ("never", ("0", None)),
                                           ("always", ("1", None))])
def test_threads_spin_only_during_a_run_unless_the_environment_says_otherwise(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv(onnxruntime_cpu.SPINNING_ENV, raising=False)
    else:
        monkeypatch.setenv(onnxruntime_cpu.SPINNING_ENV, env)
    assert _spin_entries(onnxruntime_cpu.session(_relu_model())) == expected


def test_an_explicit_spinning_policy_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(onnxruntime_cpu.SPINNING_ENV, "in-run")
    assert _spin_entries(onnxruntime_cpu.session(_relu_model(), spinning="never")) == ("0", None)


def test_an_unknown_spinning_policy_is_named(monkeypatch):
    from moqe_compile.errors import ConfigError

    monkeypatch.setenv(onnxruntime_cpu.SPINNING_ENV, "sometimes")
    with pytest.raises(ConfigError, match="MOQE_ORT_SPINNING='sometimes'"):
        onnxruntime_cpu.session(_relu_model())
    with pytest.raises(ConfigError, match="spinning='fast'"):
        onnxruntime_cpu.session(_relu_model(), spinning="fast")
