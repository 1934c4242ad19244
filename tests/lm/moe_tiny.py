"""Tiny sparse MoE causal LMs (Mixtral, Qwen2-MoE, OLMoE layouts) with the word-level tokenizer
of tiny.py, briefly trained so that their gates move, plus the gate-norm history file that
bench/moe_train.py writes for real runs. Built in seconds (transformers needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tiny import WORDS

LAYOUTS = ("mixtral", "qwen2_moe", "olmoe")


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
    word sequences move the gates; ``history`` writes moe_gate_history.safetensors (init/final)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from moqe_compile.tasks.causal_lm.moe import GATE_HISTORY_FILE, find_moe

    vocab = {"<unk>": 0, "<eos>": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
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
