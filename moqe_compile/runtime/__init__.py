"""The task-free runtime: route each sample, run each expert once on its group, scatter back.

``moqe_compile.load(path)`` returns a bundle's runtime (built on ``BundleRuntime``);
``moqe_compile.Runtime`` is the image-classification runtime.
"""

from moqe_compile.runtime.base import BundleRuntime, QueueConfig, RouterSessions, RunResult
from moqe_compile.runtime.batcher import DynamicBatcher

__all__ = ["BundleRuntime", "RunResult", "QueueConfig", "RouterSessions", "DynamicBatcher"]
