"""Every tiny model the tests build, in one registry: ``MODELS[name](folder)`` writes that model
into ``folder`` and returns what was written. Each builds in seconds on 2 CPUs.

- ``cnn``: TinyCNN (3 channels, CROP x CROP, NUM_CLASSES outputs) fitted to the class images
  (``class_batch``): it classifies them correctly, so outputs depend on the input.
- ``gray-cnn``: TinyCNN with a 1-channel stem (GRAY_CROP x GRAY_CROP) as ONNX.
- ``residual-cnn``: a MobileNetV2-style inverted residual (1x1 expand, depthwise 3x3, ReLU6,
  1x1 project, skip Add) between a stem and a classifier, as ONNX (CROP x CROP).
- ``lm``: a tiny Llama causal LM trained to continue alternating word pairs, with a word-level
  fast tokenizer (transformers needed).
- ``moe-lm``: a sparse MoE causal LM (Mixtral, Qwen2-MoE or OLMoE layout), briefly trained so its
  gates move, plus its gate-norm history file (transformers needed).
- ``handmade-bundle``: a complete bundle of hand-written ONNX graphs whose routing and experts
  are readable from the outputs (no build).
- ``routed-bundle``: hand-written graphs at the ``cnn`` model's input, whose router sends each
  input to the expert of its brightest channel, with a confidence fallback (``routed_oracle``
  says what it must do, in numpy).

``DATA`` holds the matching data writers (labelled images, a fake Fashion-MNIST, a text corpus), and ``tiny_config`` /
``tiny_lm_config`` the recipes that build bundles of the tiny models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

CROP = 32
NUM_CLASSES = 4
GRAY_CROP = 28


# --- cnn, gray-cnn ---------------------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


# The default preprocessing's normalization (ImageNet's), which ``tiny_config`` keeps.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGE_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def class_pixels(labels: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 images of ``labels``: class c lights channel c % 3 at 160 + 20 c,
    plus noise (classes 0 and 3 share a channel and differ by brightness)."""
    labels = np.asarray(labels)
    base = np.zeros((len(labels), size, size, 3), np.float32)
    base[np.arange(len(labels)), ..., labels % 3] = (160 + 20 * labels)[:, None, None]
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def class_batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x, labels): n preprocessed (n, 3, CROP, CROP) float32 images of every class in turn, drawn
    like ``write_images`` draws them; the ``cnn`` model tells their classes apart, so outputs
    (and quantization errors) vary with the input, unlike on Gaussian noise."""
    y = np.arange(n) % NUM_CLASSES
    img = class_pixels(y, np.random.default_rng(seed), CROP).transpose(0, 3, 1, 2) / np.float32(255)
    return ((img - IMAGE_MEAN) / IMAGE_STD).astype(np.float32), y


def fit_tiny_cnn(m: TinyCNN, seed: int = 0) -> TinyCNN:
    """Give ``m`` real BatchNorm statistics and a classifier that reads the class colour.

    Closed form instead of training (a second on 2 CPUs): the BN running statistics are
    the class images' own, then the last layer is a ridge regression of centred one-hot
    targets on the standardized pooled features. Every class image is then classified
    correctly with a logit margin of about 3.5, so quantization moves logits by an amount
    the tests can see, and checks on class agreement can fail."""
    x, y = class_batch(256, seed)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = None  # cumulative: the statistics of this one batch
                mod.reset_running_stats()
        m.train()
        m.body(xt)
        m.eval()
        f = m.body(xt).mean(dim=(2, 3)).double().numpy()
        mu, sd = f.mean(0), f.std(0) + 1e-6
        z = (f - mu) / sd
        target = 4.0 * (np.eye(NUM_CLASSES)[y] - 1 / NUM_CLASSES)
        w = np.linalg.solve(z.T @ z + np.eye(z.shape[1]), z.T @ target)
        m.fc.weight.copy_(torch.from_numpy((w / sd[:, None]).T.astype(np.float32)))
        m.fc.bias.copy_(torch.from_numpy((-(mu / sd) @ w).astype(np.float32)))
    return m


def write_cnn(out: Path) -> Path:
    """``out/tiny.onnx``: TinyCNN fitted to the class images (``fit_tiny_cnn``), input
    (batch, 3, CROP, CROP)."""
    from moqe_compile.tasks.image.model import export_torch

    torch.manual_seed(0)
    m = fit_tiny_cnn(TinyCNN())
    out.mkdir(parents=True, exist_ok=True)
    export_torch(m, out / "tiny.onnx", CROP, 18)
    return out / "tiny.onnx"


class TinyResidualCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24), nn.ReLU6(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU6(),
            nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8),
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.stem(x)
        return self.fc((h + self.block(h)).mean(dim=(2, 3)))


def write_residual_cnn(out: Path) -> Path:
    """``out/residual.onnx``: TinyResidualCNN, input (batch, 3, CROP, CROP)."""
    from moqe_compile.tasks.image.model import export_torch

    torch.manual_seed(1)
    m = TinyResidualCNN().eval()
    out.mkdir(parents=True, exist_ok=True)
    export_torch(m, out / "residual.onnx", CROP, 18)
    return out / "residual.onnx"


def write_gray_cnn(out: Path) -> Path:
    """``out/tiny_gray.onnx``: TinyCNN with a 1-channel stem, input (batch, 1, GRAY_CROP, GRAY_CROP)."""
    from moqe_compile.tasks.image.model import export_torch

    torch.manual_seed(0)
    m = TinyCNN()
    m.body[0] = nn.Conv2d(1, 8, 3, padding=1)
    m.eval()
    out.mkdir(parents=True, exist_ok=True)
    export_torch(m, out / "tiny_gray.onnx", GRAY_CROP, 18, channels=1)
    return out / "tiny_gray.onnx"


def write_images(root: Path) -> Path:
    """16 labelled 40 x 40 images (NUM_CLASSES classes, ``class_pixels``) in class-index folders."""
    from PIL import Image

    y = np.arange(16) % NUM_CLASSES
    for i, img in enumerate(class_pixels(y, np.random.default_rng(0), 40)):
        d = root / str(y[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:02d}.png")
    return root


def tiny_config(model_path: Path, images: Path, **data_kw):
    """The image recipe (three experts, a small router) on the ``cnn`` model and ``images``."""
    from moqe_compile.tasks.image.config import (BuildConfig, ControlsConfig, DataConfig, ExpertRecipe, GateConfig,
                                                 ModelConfig, PreprocessConfig, RouterConfig)

    return BuildConfig(
        model=ModelConfig(source="onnx", path=str(model_path), num_classes=NUM_CLASSES, labels=""),
        preprocessing=PreprocessConfig(resize=36, crop=CROP),
        data=DataConfig(source=str(images), augmentations=3, **data_kw),
        experts=[ExpertRecipe(name="minmax", calibration="minmax"),
                 ExpertRecipe(name="pct", calibration="percentile", percentile=99.9),
                 ExpertRecipe(name="entropy", calibration="entropy")],
        router=RouterConfig(input_size=8, epochs=3, batch_size=8),
        controls=ControlsConfig(copies=2),
        # 16 images are too few for the significance gate to accept a router; tests of the
        # built routed path keep it whatever the gate says. The gate's own branches are
        # tested in tests/test_gate.py.
        gate=GateConfig(force_routing=True),
    )



FMNIST_TRAIN, FMNIST_TEST = 200, 40  # images in the fake Fashion-MNIST's train and test files


def write_tiny_recipe(path: Path, model_path: Path, images: Path, augmentations: int = 2) -> Path:
    """The tiny CNN as a TOML recipe file (for the CLI), the defaults elsewhere."""
    path.write_text(f"""
