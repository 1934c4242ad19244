"""The recipes that ship inside the package (``moqe_compile/recipes/*.toml``, package data).

``moqe-compile build`` without a recipe builds :data:`DEFAULT`; any shipped recipe can be named
by its stem (``fmnist-cnn``) instead of a path. Found through :mod:`importlib.resources`, so this
works the same from a source checkout, an editable install and an installed wheel. Stdlib only:
the runtime imports nothing from here, but ``moqe-compile recipes`` must not need torch either.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

from moqe_compile.errors import ConfigError

DEFAULT = "mobilenetv2-demo"
SUFFIX = ".toml"

_extracted = contextlib.ExitStack()  # for a package imported from a zip: files extracted until exit
atexit.register(_extracted.close)


def _shipped() -> dict[str, resources.abc.Traversable]:
    """Stem -> resource of every shipped recipe."""
    return {t.name[: -len(SUFFIX)]: t for t in resources.files(__name__).iterdir()
            if t.name.endswith(SUFFIX) and t.is_file()}


def names() -> list[str]:
    """The stems of the shipped recipes, sorted (``["fmnist-cnn", ..., "mobilenetv2-demo", ...]``)."""
    return sorted(_shipped())


def _as_path(t: resources.abc.Traversable) -> Path:
    if isinstance(t, Path):  # a package on the file system (checkout, editable install, wheel)
        return t
    return _extracted.enter_context(resources.as_file(t))  # e.g. zipimport: a temporary copy


def path(name_or_path: str | Path) -> Path:
    """The file of a recipe: a shipped name (``"fmnist-cnn"`` or ``"fmnist-cnn.toml"``) or a path.

    An existing file wins over a shipped name of the same spelling, so ``./fmnist-cnn.toml``
    (or any path) always means that file. Raises :class:`ConfigError` naming the value and the
    shipped recipes when it is neither."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    value = str(name_or_path)
    stem = value[: -len(SUFFIX)] if value.endswith(SUFFIX) else value
    shipped = _shipped()
    if stem in shipped:  # bare names only: "dir/x.toml" is a path that does not exist
        return _as_path(shipped[stem])
    why = "is a directory, not a recipe file" if p.is_dir() else "is neither a file nor a shipped recipe"
    raise ConfigError(f"recipe {value!r} {why}; the shipped recipes are: {', '.join(sorted(shipped))} "
                      f"(give one of these names, or the path of a recipe TOML).")


__all__ = ["DEFAULT", "names", "path"]
