"""Manifest constants and helpers shared by the writer and the reader."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from moqe_compile.errors import BundlePathError, InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Expert names become directory names (``experts/<name>/`` in a bundle, ``expert_<name>/`` in
# a Triton repository) and Triton model names: this rule keeps a name one harmless path
# component on every platform (no separator, no parent, no hidden file, no option-like "-x").
# 128 (below the schema's 256) leaves a prefix and "expert_" room in a 255-byte file name.
MAX_NAME = 128
NAME_RULE = (f"1 to {MAX_NAME} ASCII letters, digits, '.', '_' and '-', starting with a letter or digit, "
             "without '..'")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_safe_name(name) -> bool:
    """Whether ``name`` follows NAME_RULE."""
    return (isinstance(name, str) and len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None
            and ".." not in name)


def safe_join(root: Path, rel: str, what: str = "manifest path", inside: str = "the bundle") -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, escapes, NUL bytes and symlink
    loops. ``what`` and ``inside`` name the path and ``root`` in the BundlePathError."""
    if not isinstance(rel, str):
        raise BundlePathError(f"{what} {rel!r} is not a string.")
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or "\x00" in rel or ".." in p.parts:
        raise BundlePathError(f"{what} {rel!r} must be relative and stay inside {inside}.")
    try:
        full = (root / p).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BundlePathError(f"{what} {rel!r} cannot be resolved in {str(root)!r}: {e}.") from e
    if not full.is_relative_to(root.resolve()):
        raise BundlePathError(f"{what} {rel!r} resolves to {str(full)!r}, outside {inside} {str(root)!r}.")
    return full


def check_outside(bundle: Path, out: str | Path, option: str) -> Path:
    """``out`` resolved, refused (InputError naming ``option``) where it lies inside ``bundle``:
    files written there would be unlisted, and a hashed bundle is never modified."""
    root, resolved = Path(bundle).resolve(), Path(out).resolve()
    if resolved.is_relative_to(root):
        raise InputError(f"{option} {str(resolved)!r} is inside the bundle {str(root)!r}; a hashed bundle is never "
                         "modified. Choose a directory outside it.")
    return resolved


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
