"""``moqe-compile eval`` end to end on the tiny bundle, and the build's own report."""

import json
import shutil

import numpy as np
import pytest

from moqe_compile.bundle import read_bundle
from moqe_compile.cli import main as compile_cli
from moqe_compile.errors import ConfigError
from moqe_compile.tasks.image.eval import load_eval_data

KEYS = {"fp", "experts", "best_expert", "oracle", "moqe", "moqe_vs_best", "moqe_vs_best_loss",
        "router_accuracy_vs_oracle", "usage", "oracle_usage", "n", "metric", "latency", "runtime_check"}
FILES = {"report.json", "report.md", "metric.png", "usage.png"}


def _eval(capsys, argv):
    code = compile_cli.main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_build_report_has_cis_and_eval_data(tiny_bundle):
    b = read_bundle(tiny_bundle)
    m = b.manifest
    assert m["report"]["eval_data"]["path"] == "report/eval_data.npz" and "report/eval_data.npz" in m["files"]
    rep = json.loads((tiny_bundle / "report" / "report.json").read_text())
    for s in ("router_val", "test"):
        r = rep["splits"][s]
        assert r["n"] == m["splits"][s]["samples"]
        assert r["best_expert"]["name"] == m["routing"]["default_expert"] and r["best_expert"]["chosen_on"] == "val"
        assert set(r["moqe_vs_best"]) >= {"diff", "ci95", "p_value", "test", "headroom_captured"}
        for name in (e["name"] for e in m["experts"]):
            assert set(r["experts"][name]["top1"]) == {"value", "ci95"}
        x, y, g = load_eval_data(tiny_bundle / "report" / "eval_data.npz", s)
        assert x.dtype == np.float32 and x.shape == (r["n"], 3, 32, 32) and len(y) == r["n"]
        # 4 augmented views (original + 3) per source image: resampled by source, tested without McNemar.
        assert len(g) == r["n"] and len(set(g)) == r["n"] // 4
        assert r["bootstrap"]["unit"] == "source" and r["bootstrap"]["clusters"] == r["n"] // 4
        assert r["moqe_vs_best"]["test"] == "paired-bootstrap" and "mcnemar_iid_p_value" in r["moqe_vs_best"]
    # The manifest keeps plain numbers for inspect.
    assert isinstance(m["experts"][0]["metrics"]["test"]["top1"], float)


def test_eval_test_split_json(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, _ = _eval(capsys, [str(tiny_bundle), "--out", str(out), "--json", "--repeats", "2",
                                     "--batches", "1", "4", "--resamples", "500"])
    assert code == 0
    r = json.loads(stdout)
    assert KEYS <= set(r)
    assert FILES <= {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text())["moqe_vs_best"] == r["moqe_vs_best"]
    assert set(r["latency"]["batches"]) == {"1", "4"}
    assert {"router", "fp32", "moqe", "expert:minmax"} <= set(r["latency"]["batches"]["4"])
    assert r["runtime_check"]["max_abs_logit_diff"] < 1e-4
    # Re-scoring the stored test split reproduces the build's numbers for every expert and FP.
    build = json.loads((tiny_bundle / "report" / "report.json").read_text())["splits"]["test"]
    assert r["n"] == build["n"] and r["best_expert"]["name"] == build["best_expert"]["name"]
    for name, e in build["experts"].items():
        for metric in ("top1", "kl_to_fp", "fp_top1_agreement"):
            assert r["experts"][name][metric]["value"] == pytest.approx(e[metric]["value"], abs=1e-6)
    read_bundle(tiny_bundle)  # still verifies: nothing was written into the bundle


def test_eval_markdown_default_out_and_user_data(tiny_bundle, tiny_images, tmp_path, capsys):
    bundle = tmp_path / "copy"
    shutil.copytree(tiny_bundle, bundle)
    code, stdout, _ = _eval(capsys, [str(bundle), "--no-latency", "--data", "router_val", "--resamples", "200"])
    assert code == 0 and "| **MoQE** (router + 1 expert) |" in stdout and "paired cluster-bootstrap p" in stdout
    assert "optimistic" in stdout  # router_val chose the best expert: the report says so
    assert FILES <= {p.name for p in (tmp_path / "copy-eval").iterdir()}

    code, stdout, _ = _eval(capsys, [str(bundle), "--no-latency", "--json", "--data", str(tiny_images),
                                     "--out", str(tmp_path / "imgs"), "--resamples", "200"])
    r = json.loads(stdout)
    assert code == 0 and r["n"] == 16 and r["labels"] and r["metric"] == "top1" and r["latency"] is None
    assert r["moqe_vs_best"]["test"] == "mcnemar" and r["bootstrap"]["unit"] == "sample"  # independent images

    x, _, _ = load_eval_data(bundle / "report" / "eval_data.npz", "test")
    np.savez(tmp_path / "d.npz", x=x[:5])
    code, stdout, _ = _eval(capsys, [str(bundle), "--no-latency", "--json", "--data", str(tmp_path / "d.npz"),
                                     "--out", str(tmp_path / "npz"), "--resamples", "200"])
    r = json.loads(stdout)
    assert code == 0 and r["n"] == 5 and not r["labels"] and r["metric"] == "fp_top1_agreement"


def test_eval_refuses_out_inside_bundle_and_bad_data(tiny_bundle, tmp_path, capsys):
    code, _, err = _eval(capsys, [str(tiny_bundle), "--no-latency", "--out", str(tiny_bundle / "report" / "eval")])
    assert code == 3 and "inside the bundle" in err
    assert not (tiny_bundle / "report" / "eval").exists()
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 7, 7), np.float32))
    code, _, err = _eval(capsys, [str(tiny_bundle), "--no-latency", "--data", str(tmp_path / "bad.npz"),
                                  "--out", str(tmp_path / "o")])
    assert code == 3 and "(2, 3, 7, 7)" in err


