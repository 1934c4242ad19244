"""The LM runtime's FP decoder against transformers' own forward and ``generate`` on the tiny
Llama the bundle was exported from: the same logits, the same per-token loss and, with the KV
cache, the same greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

PROMPTS = ["cat dog cat", "red blue red blue", "the cat sat on", "big small", "one two one"]

# The ONNX export computes the same float32 ops as torch, some fused or reordered: logits of
# magnitude ~10 then differ by ~1e-5. 1e-3 absolute stays two orders below the gap between a
# greedy winner and the runner-up that the token checks need (asserted below).
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def hf(lm_bundle):
    from transformers import AutoModelForCausalLM

    _, tmp = lm_bundle
    return AutoModelForCausalLM.from_pretrained(str(tmp / "model")).eval()


@pytest.fixture(scope="module")
def rt(lm_bundle):
    from moqe_compile.tasks.causal_lm.runtime import LMRuntime

    with LMRuntime.load(lm_bundle[0]) as r:
        yield r


def test_fp_logits_and_scores_equal_transformers(rt, hf):
    for text in PROMPTS + ["the quick fish swam under the stone ."]:
        ids = rt.encode(text)
        with torch.no_grad():
            out = hf(input_ids=torch.from_numpy(ids[None]), labels=torch.from_numpy(ids[None]))
        np.testing.assert_allclose(rt.session("fp").logits(ids[None])[0], out.logits[0].numpy(), atol=LOGIT_ATOL)
        (res,), _ = rt.score([text], expert="fp")
        # transformers' loss: the mean NLL of tokens 2..n given their prefixes, as the runtime's;
        # a 1e-3 logit error moves a log-softmax by at most 2e-3.
        assert res.mean_nll == pytest.approx(float(out.loss), abs=2e-3)
        assert res.tokens == len(ids)


def test_greedy_generation_with_kv_cache_equals_transformers_generate(rt, hf):
    continuations = []
    for prompt in PROMPTS:
        ids = rt.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.from_numpy(ids[None]), max_new_tokens=6, do_sample=False,
                              eos_token_id=rt.eos, pad_token_id=rt.eos)
        want = ref[0, len(ids):].tolist()
        with torch.no_grad():  # the check is meaningful only if no step is a near tie
            logits = hf(ref[:, :-1]).logits[0, len(ids) - 1:]
        top2 = torch.topk(logits, 2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 10 * LOGIT_ATOL
        got = rt.generate(prompt, 6, expert="fp")
        assert got.new_tokens == want, prompt
        continuations.append(tuple(want))
    # The tiny LM continues each prompt its own way, with more than one word per continuation.
    assert len(set(continuations)) == len(PROMPTS) and all(len(set(c)) > 1 for c in continuations)
