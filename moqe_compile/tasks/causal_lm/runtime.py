"""LMRuntime: serve a ``causal-lm`` bundle on ONNX Runtime CPU (numpy, onnxruntime, tokenizers; no torch).

One expert serves a whole request (per-sequence routing): the router reads the FP embeddings
of the first ``prefix_tokens`` tokens of the text (for generation: of the prompt), then the
chosen expert scores the sequence or generates from it with its KV cache. When the bundle's
significance gate refused routing, the router is not run and the default expert serves.
Texts of one call are grouped per expert with runtime/dispatch.py, as the image runtime does.
Expert sessions are created on first use (each holds a full decoder).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moqe_compile.bundle import read_bundle
from moqe_compile.errors import BundleError, InputError
from moqe_compile.tasks.causal_lm.score import DecoderSession, token_nll
from moqe_compile.runtime.dispatch import group_by_expert

TASK = "causal-lm"


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


class LMRuntime:
    def __init__(self, bundle, threads: int = 0):
        m = bundle.manifest
        if m.get("task", {}).get("kind") != TASK:
            raise BundleError(f"bundle {str(bundle.root)!r} is a {m.get('task', {}).get('kind')!r} bundle, "
                              f"not {TASK!r}: use Runtime for it.")
        from tokenizers import Tokenizer

        self.bundle, self.manifest, self.threads = bundle, m, threads
        self.tokenizer = Tokenizer.from_file(str(bundle.file(m["task"]["tokenizer"]["path"])))
        d = m["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = d["layers"], d["kv_heads"], d["head_dim"]
        self.max_positions = d["max_positions"]
        self.eos = m["task"]["eos_token_id"]
        self.expert_names = [e["name"] for e in m["experts"]]
        self._rel = {e["name"]: e["variants"]["onnxruntime-cpu"]["path"] for e in m["experts"]}
        self._rel["fp"] = m["model"]["fp"]["path"]
        self._paths = {k: bundle.file(v) for k, v in self._rel.items()}
        from moqe_compile.bundle.shared_weights import SharedTensors

        self._shared = SharedTensors(bundle)  # the embedding table, once for every session
        r = m["routing"]
        self.routing_enabled = bool(r["enabled"])
        self.default_expert = self.expert_names.index(r["default_expert"])
        self.prefix_tokens = m["router"]["prefix_tokens"]
        self._router = None
        self._sessions: dict[str, DecoderSession] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, threads: int = 0) -> "LMRuntime":
        return cls(read_bundle(path, verify=verify), threads)

    def __enter__(self) -> "LMRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sessions.clear()
        self._router = None

    # -------------------------------------------------------------- pieces
    def session(self, name: str) -> DecoderSession:
        """The decoder of expert ``name`` (or ``"fp"``), created once."""
        with self._lock:
            if name not in self._sessions:
                if name not in self._paths:
                    raise InputError(f"unknown expert {name!r}; this bundle has {self.expert_names}.")
                add = (lambda so, rel=self._rel[name]: self._shared.add_to(so, rel))  # noqa: E731
                self._sessions[name] = DecoderSession(name, self._paths[name], self.layers, self.kv_heads,
                                                      self.head_dim, self.threads, add_shared=add)
            return self._sessions[name]

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise InputError("the input text is empty.")
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        if len(ids) > self.max_positions:
            raise InputError(f"the text has {len(ids)} tokens; the model takes at most {self.max_positions}.")
        return ids

    def route(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, list[float | None]]:
        """(expert index per sequence, router confidence or None where the router did not run)."""
        if not self.routing_enabled:
            return np.full(len(seqs), self.default_expert), [None] * len(seqs)
        if self._router is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.intra_op_num_threads = 1  # a few dozen tokens: threads cost more than they save
            self._shared.add_to(so, self.manifest["router"]["path"])
            self._router = ort.InferenceSession(str(self.bundle.file(self.manifest["router"]["path"])), so,
                                                providers=["CPUExecutionProvider"])
        idx, conf = np.zeros(len(seqs), np.int64), []
        for i, s in enumerate(seqs):  # prefixes differ in length for short texts: one at a time
            pre = s[None, : self.prefix_tokens]
            p = self._router.run(None, {"input_ids": pre, "attention_mask": np.ones_like(pre)})[0][0]
            idx[i], _ = int(p.argmax()), conf.append(float(p.max()))
        return idx, conf

    # -------------------------------------------------------------- requests
    def score(self, texts: list[str], expert: str | None = None) -> tuple[list[ScoreResult], dict]:
        """Perplexity of each text under its routed expert (or ``expert``: a name or ``"fp"``)."""
        t0 = time.perf_counter()
        seqs = [self.encode(t) for t in texts]
        for t, s in zip(texts, seqs):
            if len(s) < 2:
                raise InputError(f"text {t[:40]!r} has {len(s)} token(s); perplexity needs at least 2.")
        if expert is None:
            idx, conf = self.route(seqs)
        else:
            self.session(expert)
            idx, conf = np.full(len(seqs), -1), [None] * len(seqs)
        t1 = time.perf_counter()
        out: list[ScoreResult | None] = [None] * len(seqs)
        for k, members in group_by_expert(idx):
            name = expert if k < 0 else self.expert_names[k]
            sess = self.session(name)
            for i in members:  # one sequence per run: see score_lm.py
                nll = float(token_nll(sess.logits(seqs[i][None]), seqs[i][None]).mean())
                out[i] = ScoreResult(texts[i], len(seqs[i]), nll, float(np.exp(nll)), name, conf[i])
        t2 = time.perf_counter()
        return out, {"router": (t1 - t0) * 1e3, "experts": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}

    def generate(self, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 expert: str | None = None) -> GenerateResult:
        """Greedy decoding with the chosen expert's KV cache; ``on_text`` receives text as it appears."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens = {max_new_tokens} must be >= 1.")
        t0 = time.perf_counter()
        ids = self.encode(prompt)
        if expert is None:
            idx, conf = self.route([ids])
            name, c = self.expert_names[int(idx[0])], conf[0]
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
