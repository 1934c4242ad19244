"""Atomic bundle writer: build in a temporary sibling directory, rename into place at the end.

A failed or interrupted build removes its temporary directory and leaves any previous
bundle at the destination untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from moqe_compile.errors import BuildError
from moqe_compile.bundle.manifest import MANIFEST, SCHEMA_VERSION, referenced_paths, safe_join, sha256_file


class BundleWriter:
    def __init__(self, dest: str | Path):
        self.dest = Path(dest).resolve()
        if self.dest.exists() and not (self.dest / MANIFEST).is_file() and any(self.dest.iterdir()):
            raise BuildError(
                f"output {str(self.dest)!r} exists and is not a bundle; choose another -o or remove it."
            )
        self.tmp: Path | None = None

    def __enter__(self) -> "BundleWriter":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.partial-", dir=self.dest.parent))
        # mkdtemp makes the directory 0700; a bundle should get the user's normal permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, rel: str) -> Path:
        """Where to write bundle file ``rel`` (parents created)."""
        assert self.tmp is not None, "use BundleWriter as a context manager"
        p = safe_join(self.tmp, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: dict) -> Path:
        """Hash every file, write manifest.json, and atomically move the bundle into place."""
        assert self.tmp is not None
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.tmp).as_posix()
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        missing = sorted(set(referenced_paths(manifest)) - set(files))
        if missing:
            raise BuildError(f"manifest references files that were not written: {missing}.")
        manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
        os.replace(self.tmp, self.dest)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest
