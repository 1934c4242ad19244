"""moqe-compile: a deployment compiler for Mixture of Quantization Experts (MoQE).

``from moqe_compile import Runtime`` is all a service needs; the build stages import
torch lazily, so the runtime stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Runtime", "RunResult"):
        from moqe_compile import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'moqe_compile' has no attribute {name!r}")


__all__ = ["Runtime", "RunResult", "__version__"]
