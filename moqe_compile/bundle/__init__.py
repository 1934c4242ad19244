"""The bundle: a directory of ONNX files + a versioned, hash-checked manifest (docs/bundle-format.md)."""

from .manifest import SCHEMA_VERSION
from .reader import Bundle, read_bundle
from .writer import BundleWriter

__all__ = ["SCHEMA_VERSION", "Bundle", "read_bundle", "BundleWriter"]
