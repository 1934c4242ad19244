"""``LMRuntime`` on the tiny causal-LM bundle: scores equal the build's, KV-cache generation
equals recomputation, ``submit`` equals ``run`` and ``close`` drains; ``moqe_compile.load``,
``moqe-serve`` and ``moqe-compile inspect`` on the same bundle."""

from __future__ import annotations

import json
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")

from moqe_compile.errors import BundleError, InputError, MoqeError  # noqa: E402

TEXTS = ["the cat sat on the big red house .", "a dog ran near the old tree .", "two birds sang far away .",
         "the quick fish swam under the stone ."]


def test_runtime_score_matches_build_scores(lm_bundle):
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    with LMRuntime.load(lm_bundle[0]) as rt, np.load(rt.bundle.file("report/eval_data.npz")) as z:
        ids = z["test_ids"][0]
        text = rt.tokenizer.decode(ids.tolist())
        assert np.array_equal(rt.encode(text), ids)  # the tokenizer file round-trips the window
        (res,), ms = rt.score([text], expert=rt.expert_names[1])
        lm = np.load(rt.bundle.file("report/loss_matrix.npz"))
        assert res.mean_nll == pytest.approx(float(lm["test_loss"][0, 1]), rel=1e-5)
        assert ms["total"] >= 0
        with pytest.raises(InputError, match="empty"):
            rt.score([""])


def test_generation_with_kv_cache_equals_recompute(lm_bundle):
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    with LMRuntime.load(lm_bundle[0]) as rt:
        streamed = []
        g = rt.generate("the cat sat on", 6, on_text=streamed.append, expert="fp")
        ids = list(rt.encode("the cat sat on"))
        sess = rt.session("fp")
        for tok in g.new_tokens:  # greedy without cache: full recompute each step
            assert int(sess.logits(np.array([ids]))[0, -1].argmax()) == tok
            ids.append(tok)
        assert "".join(streamed) == g.text and len(g.new_tokens) <= 6


def test_load_gives_the_lm_runtime_even_after_its_module_was_imported(lm_bundle):
    # The plug-in's hook is not named after its runtime module: importing the module first
    # (as eval and bench do) must not replace the hook.
    import moqe_compile
    import moqe_compile.tasks.causal_lm.runtime as lm_runtime

    with moqe_compile.load(lm_bundle[0], verify=False) as rt:
        assert isinstance(rt, lm_runtime.LMRuntime)
        (res,), _ = rt.score([TEXTS[0]])
        assert res.expert in rt.expert_names and res.perplexity > 1


def test_submit_equals_run(lm_bundle):
    from moqe_compile.runtime import QueueConfig
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    with LMRuntime.load(lm_bundle[0], queue=QueueConfig(max_batch=8, max_delay_ms=20)) as rt:
        direct = rt.run(TEXTS)
        futures = [rt.submit([t]) for t in TEXTS] + [rt.submit(TEXTS[:2])]
        queued = [f.result(timeout=60) for f in futures]
    for i, r in enumerate(queued[:4]):
        assert len(r) == 1 and r.outputs[0] == direct.outputs[i] and r.experts == [direct.experts[i]]
    assert queued[4].outputs == direct.outputs[:2]
    assert [o.text for o in direct.outputs] == TEXTS and list(direct.experts) == [o.expert for o in direct.outputs]
    with pytest.raises(InputError, match="list of texts"):
        LMRuntime.load(lm_bundle[0]).submit("not a list")


def test_close_drains_queued_and_running_work(lm_bundle):
    from moqe_compile.runtime import QueueConfig
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    rt = LMRuntime.load(lm_bundle[0], queue=QueueConfig(max_batch=1, max_delay_ms=0))
    started, release = threading.Event(), threading.Event()

    def hold(_text: str) -> None:
        started.set()
        release.wait(30)

    generation = {}
    worker = threading.Thread(target=lambda: generation.update(g=rt.generate("the cat", 3, on_text=hold,
                                                                             expert="fp")))
    worker.start()
    assert started.wait(60)
    futures = [rt.submit([t]) for t in TEXTS]
    closer = threading.Thread(target=rt.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # the generation is still running: close waits for it
    release.set()
    closer.join(60)
    worker.join(60)
    assert not closer.is_alive() and generation["g"].new_tokens
    assert [f.result(timeout=0).outputs[0].text for f in futures] == TEXTS  # every queued request answered
    with pytest.raises(MoqeError, match="closed"):
        rt.run(TEXTS)


def test_inspect_reads_the_old_single_expert_gate(lm_bundle):
    from moqe_compile.bundle import read_bundle
    from moqe_compile.tasks.causal_lm.inspect import render

    b = read_bundle(lm_bundle[0])
    m = json.loads(json.dumps(b.manifest))
    m["router"]["gate"]["decision"] = "single-expert"
    text = render(SimpleNamespace(root=b.root, manifest=m))
    assert "gate        single:" in text and "single-expert" not in text.split("gate", 1)[1].split("\n")[0]


def test_serve_refuses_a_causal_lm_bundle(lm_bundle, capsys):
    from moqe_compile.cli.serve import main as serve_main

    assert serve_main([str(lm_bundle[0]), "--port", "0"]) == BundleError.exit_code
    err = capsys.readouterr().err
    assert "moqe-serve: error:" in err and "'causal-lm' bundle" in err and "Traceback" not in err


def test_serve_refuses_a_causal_lm_bundle_on_ray_too(lm_bundle):
    from moqe_compile.serving.server import open_runtime

    with pytest.raises(BundleError, match="causal-lm"):
        open_runtime(lm_bundle[0], route_only=True)


def test_a_task_this_release_does_not_know_is_a_bundle_error(lm_bundle, tmp_path):
    import moqe_compile

    bad = tmp_path / "b"
    shutil.copytree(lm_bundle[0], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["task"]["kind"] = "speech"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="'speech' is not one of"):
        moqe_compile.load(bad)


def test_a_text_no_model_window_can_hold_is_refused_before_tokenizing(lm_bundle):
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    rt = LMRuntime.load(lm_bundle[0])
    assert rt.max_chars is None  # the tiny model's word-level tokenizer has an unknown token: no bound
    rt.max_chars = 100  # as a byte-level BPE tokenizer's bound would be (the test below)

    class NoTokenizing:
        def encode(self, *a, **k):
            raise AssertionError("tokenized a text that cannot fit")

    rt.tokenizer = NoTokenizing()
    with pytest.raises(InputError, match=f"characters; the model takes at most {rt.max_positions} tokens"):
        rt.encode("a" * (rt.max_chars + 1))
    rt.close()


def test_no_character_bound_where_a_token_may_stand_for_more_than_it_spells():
    from tokenizers import Tokenizer, models, normalizers

    from moqe_compile.tasks.causal_lm.runtime import max_chars

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_chars(wordpiece, 8) is None
    bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    assert max_chars(bpe, 8) == 16
    bpe.normalizer = normalizers.Strip()
    assert max_chars(bpe, 8) is None