[model]
source = "onnx"
path = "{model_path}"
num_classes = {NUM_CLASSES}
labels = ""
[preprocessing]
resize = 36
crop = {CROP}
[data]
source = "{images}"
augmentations = {augmentations}
[router]
input_size = 8
""")
    return path


def write_idx(path: Path, arr: np.ndarray) -> None:
    """``arr`` as an idx file (uint8), gzipped, as Fashion-MNIST ships them."""
    import gzip
    import struct

    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_fmnist_set(n: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose brightness depends on the label, so classes are separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n).astype(np.uint8)
    x = np.clip(rng.normal(0, 30, (n, 28, 28)) + 20 + 20 * y[:, None, None], 0, 255).astype(np.uint8)
    return x, y


def write_fake_fmnist(folder: Path) -> dict:
    """A tiny Fashion-MNIST (FMNIST_TRAIN / FMNIST_TEST 28 x 28 images, NUM_CLASSES labels) in the
    original idx gz files; returns {split: (images, labels)}."""
    from moqe_compile.tasks.image import fashion_mnist as fm

    data = {"train": fake_fmnist_set(FMNIST_TRAIN, 1, NUM_CLASSES), "test": fake_fmnist_set(FMNIST_TEST, 2, NUM_CLASSES)}
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in data.items():
        img_name, lab_name = fm._FILES[split]
        write_idx(folder / img_name, x)
        write_idx(folder / lab_name, y)
    return data

# --- lm, moe-lm ------------------------------------------------------------------------------

WORDS = ("the a one two red blue cat dog sat ran on under big small house tree river stone light dark "
         "quick slow bird fish sang swam near far old new").split()
LM_EXPERTS = ["w8a8-rtn", "w4-awq", "w4-gptq"]  # w4-awq = rescale + re-export + ORT RTN; SmoothQuant: tasks/causal_lm/test_smoothing.py
MOE_LAYOUTS = ("mixtral", "qwen2_moe", "olmoe")


def write_corpus(path: Path, docs: int = 40, seed: int = 0) -> Path:
    """Blank-line separated documents of random sentences (documents differ in word choice,
    so the corpus is not uniform)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(docs):
        vocab = rng.choice(WORDS, 12, replace=False)
        out.append(" ".join(" ".join(rng.choice(vocab, 8)) + " ." for _ in range(10)))
    path.write_text("\n\n".join(out) + "\n")
    return path


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokenizers then joins the word-level tokens with spaces, so text round-trips.
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def make_tiny_lm(out: Path, seed: int = 0, steps: int = 60) -> Path:
    """save_pretrained directory: LlamaForCausalLM (2 layers, d = 64, GQA 4/2 heads) + tokenizer,
    trained for ``steps`` Adam steps (about 2 s on one thread) on alternating word pairs
    ("a b a b ..."): the next word is the one two back, so greedy continuations follow the
    prompt ("cat dog cat" -> "dog cat dog ...") and a decoder that loses its context (its KV
    cache) gives other tokens. Untrained, the tied embeddings make it repeat the last word."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _word_tokenizer()
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=1, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # A random init gives near-uniform next-token distributions; a sharper embedding makes the
    # experts' errors (and so the loss matrix) non-trivial.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: thread hand-offs cost more than they save
    try:
        for _ in range(steps):
            pairs = rng.choice(len(WORDS), (16, 2)) + 3  # word ids start after <unk>, <eos>, "."
            x = torch.from_numpy(np.tile(pairs, 6))
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def tiny_lm_config(tmp: Path, **router):
    """The causal-LM recipe on the tiny Llama in ``tmp/model`` and the corpus ``tmp/corpus.txt``."""
    from moqe_compile.tasks.causal_lm.config import LMBuildConfig

    return LMBuildConfig.from_dict({
        "task": "causal-lm", "model": {"source": "transformers", "path": str(tmp / "model")},
        "data": {"corpora": [str(tmp / "corpus.txt")], "seq_len": 32, "calibration_sequences": 4},
        "experts": [{"name": n, "preset": n} for n in LM_EXPERTS],
        "router": {"prefix_tokens": 8, "epochs": 2, **router},
        "controls": {"copies": 2}})  # fewer copies than experts: their router has its own width


def tiny_moe_config(layout: str, experts: int = 4, layers: int = 2):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=None,
                  pad_token_id=None, num_experts_per_tok=2, tie_word_embeddings=True)
    if layout == "mixtral":
        return MixtralConfig(intermediate_size=64, num_local_experts=experts, **common)
    if layout == "qwen2_moe":
        return Qwen2MoeConfig(moe_intermediate_size=64, shared_expert_intermediate_size=64, intermediate_size=64,
                              num_experts=experts, decoder_sparse_step=1, **common)
    return OlmoeConfig(intermediate_size=64, num_experts=experts, **common)


def make_tiny_moe(out: Path, layout: str = "mixtral", seed: int = 0, steps: int = 30, history: bool = True,
                  experts: int = 4, layers: int = 2) -> Path:
    """save_pretrained directory of a tiny MoE LM + tokenizer; ``steps`` Adam steps on random
    word sequences move the gates; ``history`` writes moe_gate_history.safetensors (init/final),
    as bench/moe_train.py does for real runs."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moqe_compile.tasks.causal_lm.moe import GATE_HISTORY_FILE, find_moe

    tok = _word_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(layout, experts, layers))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
        for n, p in model.named_parameters():  # zero-initialized routers (Qwen2-MoE, OLMoE) would tie every score
            if n.endswith("gate.weight") and not p.abs().sum():
                p.normal_(0, 0.02)
    moe = find_moe(model)
    init = {f"init.{b.gate_param}": b.gate_weight().detach().clone() for b in moe.blocks}
    if steps:
        rng = np.random.default_rng(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):  # sentences over a document's 12-word vocabulary, as write_corpus makes
            rows = [rng.choice(rng.choice(len(WORDS), 12, replace=False), 24) + 3 for _ in range(8)]
            x = torch.from_numpy(np.stack(rows))
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if history:
        final = {f"final.{b.gate_param}": b.gate_weight().detach().clone() for b in moe.blocks}
        save_file({k: v.contiguous() for k, v in {**init, **final}.items()}, str(out / GATE_HISTORY_FILE))
    return out


