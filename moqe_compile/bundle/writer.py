"""Atomic bundle writer: build in a temporary sibling directory, rename into place at the end.

A failed or interrupted build removes its temporary directory and leaves any previous
bundle at the destination untouched. The destination is replaced only when it is empty or
reads as a moqe bundle (a manifest with a ``schema_version`` and ``files`` table, and nothing
on disk that the table does not list); anything else is refused unless ``force``: ``-o`` must
never delete a user's files.

Every sibling the writer makes carries its process id: ``.<name>.partial-<pid>-*`` (the bundle
being written), ``.<name>.work-<pid>-*`` (the build's scratch space) and ``.<name>.old-<pid>``
(the previous bundle between the two renames of a commit). The next build to that path removes
those whose process is gone, and puts an ``.old`` copy back when a crash between the renames
left the path empty.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moqe_compile.bundle.manifest import MANIFEST, SCHEMA_VERSION, referenced_paths, safe_join, sha256_file
from moqe_compile.bundle.reader import parse_manifest
from moqe_compile.errors import BuildError, BundleError


def _oserror(what: str, path: Path, e: OSError) -> BuildError:
    return BuildError(f"cannot {what} {str(path)!r}: {e.strerror or e}. Choose another -o or fix its permissions.")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def is_bundle(path: Path) -> bool:
    """Whether directory ``path`` reads as a moqe bundle: a manifest with a ``schema_version``
    and a ``files`` table, and every file and directory in it accounted for by that table
    (hashes are not checked: a changed bundle is still a bundle to replace)."""
    try:
        m = parse_manifest(path / MANIFEST)
    except BundleError:
        return False
    if not (isinstance(m, dict) and isinstance(m.get("schema_version"), int) and isinstance(m.get("files"), dict)):
        return False
    listed = set(m["files"]) | {MANIFEST}
    parents = {p for rel in listed for p in _parents(rel)}
    return _only_listed(path, "", listed, parents)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _only_listed(root: Path, prefix: str, listed: set[str], parents: set[str]) -> bool:
    """Depth-first, stopping at the first entry the manifest does not account for."""
    try:
        entries = list(os.scandir(root / prefix if prefix else root))
    except OSError:
        return False
    for e in entries:
        rel = f"{prefix}/{e.name}" if prefix else e.name
        if e.is_dir(follow_symlinks=False):
            if rel not in parents or not _only_listed(root, rel, listed, parents):
                return False
        elif rel not in listed:
            return False
    return True


def check_destination(dest: Path, force: bool = False) -> None:
    """Refuse an output path the writer must not or cannot replace, before any work is done."""
    ancestor = dest.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BuildError(f"output {str(dest)!r} is under {str(ancestor)!r}, which is a file, not a directory; "
                         "choose another -o.")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise BuildError(f"output {str(dest)!r} exists and is not a directory; choose another -o or remove it.")
    if not dest.exists():
        return
    try:
        empty = not any(dest.iterdir())
    except OSError as e:
        raise _oserror("read the output directory", dest, e) from e
    if not (empty or force or is_bundle(dest)):
        raise BuildError(
            f"output {str(dest)!r} exists and is not a moqe bundle (no valid manifest.json, or files the manifest "
            "does not list); building there would delete them. Choose another -o, or pass --force "
            "(`moqe-compile build ... --force`) to replace the directory and everything in it.")


def _siblings(dest: Path) -> list[tuple[Path, str, int]]:
    """(path, kind, pid) of every sibling a writer to ``dest`` made."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(partial|work|old)-(\d+)(?:-.*)?$")
    out = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        m = pattern.match(p.name)
        if m:
            out.append((p, m.group(1), int(m.group(2))))
    return out


def recover(dest: Path) -> None:
    """Clean up after killed builds to ``dest``: restore an ``.old`` bundle where a crash between
    the two renames of a commit left the path empty, then remove the dead builds' siblings."""
    stale = [(p, kind) for p, kind, pid in _siblings(dest) if pid != os.getpid() and not pid_alive(pid)]
    for p, kind in stale:
        if kind == "old" and not os.path.lexists(dest):
            os.replace(p, dest)
    for p, _ in stale:
        if os.path.lexists(p):
            shutil.rmtree(p, ignore_errors=True)


def with_user_permissions(directory: Path) -> None:
    """mkdtemp makes a directory 0700; what is renamed into place from it (a bundle, a Triton
    repository that a server running as another user reads) gets the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (the two renames of a commit: stopped
    between them, the path would hold no bundle until the next build). Main thread only."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _resolved(dest: str | Path) -> Path:
    try:
        return Path(dest).resolve()
    except (OSError, RuntimeError) as e:
        raise BuildError(f"output {str(dest)!r} cannot be resolved: {e}.") from e


def checked_destination(dest: str | Path, force: bool = False) -> Path:
    """``dest`` resolved, or the BuildError the writer would raise for it, before any work."""
    resolved = _resolved(dest)
    check_destination(resolved, force)
    return resolved


class BundleWriter:
    def __init__(self, dest: str | Path, force: bool = False):
        self.dest = _resolved(dest)
        self.force = force
        if self.dest.parent.is_dir():
            recover(self.dest)
        check_destination(self.dest, force)
        self.tmp: Path | None = None
        self._work: Path | None = None

    def _mkdtemp(self, kind: str) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.{kind}-{os.getpid()}-", dir=self.dest.parent))
        except OSError as e:
            raise _oserror("write into", self.dest.parent, e) from e

    def __enter__(self) -> "BundleWriter":
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _oserror("create", self.dest.parent, e) from e
        self.tmp = self._mkdtemp("partial")
        with_user_permissions(self.tmp)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for d in (self.tmp, self._work):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)

    def work_dir(self) -> Path:
        """Scratch space for the build beside the output (removed on exit, and by the next build to
        this path if this process is killed)."""
        if self._work is None:
            self._work = self._mkdtemp("work")
        return self._work

    def path(self, rel: str) -> Path:
        """Where to write bundle file ``rel`` (parents created)."""
        assert self.tmp is not None, "use BundleWriter as a context manager"
        p = safe_join(self.tmp, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: dict) -> Path:
        """Hash every file, write manifest.json, and move the bundle into place."""
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
        try:
            self._swap()
        except OSError as e:
            raise _oserror("replace", self.dest, e) from e
        return self.dest

    def _swap(self) -> None:
        """Rename the old bundle aside, the new one in, then delete the old: a crash between the
        renames leaves the old bundle at ``.<name>.old-<pid>``, which the next build restores."""
        # Re-checked: the destination may have changed during a build of many minutes.
        check_destination(self.dest, self.force)
        old = None
        with signals_held():
            if self.dest.exists():
                old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
                if os.path.lexists(old):  # left by an earlier commit of this process
                    shutil.rmtree(old)
                os.replace(self.dest, old)
            try:
                os.replace(self.tmp, self.dest)
            except OSError:
                if old is not None:
                    os.replace(old, self.dest)
                raise
            self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
