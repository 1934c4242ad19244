"""Manifest constants and helpers shared by the writer and the reader."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from moqe_compile.errors import BundlePathError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_join(root: Path, rel: str) -> Path:
    """Resolve a manifest path inside ``root``; refuse absolute paths, escapes, NUL bytes and
    symlink loops."""
    if not isinstance(rel, str):
        raise BundlePathError(f"manifest path {rel!r} is not a string.")
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or "\x00" in rel or ".." in p.parts:
        raise BundlePathError(f"manifest path {rel!r} must be relative and stay inside the bundle.")
    try:
        full = (root / p).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BundlePathError(f"manifest path {rel!r} cannot be resolved in {str(root)!r}: {e}.") from e
    if not full.is_relative_to(root.resolve()):
        raise BundlePathError(f"manifest path {rel!r} resolves to {str(full)!r}, outside the bundle {str(root)!r}.")
    return full


# Subtrees whose "path" keys are not bundle files: the build recipe (paths on the build
# machine) and the file table itself.
NOT_REFERENCES = ("build_config", "files")


def referenced_paths(obj) -> list[str]:
    """Every bundle file the manifest points at: values of ``path`` keys outside NOT_REFERENCES."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in NOT_REFERENCES:
                continue
            if k == "path" and isinstance(v, str):
                out.append(v)
            else:
                out += referenced_paths(v)
    elif isinstance(obj, list):
        for v in obj:
            out += referenced_paths(v)
    return out
