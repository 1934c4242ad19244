"""Serve a bundle: route each sample, run each expert once on its group, scatter back."""

from .batcher import DynamicBatcher
from .runtime import QueueConfig, RunResult, Runtime

__all__ = ["Runtime", "RunResult", "QueueConfig", "DynamicBatcher"]
