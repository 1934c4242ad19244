"""Honest statistics for MoQE: bootstrap intervals, paired tests, reports, latency, ``eval``.

- :mod:`.stats`: bootstrap CI of a mean, paired bootstrap of a difference, exact McNemar.
- :mod:`.report`: the per-split report dict (used by ``build`` and ``eval``), Markdown, PNGs.
- :mod:`.latency`: interleaved latency of router, experts, FP32 and the MoQE path.
- :mod:`.data`: the bundle's stored eval splits and user data for ``eval``.
- :mod:`.evaluate`: ``moqe-compile eval``.

Submodules import their heavy dependencies (scipy, matplotlib) lazily.
"""
