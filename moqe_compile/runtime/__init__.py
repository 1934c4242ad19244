"""Serve a bundle: route each sample, run each expert once on its group, scatter back."""

from .runtime import RunResult, Runtime

__all__ = ["Runtime", "RunResult"]
