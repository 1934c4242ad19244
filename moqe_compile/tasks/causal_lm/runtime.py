"""LMRuntime: serve a ``causal-lm`` bundle on ONNX Runtime CPU (numpy, onnxruntime, tokenizers; no torch).

One expert serves a whole request (per-sequence routing): the router reads the FP embeddings
of the first ``prefix_tokens`` tokens of the text (for generation: of the prompt), then the
chosen expert scores the sequence or generates from it with its KV cache. When the bundle's
significance gate refused routing, the router is not run and the default expert serves.
Texts of one call are grouped per expert with runtime/dispatch.py, as the image runtime does.
Expert sessions are created on first use (each holds a full decoder).

Built on ``runtime/base.py``'s ``BundleRuntime``: ``run(texts)`` scores a list of texts and
returns a ``RunResult`` whose ``outputs`` are one ``ScoreResult`` per text; ``submit(texts)``
queues them for the dynamic batcher; ``close`` drains queued requests and waits for running
scores and generations before it drops the sessions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moqe_compile.backends.onnxruntime_cpu import graph_session
from moqe_compile.bundle import read_bundle
from moqe_compile.errors import BundleError, InputError
from moqe_compile.runtime.base import BundleRuntime, QueueConfig, RunResult, timing
from moqe_compile.runtime.dispatch import group_by_expert
from moqe_compile.tasks.causal_lm.config import TASK as KIND
from moqe_compile.tasks.causal_lm.score import DecoderSession, token_nll


@dataclass
class ScoreResult:
    text: str
    tokens: int
    mean_nll: float
    perplexity: float
    expert: str
    router_confidence: float | None


@dataclass
class GenerateResult:
    prompt: str
    text: str
    new_tokens: list[int]
    expert: str
    router_confidence: float | None
    stopped: str
    timing_ms: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Text:
    """A checked input: the text and its token ids."""

    text: str
    ids: np.ndarray


def max_chars(tokenizer, positions: int) -> int | None:
    """The most characters a text of ``positions`` tokens can have, or None where no bound
    holds. Without a normalizer or an unknown token (byte-level BPE, as the models built here
    use) no token covers more characters than its vocabulary entry spells, so a longer text
    cannot fit and is refused before the tokenizer spends time on it; an unknown token may stand
    for a whole word, and a normalizer may drop characters."""
    from tokenizers import models

    model = tokenizer.model
    if tokenizer.normalizer is not None or not isinstance(model, models.BPE) or model.unk_token:
        return None
    return positions * max(map(len, tokenizer.get_vocab(with_added_tokens=True)))


class LMRuntime(BundleRuntime):
    def __init__(self, bundle, threads: int = 0, queue: QueueConfig | None = None):
        m = bundle.manifest
        kind = m.get("task", {}).get("kind")
        if kind != KIND:
            raise BundleError(f"bundle {str(bundle.root)!r} is a {kind!r} bundle, not {KIND!r}: "
                              f"open it with moqe_compile.load().")
        super().__init__(bundle.root, m, queue)
        from tokenizers import Tokenizer

        self.bundle, self.threads = bundle, threads
        self.tokenizer = Tokenizer.from_file(str(bundle.file(m["task"]["tokenizer"]["path"])))
        d = m["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = d["layers"], d["kv_heads"], d["head_dim"]
        self.max_positions = d["max_positions"]
        self.max_chars = max_chars(self.tokenizer, self.max_positions)
        self.eos = m["task"]["eos_token_id"]
        self._rel = {e["name"]: e["variants"]["onnxruntime-cpu"]["path"] for e in m["experts"]}
        self._rel["fp"] = m["model"]["fp"]["path"]
        # Writable: eval measures the router's choice even where the gate serves one expert.
        self.routing_enabled = bool(m["routing"]["enabled"])
        self.prefix_tokens = m["router"]["prefix_tokens"]
        self._sessions: dict[str, DecoderSession] = {}
        self._session_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, threads: int = 0,
             queue: QueueConfig | None = None) -> "LMRuntime":
        return cls(read_bundle(path, verify=verify), threads, queue)

    def _release(self) -> None:
        self._sessions.clear()
        self._router = None

    # -------------------------------------------------------------- pieces
    @property
    def routed(self) -> bool:
        return self.routing_enabled

    def session(self, name: str) -> DecoderSession:
        """The decoder of expert ``name`` (or ``"fp"``), created once."""
        with self._session_lock:
            if name not in self._sessions:
                if name not in self._rel:
                    raise InputError(f"unknown expert {name!r}; this bundle has {self.expert_names}.")
                # verified bytes (the bundle's shared embedding table comes with them, once for all)
                self._sessions[name] = DecoderSession(name, self.bundle.graph(self._rel[name]), self.layers,
                                                      self.kv_heads, self.head_dim, self.threads)
            return self._sessions[name]

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise InputError("the input text is empty.")
        if self.max_chars is not None and len(text) > self.max_chars:
            raise InputError(f"the text has {len(text)} characters; the model takes at most {self.max_positions} "
                             f"tokens, which no text over {self.max_chars} characters fits in.")
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        if len(ids) > self.max_positions:
            raise InputError(f"the text has {len(ids)} tokens; the model takes at most {self.max_positions}.")
        return ids

    def _router_session(self):
        with self._session_lock:
            if self._router is None:
                rel = self.manifest["router"]["path"]
                # a few dozen tokens: threads cost more than they save
                self._router = graph_session(self.bundle.graph(rel), threads=1, name="router")
            return self._router

    def _router_probs(self, seqs: list) -> np.ndarray:
        """(N, K) router probabilities, one sequence at a time (short texts' prefixes differ
        in length)."""
        router = self._router_session()
        rows = []
        for s in seqs:
            pre = np.asarray(getattr(s, "ids", s))[None, : self.prefix_tokens]
            rows.append(router.run(None, {"input_ids": pre, "attention_mask": np.ones_like(pre)})[0][0])
        return np.stack(rows)

    def _check(self, texts: list[str]) -> list[_Text]:
        """Each text with its token ids; perplexity needs at least 2 tokens."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise InputError(f"expected a non-empty list of texts, got {type(texts).__name__}.")
        out = [t if isinstance(t, _Text) else _Text(t, self.encode(t)) for t in texts]
        for t in out:
            if len(t.ids) < 2:
                raise InputError(f"text {t.text[:40]!r} has {len(t.ids)} token(s); perplexity needs at least 2.")
        return out

    def _run(self, items: list[_Text]) -> RunResult:
        t0 = time.perf_counter()
        idx, conf = self.route(items)
        t1 = time.perf_counter()
        out = self._score_groups(items, idx, conf, self.expert_names)
        t2 = time.perf_counter()
        return RunResult(out, idx, [self.expert_names[k] for k in idx], conf, timing(t0, t1, t2),
                         self.fell_back(conf))

    def _score_groups(self, items: list[_Text], idx: np.ndarray, conf, names) -> list[ScoreResult]:
        """Score each text on ``names[idx[i]]``, one expert group at a time."""
        out: list[ScoreResult | None] = [None] * len(items)
        for k, members in group_by_expert(idx):
            sess = self.session(names[k])
            for i in members:  # one sequence per run: see causal_lm/score.py
                ids = items[i].ids[None]
                nll = float(token_nll(sess.logits(ids), ids).mean())
                c = float(conf[i]) if self.routed and conf is not None else None
                out[i] = ScoreResult(items[i].text, len(items[i].ids), nll, float(np.exp(nll)), names[k], c)
        return out

    # -------------------------------------------------------------- requests
    def score(self, texts: list[str], expert: str | None = None) -> tuple[list[ScoreResult], dict]:
        """Perplexity of each text under its routed expert (or ``expert``: a name or ``"fp"``)."""
        if expert is None:
            res = self.run(list(texts))
            return res.outputs, res.timing_ms
        with self.counted():
            t0 = time.perf_counter()
            self.session(expert)  # created on first use: timed as "load", not as routing
            items = self._check(list(texts))
            t1 = time.perf_counter()
            out = self._score_groups(items, np.zeros(len(items), np.int64), None, [expert])
            t2 = time.perf_counter()
            return out, {"load": (t1 - t0) * 1e3, "router": 0.0, "experts": (t2 - t1) * 1e3,
                         "total": (t2 - t0) * 1e3}

    def generate(self, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 expert: str | None = None) -> GenerateResult:
        """Greedy decoding with the chosen expert's KV cache; ``on_text`` receives text as it appears."""
        with self.counted():
            return self._generate(prompt, max_new_tokens, on_text, expert)

    def _generate(self, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None,
                  expert: str | None) -> GenerateResult:
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens = {max_new_tokens} must be >= 1.")
        t0 = time.perf_counter()
        ids = self.encode(prompt)
        if expert is None:
            idx, conf = self.route([ids])
            name, c = self.expert_names[int(idx[0])], (float(conf[0]) if self.routed else None)
        else:
            name, c = expert, None
        t_route = time.perf_counter()
        sess = self.session(name)  # first use creates the session: timed apart as "load"
        t1 = time.perf_counter()
        x, past, new, shown, stopped = ids[None], sess.empty_past(1), [], "", "max_new_tokens"
        n_total = len(ids)
        first_ms = None
        for _ in range(max_new_tokens):
            logits, past = sess.step(x, np.ones((1, n_total), np.int64), past)
            tok = int(logits[0, -1].argmax())
            first_ms = first_ms if first_ms is not None else (time.perf_counter() - t1) * 1e3
            if self.eos is not None and tok == self.eos:
                stopped = "eos"
                break
            new.append(tok)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
            if n_total + 1 > self.max_positions:
                stopped = "max_positions"
                break
            x, n_total = np.array([[tok]], np.int64), n_total + 1
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        t2 = time.perf_counter()
        ms = {"router": (t_route - t0) * 1e3, "load": (t1 - t_route) * 1e3, "first_token": first_ms or 0.0, "generate": (t2 - t1) * 1e3,
              "total": (t2 - t0) * 1e3, "tokens_per_s": len(new) / max(t2 - t1, 1e-9)}
        return GenerateResult(prompt, text, new, name, c, stopped, ms)
