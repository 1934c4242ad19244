"""A tiny random Llama causal LM with its own word-level fast tokenizer, and a small text
corpus, built in seconds: what every LM test runs on (transformers needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("the a one two red blue cat dog sat ran on under big small house tree river stone light dark "
         "quick slow bird fish sang swam near far old new").split()


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


def make_tiny_lm(out: Path, seed: int = 0) -> Path:
    """save_pretrained directory: LlamaForCausalLM (2 layers, d = 64, GQA 4/2 heads) + tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokenizers then joins the word-level tokens with spaces, so text round-trips.
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=1, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # A random init gives near-uniform next-token distributions; a sharper embedding makes the
    # experts' errors (and so the loss matrix) non-trivial.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
