"""Causal-LM data: documents, disjoint document splits, token windows."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from moqe_compile.tasks.causal_lm.data import documents, split_documents, windows  # noqa: E402


def test_documents_and_disjoint_splits():
    assert documents('<doc id="1">a b</doc>\n<doc id="2">c</doc>') == ["a b", "c"]
    assert documents("x<|endoftext|>y") == ["x", "y"]
    assert documents("p1\n\np2 line\nmore") == ["p1", "p2 line\nmore"]
    assert documents("l1\nl2") == ["l1", "l2"]
    docs = [f"doc{i}" for i in range(50)]
    s = split_documents(docs, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
    assert sorted(sum(s.values(), [])) == sorted(docs) and len(set(s["a"]) & set(s["b"])) == 0
    w = windows(lambda t: [len(t)] * 5, 0, ["aa", "bbb"], 4)
    assert w.tolist() == [[2, 2, 2, 2], [2, 0, 3, 3], [3, 3, 3, 0]]  # EOS (0) after each document


def test_read_utf8_names_special_and_oversized_files(tmp_path):
    from moqe_compile.errors import InputError
    from moqe_compile.tasks.causal_lm.data import read_utf8

    p = tmp_path / "t.txt"
    p.write_text("hello world")
    assert read_utf8(p, "--input-file", max_bytes=11) == "hello world"
    with pytest.raises(InputError, match="has 11 bytes; at most 10 are read"):
        read_utf8(p, "--input-file", max_bytes=10)
    with pytest.raises(InputError, match="does not exist"):
        read_utf8(tmp_path / "missing.txt", "--input-file")
    with pytest.raises(InputError, match="not a regular file"):
        read_utf8("/dev/null", "--input-file")
