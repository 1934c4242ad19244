"""Bundle reader: refuses a bundle whose manifest or files cannot be trusted, naming the file.

The manifest is read within limits (size, JSON nesting depth), then checked against the JSON
Schema shipped beside this module (``manifest.schema.json``, docs/bundle-format.md) and for what
the schema does not say (expert names that are safe as path components and unique, routing
names that exist, one graph per backend), before any other code reads a field of it. Graph
files are handed to ONNX Runtime as the bytes that were hashed (``Bundle.graph``), never
re-opened by path, so a file swapped after the check is not what runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from moqe_compile.bundle.manifest import (MANIFEST, NAME_RULE, SCHEMA_VERSION, is_safe_name, referenced_paths,
                                         safe_join, sha256_file)
from moqe_compile.errors import BundleError, BundleIntegrityError, BundlePathError, SchemaVersionError

# Limits on what a manifest may make the reader do (docs/security.md#manifest-limits): far
# above what a build writes, low enough that a hostile manifest is refused before it costs
# much time or memory.
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 64
MAX_FILES = 100_000  # also the schema's files.maxProperties
MAX_PATH = 1024  # characters per path, also in the schema


@dataclass
class Graph:
    """An ONNX graph of a bundle as verified bytes, with what ONNX Runtime needs beside them:
    ``external`` (in-memory external-data files, by the location the graph names) and the
    bundle's shared tensors (``configure`` adds both to a ``SessionOptions``)."""

    rel: str
    model: bytes
    outputs: dict[str, list] = field(default_factory=dict)  # output name -> shape (onnx_refs.output_shapes)
    external: dict[str, bytes] = field(default_factory=dict)
    shared: object = None  # SharedTensors, or None

    def output_width(self) -> int | None:
        """The last dimension of the first output, where the graph fixes it."""
        shape = next(iter(self.outputs.values()), [])
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    def configure(self, so) -> None:
        if self.shared is not None:
            self.shared.add_to(so, self.rel)
        if self.external:
            import numpy as np

            names = list(self.external)
            buffers = [np.frombuffer(self.external[n], np.uint8) for n in names]
            so.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])

    def self_contained(self) -> bytes:
        """The graph with every external tensor written into it (the bundle's shared tensors and
        the data files it lists): one ONNX model for tools that cannot be handed tensors in
        memory, e.g. OpenVINO's reader or ``onnx.checker``. Protobuf caps a model at 2 GiB."""
        import onnx
        from onnx import TensorProto

        from moqe_compile.bundle.onnx_refs import external_tensors

        m = onnx.load_from_string(self.model)
        shared = self.shared.arrays_for(self.rel) if self.shared is not None else {}
        for t in external_tensors(m):
            if t.name in shared:
                data = shared[t.name].tobytes()  # little-endian already (SharedTensors)
            else:
                info = {e.key: e.value for e in t.external_data}
                blob = self.external[info["location"]]
                start = int(info.get("offset", 0))
                data = blob[start : start + int(info["length"])] if "length" in info else blob[start:]
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = data
        if m.ByteSize() >= 2**31:
            raise BundleError(f"graph {self.rel!r} is {m.ByteSize() / 2**30:.1f} GiB with its external data: over "
                              "protobuf's 2 GiB limit for one ONNX model; hand the tensors to the runtime instead.")
        return m.SerializeToString()


@dataclass
class Bundle:
    root: Path
    manifest: dict
    verify: bool = True
    _shared: object = field(default=None, repr=False)

    def file(self, rel: str) -> Path:
        return safe_join(self.root, rel)

    def read(self, rel: str) -> bytes:
        """The bytes of listed file ``rel``, read once; size and (with ``verify``) sha256 checked
        on exactly these bytes."""
        meta = self.manifest["files"].get(rel)
        if meta is None:
            raise BundleIntegrityError(f"{rel!r} is not listed under 'files' of {str(self.root)!r}.")
        data = _read_regular(self.file(rel), rel, meta["size"])
        check_size(rel, len(data), meta["size"])
        if self.verify:
            check_digest(rel, hashlib.sha256(data).hexdigest(), meta["sha256"])
        return data

    def graph(self, rel: str) -> Graph:
        """The ONNX graph ``rel`` as verified bytes; external data it names must be a listed
        file (verified and passed in memory) or one of the bundle's shared tensors."""
        from moqe_compile.bundle.onnx_refs import external_data, output_shapes, parse
        from moqe_compile.bundle.shared_weights import SharedTensors

        model = self.read(rel)
        parsed = parse(model, rel)
        if self._shared is None:
            self._shared = SharedTensors(self)
        shared = self._shared.names_for(rel)
        external: dict[str, bytes] = {}
        for tensor, location in external_data(parsed):
            if tensor in shared:
                continue  # supplied from the shared tensor, never read from ``location``
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), location))
            if target not in self.manifest["files"]:
                raise BundleIntegrityError(
                    f"graph {rel!r}: initializer {tensor!r} has external data in {location!r}, which is not "
                    "listed (with its sha256) under 'files'; rebuild the bundle with self-contained graphs.")
            if location not in external:
                external[location] = self.read(target)
        return Graph(rel, model, output_shapes(parsed), external, self._shared if shared else None)


