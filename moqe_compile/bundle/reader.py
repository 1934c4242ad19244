"""Bundle reader: refuses a bundle whose manifest or files cannot be trusted, naming the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moqe_compile.errors import BundleError, BundleIntegrityError, SchemaVersionError
from moqe_compile.bundle.manifest import MANIFEST, SCHEMA_VERSION, referenced_paths, safe_join, sha256_file


@dataclass
class Bundle:
    root: Path
    manifest: dict

    def file(self, rel: str) -> Path:
        return safe_join(self.root, rel)


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is not a directory.")
    if not mpath.is_file():
        raise BundleError(f"{str(mpath)!r} is missing: {str(root)!r} is not a moqe bundle.")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{str(mpath)!r} is not valid JSON: {e}.") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{str(mpath)!r} has schema_version {version!r}; this moqe-compile reads version {SCHEMA_VERSION}. "
            "Rebuild the bundle or use a matching release."
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{str(mpath)!r} has no 'files' table.")
    for rel in referenced_paths(manifest):
        safe_join(root, rel)
        if rel not in files:
            raise BundleIntegrityError(f"manifest references {rel!r}, which is not listed under 'files'.")
    for rel, meta in files.items():
        full = safe_join(root, rel)
        if not full.is_file():
            raise BundleIntegrityError(f"bundle file {rel!r} is missing from {str(root)!r}.")
        if not verify:
            continue
        size = full.stat().st_size
        if size != meta["size"]:
            raise BundleIntegrityError(f"bundle file {rel!r} has size {size}, manifest says {meta['size']}.")
        digest = sha256_file(full)
        if digest != meta["sha256"]:
            raise BundleIntegrityError(
                f"bundle file {rel!r} was changed: sha256 {digest}, manifest expects {meta['sha256']}."
            )
    return Bundle(root, manifest)
