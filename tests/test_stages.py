"""The build's cost record (``stages.py``): seconds and peak RSS per stage, in ``report.json``
and in the table ``moqe-compile build`` prints, for both tasks."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from moqe_compile.stages import Stages, format_build_cost


def _build_entry(root):
    return json.loads((root / "report" / "report.json").read_text())["build"]


def _check(root, order):
    b = _build_entry(root)
    names = [s["name"] for s in b["stages"]]
    # The fixtures set no accuracy budget, so the plug-in skips its ``target`` step.
    assert "target" in order
    assert names == [n for n in order if n != "target"]  # every step the plug-in ran, in its order
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in b["stages"])
    assert b["total_seconds"] >= max(s["seconds"] for s in b["stages"])
    assert b["peak_rss_mb"] >= max(s["peak_rss_mb"] for s in b["stages"])
    # The manifest's build_seconds is the same measurement.
    manifest = json.loads((root / "manifest.json").read_text())
    assert {s["name"]: s["seconds"] for s in b["stages"]} == {k: v for k, v in
                                                               manifest["report"]["build_seconds"].items()
                                                               if k != "total"}


def test_image_report_records_every_stage(tiny_bundle):
    from moqe_compile.tasks.image.steps import ImageSteps

    _check(tiny_bundle, ImageSteps.ORDER)


def test_causal_lm_report_records_every_stage(lm_bundle):
    from moqe_compile.tasks.causal_lm.steps import LMSteps

    _check(lm_bundle[0], LMSteps.ORDER)


def test_build_prints_the_cost_table(tiny_bundle):
    from moqe_compile.cli.build import _build_cost

    lines = _build_cost(tiny_bundle).splitlines()
    assert lines[0].split()[:2] == ["stage", "seconds"]
    assert [ln.split()[0] for ln in lines[1:]] == [s["name"] for s in _build_entry(tiny_bundle)["stages"]] + ["total"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-stage peak reset is Linux's")
def test_a_stage_peak_is_its_own():
    """A stage that holds 300 MiB shows it; the stage after it, which holds nothing, does not."""
    st = Stages(quiet=True)
    with st.stage("big"):
        a = np.ones(300 * 2**20 // 8)  # touched, so resident
        del a
    with st.stage("small"):
        pass
    assert st.rss_per_stage
    assert st.peak_rss_mb["big"] - st.peak_rss_mb["small"] > 250
    st.finish()
    rep = st.report()
    assert [s["name"] for s in rep["stages"]] == ["big", "small"] and rep["peak_rss_mb"] >= st.peak_rss_mb["big"]
    assert format_build_cost(rep).splitlines()[-1].split()[0] == "total"