# --- handmade-bundle -------------------------------------------------------------------------

# (N, HANDMADE_C, HANDMADE_S, HANDMADE_S) inputs, HANDMADE_K experts.
HANDMADE_C, HANDMADE_S, HANDMADE_K = 3, 8, 3


def _handmade_graph(path, scale: float | None):
    """(N, 3, 8, 8) -> channel means (N, 3); times ``scale``, or softmax when None."""
    import onnx
    from onnx import TensorProto, helper

    C, S, K = HANDMADE_C, HANDMADE_S, HANDMADE_K
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, S, S])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", K])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0)]
    inits = [axes]
    if scale is None:
        nodes.append(helper.make_node("Softmax", ["m"], ["y"], axis=-1))
    else:
        inits.append(helper.make_tensor("s", TensorProto.FLOAT, [], [scale]))
        nodes.append(helper.make_node("Mul", ["m", "s"], ["y"]))
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))


def make_handmade_bundle(root: Path) -> Path:
    """A bundle whose router is the softmax of the channel means (so the input decides the
    routing) and whose expert k outputs the channel means times k + 1 (so outputs show which
    expert ran), with onnxruntime-cpu and tensorrt variants of the same graphs."""
    from moqe_compile.bundle.manifest import sha256_file

    C, S = HANDMADE_C, HANDMADE_S
    names = ["e0", "e1", "e2"]
    files = {"router/router.onnx": None, "task/labels.json": None}
    (root / "router").mkdir(parents=True)
    (root / "task").mkdir()
    (root / "fp").mkdir()
    _handmade_graph(root / "router/router.onnx", None)
    (root / "task/labels.json").write_text(json.dumps(["a", "b", "c"]))
    experts = []
    for k, n in enumerate(names):
        (root / "experts" / n).mkdir(parents=True)
        variants = {}
        for b in ("onnxruntime-cpu", "tensorrt"):
            rel = f"experts/{n}/{b}.onnx"
            _handmade_graph(root / rel, float(k + 1))
            files[rel] = None
            variants[b] = {"path": rel}
        experts.append({"name": n, "variants": variants})
    _handmade_graph(root / "fp/model.onnx", 1.0)
    files["fp/model.onnx"] = None
    manifest = {"schema_version": 1, "model": {"fp": {"path": "fp/model.onnx"}}, "preprocessing": {"resize": S, "crop": S, "mean": [0.0] * C, "std": [1.0] * C},
                "task": {"kind": "image-classification", "num_classes": C, "labels": {"path": "task/labels.json"}},
                "io": {"input": {"name": "x", "shape": ["batch", C, S, S], "dtype": "float32"},
                       "output": {"name": "y", "shape": ["batch", C], "dtype": "float32"}},
                "experts": experts,
                "router": {"path": "router/router.onnx"}, "backends": ["onnxruntime-cpu", "tensorrt"],
                "routing": {"enabled": True, "default_expert": "e1", "fallback_threshold": 0.0}}
    manifest["files"] = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
                         for rel in files}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --- routed-bundle ---------------------------------------------------------------------------

