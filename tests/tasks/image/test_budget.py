"""``build --max-drop``: the accuracy-budget build mode on tiny models, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moqe_compile.errors import BuildError
from moqe_compile.recipe import ControlsConfig, TargetConfig
from moqe_compile.tasks.image.config import ExpertRecipe, RouterConfig

from ...models import CROP, tiny_config, write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TiedConv(torch.nn.Module):
    """One 3x3 convolution whose 4 output channels, averaged over the image, are the logits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tied_onnx(tmp_path_factory) -> Path:
    """A one-layer model whose class filters differ by 1e-5 of their size: every INT8 rounding
    maps them to the same integers, so the quantized model's top-1 no longer follows FP's
    (a budget of 0.01 FP-agreement points cannot be met), and with one layer there is nothing
    to keep in higher precision."""
    from moqe_compile.tasks.image.model import export_torch

    torch.manual_seed(0)
    m = TiedConv().eval()
    with torch.no_grad():
        w = m.conv.weight
        w.copy_(w[:1].repeat(4, 1, 1, 1) * (1 + 1e-5 * torch.randn_like(w)))
        m.conv.bias.zero_()
    out = tmp_path_factory.mktemp("tied")
    export_torch(m, out / "tied.onnx", CROP, 18)
    return out / "tied.onnx"


def budget_config(model: Path, images: Path, max_drop: float, cost: str = "latency", copies: int = 0):
    cfg = tiny_config(model, images)
    cfg.experts = [ExpertRecipe(name="minmax", calibration="minmax"),
                   ExpertRecipe(name="pct", calibration="percentile", percentile=99.9)]
    cfg.controls = ControlsConfig(copies=copies)
    cfg.router = RouterConfig(input_size=8, epochs=1, batch_size=8)
    cfg.gate.force_routing = False
    cfg.target = TargetConfig(max_drop=max_drop, cost=cost, search_minutes=5.0)
    return cfg


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_onnx, tiny_images) -> Path:
    from moqe_compile.build import build

    out = tmp_path_factory.mktemp("budget") / "fits"
    return build(budget_config(tiny_onnx, tiny_images, 50.0, "weight_bits", copies=2), out, quiet=True)


def test_a_budget_that_fits_serves_the_cheapest_candidate_and_writes_the_frontier(fitted):
    m = json.loads((fitted / "manifest.json").read_text())
    f = m["report"]["frontier"]
    doc = json.loads((fitted / "report/frontier.json").read_text())
    assert (fitted / "report/frontier.png").stat().st_size > 0 and (fitted / "report/frontier.md").is_file()
    # weight_bits: the W4A8 ladder comes first, and a 50-point budget is met by its first rung.
    assert doc["candidates"][0]["recipe"]["weight_bits"] == 4 and f["chosen"] == "w4a8-minmax"
    assert f["cost_value"] == 4.0 and doc["chosen"] == f["chosen"]
    # The chosen candidate is one of the bundle's experts, served by the budget rule.
    names = [e["name"] for e in m["experts"]]
    assert f["expert"] in names and m["routing"]["default_expert"] == f["expert"]
    assert m["routing"]["default_rule"]["rule"] == "budget"
    # The test split was evaluated once and the record says whether the budget held there.
    assert set(f["test"]) >= {"drop", "ci95", "held", "point_within"}
    assert f["test"]["held"] == (f["test"]["ci95"][1] <= 50.0)
    # Its recipe is recorded in the manifest's build config.
    assert m["build_config"]["_data"]["target"]["max_drop"] == 50.0


def test_the_copies_control_repeats_the_budget_expert(fitted):
    # The gate's baseline is the budget's expert, so the calibration-noise control copies it
    # (not the menu's strongest or the strongest preset).
    m = json.loads((fitted / "manifest.json").read_text())
    ctl = m["report"]["controls"]
    assert ctl["preset"] == m["report"]["frontier"]["expert"] == "w4a8-minmax" and len(ctl["copies"]) == 2


def test_frontier_flags_exactly_the_candidates_not_faster_than_fp(fitted):
    doc = json.loads((fitted / "report/frontier.json").read_text())
    for c in doc["candidates"]:
        lat = c["cost"]["latency_ms"]
        assert c["slower_than_fp"] == any(lat[b] >= doc["fp_latency_ms"][b] for b in doc["fp_latency_ms"])
    md = (fitted / "report/frontier.md").read_text()
    flagged = [c["name"] for c in doc["candidates"] if c["slower_than_fp"]]
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| candidate"):
            assert ("slower than FP" in line) == (line.split(" | ")[0][2:] in flagged)


def test_inspect_says_which_rule_chose_the_served_expert(fitted, capsys):
    from moqe_compile.cli.main import main

    assert main(["inspect", str(fitted)]) == 0
    out = capsys.readouterr().out
    assert "by rule budget" in out and "accuracy budget frontier:" in out and "w4a8-minmax" in out


def test_a_budget_nothing_meets_fails_cleanly_and_writes_nothing(tmp_path, tied_onnx):
    from moqe_compile.build import build

    labelled = write_images(tmp_path / "labelled")
    images = tmp_path / "images"  # flat, unlabelled: the headline is agreement with FP
    images.mkdir()
    for f in labelled.rglob("*.png"):
        f.rename(images / f.name)
    shutil.rmtree(labelled)
    out = tmp_path / "bundle"
    with pytest.raises(BuildError) as e:
        build(budget_config(tied_onnx, images, 0.01), out, quiet=True)
    msg = str(e.value)
    assert "no candidate meets max_drop = 0.01" in msg and "Closest:" in msg and "larger budget" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no partial bundle, no scratch left


def test_cli_build_takes_max_drop_and_cost(tmp_path, tiny_onnx, tiny_images, capsys):
    from moqe_compile.cli.main import main

    from ...models import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path / "r.toml", tiny_onnx, tiny_images)
    assert main(["build", str(recipe), "--max-drop", "0.5", "--cost", "weight_bits", "--dry-run"]) == 0
    assert "target: max_drop 0.5, cost weight_bits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["build", str(recipe), "--max-drop", "0.5", "--cost", "speed", "--dry-run"])


def test_eval_report_carries_the_budget_section(fitted, tmp_path):
    from moqe_compile.tasks.image.eval import evaluate_bundle

    _, out = evaluate_bundle(fitted, "test", tmp_path / "eval", latency=False)
    md = (out / "report.md").read_text()
    assert "## Accuracy budget" in md and "Test split, evaluated once for w4a8-minmax" in md
