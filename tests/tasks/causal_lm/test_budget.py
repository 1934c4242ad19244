"""``build --max-drop`` for causal LMs: the weight-only ladder on the tiny Llama."""

from __future__ import annotations

import json

import pytest

from moqe_compile.recipe import TargetConfig

from ...models import make_tiny_lm, tiny_lm_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("lm_budget")
    make_tiny_lm(tmp / "model")
    write_corpus(tmp / "corpus.txt")
    return tmp


def config(tmp, max_drop: float, cost: str = "weight_bits", copies: int = 0):
    cfg = tiny_lm_config(tmp)
    cfg.controls.copies = copies
    cfg.router.epochs = 1
    cfg.target = TargetConfig(max_drop=max_drop, cost=cost, search_minutes=5.0)
    return cfg


def test_lm_budget_that_fits_takes_the_first_rung_of_the_ladder(lm_dir):
    from moqe_compile.build import build

    out = build(config(lm_dir, 1e6, copies=2), lm_dir / "fits", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    f = m["report"]["frontier"]
    # The tiny Llama: 14 body matrices at 4 bits, the 64 x 64 head at 8 (head_bits), + a scale per 128.
    body, head = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), 64 * 64
    assert f["chosen"] == "w4-gptq-g128" and f["unit"] == "percent perplexity"
    assert f["cost_value"] == pytest.approx((4 * body + 8 * head) / (body + head) + 32 / 128, abs=1e-3)
    assert m["routing"]["default_expert"] == f["expert"] and m["routing"]["default_rule"]["rule"] == "budget"
    assert f["expert"] in [e["name"] for e in m["experts"]]
    assert (out / "report/frontier.png").is_file() and f["test"]["held"] == (f["test"]["ci95"][1] <= 1e6)
    # The copies control repeats the gate's baseline, the budget's expert (the menu's first
    # calibration-dependent expert would be w4-awq).
    assert m["report"]["controls"]["of"] == f["expert"] and len(m["report"]["controls"]["copies"]) == 2



def test_lm_search_refines_the_best_4_bit_rung_before_the_8_bit_rung():
    from moqe_compile import target as tg
    from moqe_compile.tasks.causal_lm.budget import Spec, recipe_for, tiers

    ranking = [f"mm{i}" for i in range(14)]
    tried = []

    def evaluate(spec: Spec) -> tg.Candidate:
        # 4-bit rungs miss (g64 the least), each MatMul kept at 8 bits takes 0.2 off the drop (down to 0.3).
        r = recipe_for(spec, ranking)
        tried.append(r.name)
        drop = max(0.3, {128: 2.0, 64: 1.9, 32: 2.1}[spec.block] - 0.2 * spec.k) if spec.preset == "w4-gptq" else 0.0
        assert r.high_precision_nodes == ranking[: spec.k] and r.bits == (4 if spec.preset == "w4-gptq" else 8)
        return tg.Candidate(name=r.name, rung=spec.preset, recipe={}, val={"drop": drop, "ci95": [drop - 0.1, drop + 0.1]},
                            cost={})

    res = tg.search(tiers(14), evaluate, 0.5, 3600)
    # Doubling k = 1, 2, 4, 8 (the first to meet: 1.9 - 1.6 + 0.1 <= 0.5), then bisection 6, 7.
    assert tried == ["w4-gptq-g128", "w4-gptq-g64", "w4-gptq-g32"] + [f"w4-gptq-g64.8bit-{k}" for k in (1, 2, 4, 8, 6, 7)]
    assert [c.name for c in res.candidates if c.meets] == ["w4-gptq-g64.8bit-8"]
    tried.clear()
    tg.search(tiers(14), evaluate, 0.05, 3600)  # no 4-bit candidate meets: every k up to 13, then the 8-bit rung
    assert tried[-1] == "w8-gptq-g128" and tried[3:-1] == [f"w4-gptq-g64.8bit-{k}" for k in (1, 2, 4, 8, 13)]