# The routed bundle's router: softmax(ROUTER_SHARPNESS * channel means); inputs whose router
# confidence is below ROUTED_THRESHOLD go to expert ROUTED_FALLBACK.
ROUTED_EXPERTS, ROUTER_SHARPNESS, ROUTED_THRESHOLD, ROUTED_FALLBACK = ("r", "g", "b"), 100.0, 0.6, 1


def _means_graph(path: Path, out_width: int, weight: np.ndarray | None, bias: np.ndarray | None,
                 sharpness: float | None) -> None:
    """(N, 3, CROP, CROP) -> channel means m (N, 3), then m @ weight + bias (an expert) or
    softmax(sharpness * m) (the router)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, CROP, CROP])
    name = "logits" if sharpness is None else "probs"
    y = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", out_width])
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["m"], keepdims=0)]
    if sharpness is None:
        inits += [numpy_helper.from_array(weight.astype(np.float32), "w"),
                  numpy_helper.from_array(bias.astype(np.float32), "b")]
        nodes += [helper.make_node("MatMul", ["m", "w"], ["mw"]), helper.make_node("Add", ["mw", "b"], [name])]
    else:
        inits.append(numpy_helper.from_array(np.array(sharpness, np.float32), "s"))
        nodes += [helper.make_node("Mul", ["m", "s"], ["ms"]), helper.make_node("Softmax", ["ms"], [name], axis=-1)]
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def routed_expert_weights(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (3, NUM_CLASSES), bias) of routed expert k: its own random linear map of the
    channel means, so experts give visibly different logits."""
    rng = np.random.default_rng(100 + k)
    return rng.normal(0, 2, (3, NUM_CLASSES)), rng.normal(0, 1, NUM_CLASSES)