def _read_regular(path: Path, rel: str, limit: int) -> bytes:
    """Read a regular file, at most ``limit`` + 1 bytes (a FIFO or device is refused, not read)."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BundleIntegrityError(f"bundle file {rel!r} is not a regular file.")
            return f.read(limit + 1)
    except OSError as e:
        raise BundleIntegrityError(f"bundle file {rel!r} cannot be read: {e.strerror or e}.") from e


def check_size(rel: str, size: int, expected: int) -> None:
    if size != expected:
        raise BundleIntegrityError(f"bundle file {rel!r} has size {size}, manifest says {expected}.")


def check_digest(rel: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise BundleIntegrityError(f"bundle file {rel!r} was changed: sha256 {digest}, manifest expects {expected}.")


# ------------------------------------------------------------------ the manifest
@functools.cache
def _validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(resources.files("moqe_compile.bundle").joinpath("manifest.schema.json").read_text("utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _read_manifest_bytes(mpath: Path) -> bytes:
    try:
        with open(mpath, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{str(mpath)!r} is not a regular file.")
            if st.st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{str(mpath)!r} is {st.st_size} bytes; a manifest may have at most "
                                  f"{MAX_MANIFEST_BYTES}.")
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"{str(mpath)!r} cannot be read: {e.strerror or e}.") from e
    if len(raw) > MAX_MANIFEST_BYTES:  # it grew after the fstat
        raise BundleError(f"{str(mpath)!r} is larger than {MAX_MANIFEST_BYTES} bytes.")
    return raw


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def _check_depth(text: str, mpath: Path) -> None:
    """Refuse nesting deeper than MAX_DEPTH before ``json.loads`` recurses into it (100k nested
    lists exhaust its recursion). Strings are matched whole, so brackets inside them don't count."""
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise BundleError(f"{str(mpath)!r} nests deeper than {MAX_DEPTH} levels; not a moqe manifest.")
        elif c in "]}":
            depth -= 1


def parse_manifest(mpath: Path):
    """The JSON value in ``mpath``, read within the size and depth limits (any JSON value: the
    caller checks what it is)."""
    raw = _read_manifest_bytes(mpath)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{str(mpath)!r} is not UTF-8 ({e.reason} at byte {e.start}).") from e
    _check_depth(text, mpath)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{str(mpath)!r} is not valid JSON: {e}.") from e


def load_manifest(mpath: Path) -> dict:
    """``manifest.json`` parsed within the limits, its schema version and schema checked."""
    manifest = parse_manifest(mpath)
    if not isinstance(manifest, dict):
        raise BundleError(f"{str(mpath)!r} holds a JSON {type(manifest).__name__}; a manifest is a JSON object.")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise SchemaVersionError(
            f"{str(mpath)!r} has schema_version {version!r}; this moqe-compile reads version {SCHEMA_VERSION}. "
            "Rebuild the bundle or use a matching release."
        )
    _check_schema(manifest, mpath)
    _check_names(manifest, mpath)
    return manifest


def _check_schema(manifest: dict, mpath: Path) -> None:
    from jsonschema.exceptions import best_match

    err = best_match(_validator().iter_errors(manifest))
    if err is not None:
        what = err.message if len(err.message) <= 200 else err.message[:200] + "..."
        raise BundleError(f"{str(mpath)!r} does not match the manifest schema at {err.json_path}: {what} "
                          "(docs/bundle-format.md).")


def _check_names(m: dict, mpath: Path) -> None:
    """What the schema does not say: expert names are safe and unique, routing names one of them,
    and every listed backend has a graph in every expert."""
    names = [e["name"] for e in m["experts"]]
    bad = next((n for n in names if not is_safe_name(n)), None)
    if bad is not None:  # tools make paths and model names of them (export-triton)
        raise BundleError(f"{str(mpath)!r}: expert name {bad!r} is not allowed: a name has {NAME_RULE}. "
                          "Rebuild the bundle with a recipe that names its experts so.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BundleError(f"{str(mpath)!r}: expert names {dup} occur more than once.")
    for key in ("default_expert", "fallback_expert"):
        if key in m["routing"] and m["routing"][key] not in names:
            raise BundleError(f"{str(mpath)!r}: routing.{key} {m['routing'][key]!r} is not an expert; "
                              f"the experts are {names}.")
    for e in m["experts"]:
        missing = [b for b in m["backends"] if b not in e["variants"]]
        if missing:
            raise BundleError(f"{str(mpath)!r}: expert {e['name']!r} has no graph for backends {missing} "
                              f"that 'backends' lists.")


# ------------------------------------------------------------------ the bundle
def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is not a directory.")
    if not mpath.is_file():
        raise BundleError(f"{str(mpath)!r} is missing: {str(root)!r} is not a moqe bundle.")
    manifest = load_manifest(mpath)
    files = manifest["files"]
    _check_references(root, manifest, files)
    for rel, meta in files.items():
        full = safe_join(root, rel)
        if not full.is_file():
            raise BundleIntegrityError(f"bundle file {rel!r} is missing from {str(root)!r}.")
        check_size(rel, full.stat().st_size, meta["size"])
        if verify:
            try:
                digest = sha256_file(full)
            except OSError as e:
                raise BundleIntegrityError(f"bundle file {rel!r} cannot be read: {e.strerror or e}.") from e
            check_digest(rel, digest, meta["sha256"])
    return Bundle(root, manifest, verify)


def _check_references(root: Path, manifest: dict, files: dict) -> None:
    """Every ``path`` value is a listed file (listed files are confined when they are checked)."""
    refs = referenced_paths(manifest)
    if len(refs) > MAX_FILES:
        raise BundleError(f"the manifest references {len(refs)} paths; at most {MAX_FILES} are allowed.")
    for rel in dict.fromkeys(refs):
        if rel not in files:
            if len(rel) > MAX_PATH or "\x00" in rel:
                raise BundlePathError(f"manifest path {rel[:80]!r}... is not a valid bundle path.")
            safe_join(root, rel)  # an escaping path is named as such, not as unlisted
            raise BundleIntegrityError(f"manifest references {rel!r}, which is not listed under 'files'.")
