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


def config(tmp, max_drop: float, cost: str = "weight_bits"):
    cfg = tiny_lm_config(tmp)
    cfg.controls.copies = 0
    cfg.router.epochs = 1
    cfg.target = TargetConfig(max_drop=max_drop, cost=cost, search_minutes=5.0)
    return cfg


def test_lm_budget_that_fits_takes_the_first_rung_of_the_ladder(lm_dir):
    from moqe_compile.build import build

    out = build(config(lm_dir, 1e6), lm_dir / "fits", quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    f = m["report"]["frontier"]
    # The tiny Llama: 14 body matrices at 4 bits, the 64 x 64 head at 8 (head_bits), + a scale per 128.
    body, head = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), 64 * 64
    assert f["chosen"] == "w4-gptq-g128" and f["unit"] == "percent perplexity"
    assert f["cost_value"] == pytest.approx((4 * body + 8 * head) / (body + head) + 32 / 128, abs=1e-3)
    assert m["routing"]["default_expert"] == f["expert"] and m["routing"]["default_rule"]["rule"] == "budget"
    assert f["expert"] in [e["name"] for e in m["experts"]]
    assert (out / "report/frontier.png").is_file() and f["test"]["held"] == (f["test"]["ci95"][1] <= 1e6)