def test_eval_bundle_without_eval_data(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    del m["report"]["eval_data"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    code, _, err = _eval(capsys, [str(bundle), "--no-latency", "--out", str(tmp_path / "o")])
    assert code == 4 and "no report.eval_data" in err and "--data PATH" in err


def test_eval_refuses_a_corrupt_npz_naming_it(tiny_bundle, tmp_path, capsys):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04garbage")  # a zip header and nothing a zip reader can use
    code, _, err = _eval(capsys, [str(tiny_bundle), "--no-latency", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 3 and f"--data {str(bad)!r} is not a readable plain .npz file" in err and "numpy.savez" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("sizes", [["0"], ["1", "-1"]])
def test_eval_refuses_non_positive_batch_sizes_up_front(tiny_bundle, tmp_path, capsys, monkeypatch, sizes):
    from moqe_compile import Runtime

    monkeypatch.setattr(Runtime, "load", lambda *a, **k: pytest.fail("the bundle was loaded"))
    code, _, err = _eval(capsys, [str(tiny_bundle), "--out", str(tmp_path / "o"), "--batches", *sizes])
    assert code == ConfigError.exit_code and f"batch size {sizes[-1]} must be >= 1" in err


@pytest.mark.parametrize("out, match", [("file", "exists and is not a directory"),
                                        ("/proc/moqe-eval", "cannot be created or written")])
def test_eval_checks_its_output_folder_before_scoring(tiny_bundle, tmp_path, capsys, monkeypatch, out, match):
    from moqe_compile.tasks.image import eval as image_eval

    monkeypatch.setattr(image_eval, "_batched", lambda *a, **k: pytest.fail("scored before checking --out"))
    if out == "file":
        out = tmp_path / "file"
        out.write_text("keep")
    code, _, err = _eval(capsys, [str(tiny_bundle), "--no-latency", "--out", str(out)])
    assert code == 3 and f"--out {str(out)!r} {match}" in err


def test_eval_refuses_out_inside_a_bundle_named_by_a_relative_path(tiny_bundle, capsys, monkeypatch):
    monkeypatch.chdir(tiny_bundle.parent)
    code, _, err = _eval(capsys, [tiny_bundle.name, "--no-latency", "--out", f"{tiny_bundle.name}/report/eval"])
    assert code == 3 and "inside the bundle" in err
    assert not (tiny_bundle / "report" / "eval").exists()


def test_a_failed_eval_leaves_no_report_folder_behind(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "new" / "reports"
    code, _, err = _eval(capsys, [str(tiny_bundle), "--no-latency", "--data", str(tmp_path / "missing.npz"),
                                  "--out", str(out)])
    assert code == 3 and not (tmp_path / "new").exists()