def routed_oracle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expert index, confidence, fell back) the routed bundle must give ``x``, from its
    construction in numpy (no ONNX, no moqe code)."""
    z = ROUTER_SHARPNESS * x.astype(np.float64).mean(axis=(2, 3))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf = p.max(1)
    low = conf < ROUTED_THRESHOLD
    return np.where(low, ROUTED_FALLBACK, p.argmax(1)), conf, low


def routed_reference(root: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expert index, confidence, logits) for ``x`` on the routed bundle at ``root``: the routing
    from ``routed_oracle``, each sample's logits from its expert's graph run alone, on that
    one sample, in a plain onnxruntime session (nothing of moqe's runtime or dispatch)."""
    import onnxruntime as ort

    idx, conf, _ = routed_oracle(x)
    sessions = {n: ort.InferenceSession(str(root / f"experts/{n}/onnxruntime-cpu.onnx"),
                                        providers=["CPUExecutionProvider"]) for n in ROUTED_EXPERTS}
    logits = np.stack([sessions[ROUTED_EXPERTS[k]].run(None, {"input": x[i:i + 1]})[0][0]
                       for i, k in enumerate(idx)])
    return idx, conf, logits


def make_routed_bundle(root: Path) -> Path:
    """A bundle of hand-written graphs that routes by construction: the router sends each input
    to the expert of its brightest channel (r, g, b) unless unsure (``routed_oracle``), and
    expert k maps the channel means to NUM_CLASSES logits with its own weights. Input and
    preprocessing are the ``cnn`` model's, so the class images route by colour and Gaussian
    batches mix every expert and the fallback."""
    from moqe_compile.bundle.manifest import sha256_file

    root.mkdir(parents=True)
    for d in ("router", "task", "fp"):
        (root / d).mkdir()
    files = ["router/router.onnx", "task/labels.json", "fp/model.onnx"]
    _means_graph(root / files[0], len(ROUTED_EXPERTS), None, None, ROUTER_SHARPNESS)
    (root / files[1]).write_text(json.dumps([f"class_{i}" for i in range(NUM_CLASSES)]))
    _means_graph(root / files[2], NUM_CLASSES, *routed_expert_weights(0), None)
    experts = []
    for k, n in enumerate(ROUTED_EXPERTS):
        (root / "experts" / n).mkdir(parents=True)
        rel = f"experts/{n}/onnxruntime-cpu.onnx"
        _means_graph(root / rel, NUM_CLASSES, *routed_expert_weights(k), None)
        files.append(rel)
        experts.append({"name": n, "variants": {"onnxruntime-cpu": {"path": rel}}})
    manifest = {"schema_version": 1, "model": {"fp": {"path": files[2]}},
                "preprocessing": {"resize": 36, "crop": CROP, "mean": IMAGE_MEAN.ravel().tolist(),
                                  "std": IMAGE_STD.ravel().tolist()},
                "task": {"kind": "image-classification", "num_classes": NUM_CLASSES,
                         "labels": {"path": files[1]}},
                "io": {"input": {"name": "input", "shape": ["batch", 3, CROP, CROP], "dtype": "float32"},
                       "output": {"name": "logits", "shape": ["batch", NUM_CLASSES], "dtype": "float32"}},
                "experts": experts,
                "router": {"path": files[0], "input": "input", "output": "probs"},
                "backends": ["onnxruntime-cpu"],
                "routing": {"enabled": True, "default_expert": ROUTED_EXPERTS[0],
                            "fallback_threshold": ROUTED_THRESHOLD,
                            "fallback_expert": ROUTED_EXPERTS[ROUTED_FALLBACK]}}
    manifest["files"] = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
                         for rel in files}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


MODELS = {
    "cnn": write_cnn,
    "gray-cnn": write_gray_cnn,
    "residual-cnn": write_residual_cnn,
    "lm": make_tiny_lm,
    "moe-lm": make_tiny_moe,
    "handmade-bundle": make_handmade_bundle,
    "routed-bundle": make_routed_bundle,
}
DATA = {
    "images": write_images,
    "fashion-mnist": write_fake_fmnist,
    "corpus": write_corpus,
}
