"""The backend contract: a session is created once from a model file and runs one array."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Session(Protocol):
    name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """One float32 batch in, the model's single output out. Must be safe to call concurrently."""
        ...

    def close(self) -> None: ...
