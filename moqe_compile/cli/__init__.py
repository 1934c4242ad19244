"""Command-line entry points: ``moqe-compile`` and ``moqe-run``."""
