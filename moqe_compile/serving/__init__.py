"""Serving a bundle: the Open Inference Protocol (KServe v2) server, Ray Serve and Triton.

Imported only by ``moqe-serve`` and services that want it: FastAPI/uvicorn/prometheus are
the ``serve`` extra, not runtime dependencies.
"""
