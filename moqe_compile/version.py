"""The package version (one place; the manifest records it as ``created_with.moqe_compile``)."""

__version__ = "0.1.0"
