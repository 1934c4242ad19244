"""The one closed hierarchy of errors moqe-compile raises on purpose.

Every error names the bad value and says what to do; the CLI prints ``str(err)`` and
exits with ``err.exit_code`` so scripts can tell the classes apart. Each class has its own
code, and none is 2: argparse exits 2 on a usage error (the full table: docs/cli.md).
"""

from __future__ import annotations


class MoqeError(Exception):
    """Base of every error moqe-compile raises deliberately."""

    exit_code = 1


class ConfigError(MoqeError):
    """A recipe file or config value is malformed, unknown or inconsistent."""

    exit_code = 8


class InputError(MoqeError):
    """Data handed to the runtime or the build is unreadable or has the wrong shape/dtype."""

    exit_code = 3


class InputLimitError(InputError):
    """An input breaks a bound on what one call may decode (``InputLimits``: image size,
    aspect ratio, image count, total pixels, array bytes); a server answers it with 413."""


class BundleError(MoqeError):
    """A bundle directory cannot be trusted (missing/changed files, bad manifest)."""

    exit_code = 4


class BundleIntegrityError(BundleError):
    """A file listed in the manifest is missing or its size/sha256 differ."""


class BundlePathError(BundleError):
    """A manifest path is absolute or escapes the bundle directory."""


class SchemaVersionError(BundleError):
    """The manifest's schema_version is not one this release can read."""


class BuildError(MoqeError):
    """A build stage failed; no bundle was written."""

    exit_code = 5


class BackendError(MoqeError):
    """A backend is unavailable (missing dependency, no device) or failed to run."""

    exit_code = 6


class OverloadedError(MoqeError):
    """The runtime's bounded request queue is full, or the runtime is shutting down: retry later."""

    exit_code = 7


__all__ = [
    "MoqeError",
    "ConfigError",
    "InputError",
    "InputLimitError",
    "BundleError",
    "BundleIntegrityError",
    "BundlePathError",
    "SchemaVersionError",
    "BuildError",
    "BackendError",
    "OverloadedError",
]
