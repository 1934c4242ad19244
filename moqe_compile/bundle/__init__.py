"""The bundle: a directory of ONNX files + a versioned, hash-checked manifest (docs/bundle-format.md)."""

from moqe_compile.bundle.manifest import SCHEMA_VERSION
from moqe_compile.bundle.reader import Bundle, read_bundle
from moqe_compile.bundle.writer import BundleWriter

__all__ = ["SCHEMA_VERSION", "Bundle", "read_bundle", "BundleWriter"]
