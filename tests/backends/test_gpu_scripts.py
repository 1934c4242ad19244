"""The GPU scripts stay runnable: bench/gpu/latency.py's whole flow on the hand-made bundle
with the host-memory device and the CPU provider standing in for the GPU (its timings are
CPU timings and are not looked at), the kernel bench's no-GPU exit, gpu/check.sh's syntax."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moqe_compile.backends import onnxruntime_cuda as oc
from moqe_compile.backends import cuda_device

from .fakes import HostDevice

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_latency_flow_with_stand_ins(bundle, tmp_path, monkeypatch):
    init = oc.OrtCudaSession.__init__

    def host_init(self, name, path, intra_op_threads=0, *, device=None, provider_options=None, cuda_graph=False,
                  max_graphs=8, **kw):
        init(self, name, path, intra_op_threads, device=device, providers=["CPUExecutionProvider"], device_type="cpu",
             cuda_graph=cuda_graph, max_graphs=max_graphs)

    monkeypatch.setattr(cuda_device, "CudaDevice", HostDevice)
    monkeypatch.setattr(oc, "require_cuda_provider", lambda: None)
    monkeypatch.setattr(oc.OrtCudaSession, "__init__", host_init)
    out = tmp_path / "lat.json"
    assert _load("latency").main([str(bundle), "--batches", "1,5", "--repeats", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["default_expert"] == "e1" and set(res["batches"]) == {"1", "5"}
    row = res["batches"]["5"]
    assert set(row["timing"]) == {"moqe", "expert:e1", "fp32", "fp16", "fp16_nhwc", "router", "moqe_graph",
                                  "expert_graph:e1", "fp16_nhwc_graph", "router_graph",
                                  "copy_in"}
    assert sum(row["usage"].values()) == 5
    assert "moqe_speculative" in res["batches"]["1"]["timing"] and "moqe_speculative" not in row["timing"]
    assert res["batches"]["1"]["speculative_vs_plain"]["max_abs_logit_diff"] < 1e-5
    assert row["graph_vs_plain"]["routing_agreement"] == 1.0 and row["graph_vs_plain"]["max_abs_logit_diff"] < 1e-5
    assert set(row["moqe_split_ms"]) == {"router", "experts", "total"}
    assert row["vs_cpu_runtime"]["routing_agreement"] == 1.0 and row["vs_cpu_runtime"]["top1_agreement"] == 1.0


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="checks the no-GPU exit")
def test_kernel_bench_says_it_needs_a_gpu(capsys):
    assert _load("router_attention").main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "check.sh")], check=True)
