"""Serve a bundle: route each sample, run each expert once on its group, scatter back."""

from moqe_compile.runtime.batcher import DynamicBatcher
from moqe_compile.runtime.base import QueueConfig, RunResult, Runtime

__all__ = ["Runtime", "RunResult", "QueueConfig", "DynamicBatcher"]
