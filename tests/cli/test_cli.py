import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moqe_compile import errors
from moqe_compile.cli import main as compile_cli
from moqe_compile.cli import run as run_cli
from moqe_compile.cli.common import BROKEN_PIPE, CHECK_FAILED, INTERRUPTED, TERMINATED, USAGE
from moqe_compile.errors import ConfigError

from ..models import write_tiny_recipe


def _run(capsys, argv):
    code = run_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_json_on_image_dir_and_npy(tiny_bundle, tiny_images, tmp_path, capsys):
    img = sorted((tiny_images / "0").iterdir())[0]
    code, out, _ = _run(capsys, [str(tiny_bundle), "--input", str(img), "--json"])
    assert code == 0
    d = json.loads(out)
    assert set(d) == {"predictions", "timing_ms"} and set(d["timing_ms"]) == {"router", "experts", "total"}
    p = d["predictions"][0]
    assert p["input"] == str(img) and p["expert"] in {"minmax", "pct", "entropy"}
    assert 0 < p["router_confidence"] <= 1
    assert len(p["topk"]) == 4 and p["topk"][0]["label"].startswith("class_")  # 4 classes < 5
    probs = [t["prob"] for t in p["topk"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4

    code, out, _ = _run(capsys, [str(tiny_bundle), "--input", str(tiny_images / "1"), "--json"])
    assert code == 0 and len(json.loads(out)["predictions"]) == 4

    raw = np.random.default_rng(0).integers(0, 255, (3, 50, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    code, out, _ = _run(capsys, [str(tiny_bundle), "--input", str(tmp_path / "raw.npy"), "--json"])
    names = [p["input"] for p in json.loads(out)["predictions"]]
    assert code == 0 and names == [f"{tmp_path / 'raw.npy'}[{i}]" for i in range(3)]


def test_npy_preprocessed_matches_image(tiny_bundle, tiny_images, tmp_path, capsys):
    from moqe_compile import Runtime

    img = sorted((tiny_images / "2").iterdir())[0]
    with Runtime.load(tiny_bundle) as rt:
        _, x = rt.load_inputs(img)
    np.save(tmp_path / "x.npy", x)
    _, a, _ = _run(capsys, [str(tiny_bundle), "--input", str(img), "--json"])
    _, b, _ = _run(capsys, [str(tiny_bundle), "--input", str(tmp_path / "x.npy"), "--json"])
    pa, pb = json.loads(a)["predictions"][0], json.loads(b)["predictions"][0]
    assert pa["expert"] == pb["expert"] and pa["topk"] == pb["topk"]


def test_json_schema_does_not_depend_on_top(tiny_bundle, tiny_images, capsys):
    img = sorted((tiny_images / "0").iterdir())[0]
    shapes = []
    for top in (1, 3):
        code, out, _ = _run(capsys, [str(tiny_bundle), "--input", str(img), "--json", "--top", str(top)])
        p = json.loads(out)["predictions"][0]
        assert code == 0 and len(p["topk"]) == top
        shapes.append((set(p), {k for t in p["topk"] for k in t}))
    assert shapes[0] == shapes[1] == ({"input", "expert", "router_confidence", "topk"}, {"label", "prob"})


def test_lm_options_on_an_image_bundle_are_refused(tiny_bundle, tiny_images, capsys):
    img = sorted((tiny_images / "0").iterdir())[0]
    code, out, err = _run(capsys, [str(tiny_bundle), "--input", str(img), "--score"])
    assert code == 3 and out == "" and "--score" in err and "image-classification" in err


def test_text_output(tiny_bundle, tiny_images, capsys):
    img = sorted((tiny_images / "3").iterdir())[0]
    code, out, _ = _run(capsys, [str(tiny_bundle), "--input", str(img)])
    assert code == 0 and "router confidence" in out and "class_" in out


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_text("not an image"), "is not a readable image"),
    (lambda p: np.save(p, np.zeros((2, 3, 7, 7), np.float32)), r"shape \(2, 3, 7, 7\) and dtype float32"),
    (lambda p: p.mkdir(), "holds no images"),
])
def test_bad_inputs_exit_nonzero(tiny_bundle, tmp_path, capsys, make, match):
    suffix = ".npy" if "shape" in match else (".jpg" if "readable" in match else "")
    p = tmp_path / f"bad{suffix}"
    make(p)
    code, out, err = _run(capsys, [str(tiny_bundle), "--input", str(p)])
    assert code == 3 and out == ""
    assert "moqe-run: error:" in err and str(p) in err
    import re
    assert re.search(match, err)


def test_missing_bundle_exit_code(tmp_path, capsys):
    code, _, err = _run(capsys, [str(tmp_path), "--input", "x.jpg"])
    assert code == 4 and "not a moqe bundle" in err


def test_inspect(tiny_bundle, capsys):
    assert compile_cli.main(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    for s in ("schema      v1", "minmax", "calibration=percentile p=99.9", "QLinearConv", "router/router.onnx",
              "fp_top1_agreement", "default/best-on-val expert", "se-resnet8 (default) input 8px", "no attention"):
        assert s in out, s


def test_build_bad_recipe_key(tmp_path, capsys):
    p = tmp_path / "r.toml"
    p.write_text("[router]\nlayers = 3\n")
    assert compile_cli.main(["build", str(p), "-o", str(tmp_path / "o")]) == ConfigError.exit_code
    assert "unknown key(s) ['layers']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_scripts_installed():
    from ..runtime.test_tamper import _env, console_script

    for name, needle in (("moqe-compile", "build"), ("moqe-serve", "--port"), ("moqe-run", "--input")):
        res = subprocess.run([console_script(name), "--help"], capture_output=True, text=True, env=_env())
        assert res.returncode == 0 and needle in res.stdout, name
    out = subprocess.run([console_script("moqe-run"), "--help"], capture_output=True, text=True, env=_env())
    # one moqe-run for both tasks: the causal-LM options and the --json schema are in its help
    for s in ("causal-LM bundles", "--max-new-tokens", "--input-file", '"topk"'):
        assert s in out.stdout, s


def test_input_limit_options_in_help_match_the_defaults():
    from dataclasses import fields

    from moqe_compile.tasks.image.preprocess import DEFAULT_LIMITS

    text = " ".join(run_cli.parser().format_help().split())  # however the help wraps
    for f in fields(DEFAULT_LIMITS):
        flag, default = f"--{f.name.replace('_', '-')}", getattr(DEFAULT_LIMITS, f.name)
        assert flag in text and f"(default {int(default)}" in text and default == int(default), flag


def test_input_limit_options(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("RGB", (30, 1)).save(thin)
    code, out, err = _run(capsys, [str(tiny_bundle), "--input", str(thin), "--json"])
    assert code == 3 and "max_aspect_ratio=20" in err
    code, out, err = _run(capsys, [str(tiny_bundle), "--input", str(thin), "--json", "--max-aspect-ratio", "30"])
    assert code == 0 and len(json.loads(out)["predictions"]) == 1
    code, out, err = _run(capsys, [str(tiny_bundle), "--input", str(thin), "--max-image-pixels", "29"])
    assert code == 3 and "max_image_pixels=29" in err
    with pytest.raises(SystemExit) as e:
        run_cli.main([str(tiny_bundle), "--input", str(thin), "--max-images", "0"])
    assert e.value.code == 2 and "--max-images: '0' must be > 0" in capsys.readouterr().err


def test_check_qdq_cli(tiny_bundle, capsys):
    cpu = tiny_bundle / "experts" / "minmax" / "onnxruntime-cpu.onnx"
    assert compile_cli.main(["check-qdq", str(cpu), "--target", "onnxruntime-cpu"]) == 0
    assert "OK for onnxruntime-cpu" in capsys.readouterr().out
    # A U8S8 graph breaks TensorRT's rules: FAIL's own exit code, offending nodes named.
    assert compile_cli.main(["check-qdq", str(cpu), "--target", "tensorrt", "--json"]) == CHECK_FAILED
    res = json.loads(capsys.readouterr().out)
    assert not res["ok"] and any(v.startswith("node '") for v in res["violations"])
    assert compile_cli.main(["check-qdq", str(cpu), "--target", "tpu"]) == ConfigError.exit_code
    assert "--target 'tpu' is not one of" in capsys.readouterr().err


def _qdq_input(d: Path, kind: str) -> str:
    if kind in ("empty", "garbage"):
        (d / f"{kind}.onnx").write_bytes(b"" if kind == "empty" else b"garbage")
    named = {"devnull": "/dev/null", "directory": str(d), "missing": str(d / "missing.onnx")}
    return named.get(kind, str(d / f"{kind}.onnx"))


@pytest.mark.parametrize("kind, match", [("devnull", "is not a regular file"), ("empty", "is empty"),
                                         ("directory", "is not a regular file"), ("missing", "does not exist"),
                                         ("garbage", "is not a readable ONNX model")])
@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cpu"])
def test_check_qdq_cli_names_what_is_wrong_with_the_file(tmp_path, capsys, kind, match, target):
    path = _qdq_input(tmp_path, kind)
    assert compile_cli.main(["check-qdq", path, "--target", target]) == errors.InputError.exit_code
    err = capsys.readouterr().err
    assert f"model {path!r} {match}" in err and "Traceback" not in err


def test_sensitivity_cli(tiny_onnx, tiny_images, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    write_tiny_recipe(recipe, tiny_onnx, tiny_images)
    assert compile_cli.main(["sensitivity", str(recipe), "--json", "--samples", "16"]) == 0
    ranking = json.loads(capsys.readouterr().out)
    assert len(ranking) == 4 and {r["op"] for r in ranking} == {"Conv", "Gemm"}
    kls = [r["kl_to_fp"] for r in ranking]
    assert kls == sorted(kls, reverse=True)


def test_sensitivity_takes_shipped_recipe_names(capsys):
    assert compile_cli.main(["sensitivity", "no-such-recipe"]) == ConfigError.exit_code
    assert "the shipped recipes are: " in capsys.readouterr().err


def test_build_backend_tensorrt_without_tensorrt(tiny_onnx, tiny_images, tmp_path, capsys, monkeypatch):
    """No TensorRT here: the ONNX bundle (with every expert's S8S8 graph) is still written and
    verified, and the command exits with BackendError's code naming what to run on a GPU."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: this checks the machine without it")
    import moqe_compile.tasks.image.config as config
    from moqe_compile.bundle import read_bundle
    from moqe_compile.errors import BackendError

    from ..models import tiny_config

    monkeypatch.setattr(config, "load_recipe", lambda p: tiny_config(tiny_onnx, tiny_images))
    out = tmp_path / "b"
    recipe = tmp_path / "r.toml"
    recipe.write_text("")  # replaced by the monkeypatched loader
    code = compile_cli.main(["build", str(recipe), "-o", str(out), "-q", "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert code == BackendError.exit_code and "TensorRT" in err and f"moqe-compile engines {out}" in err
    m = read_bundle(out, verify=True).manifest
    assert all({"onnxruntime-cpu", "tensorrt"} <= set(e["variants"]) for e in m["experts"])
    assert compile_cli.main(["engines", str(out)]) == BackendError.exit_code


def test_exit_codes_are_distinct_and_documented():
    """Every error class (subclasses share their base's code) and every plain code has its
    own number, and docs/cli.md lists exactly these."""
    bases = [c for c in map(errors.__dict__.get, errors.__all__)
             if c is errors.MoqeError or c.__bases__ == (errors.MoqeError,)]
    codes = {c.exit_code: c.__name__ for c in bases}
    assert len(codes) == len(bases)
    plain = {0: "", USAGE: "", CHECK_FAILED: "", INTERRUPTED: "", BROKEN_PIPE: "", TERMINATED: ""}
    assert not set(codes) & set(plain) and len(plain) == 6
    rows = re.findall(r"^\| (\d+) \|[^|]*\|\s*`?(\w*)`?\s*\|$", (Path(__file__).parents[2] / "docs/cli.md").read_text(),
                      re.M)
    assert {int(code): name for code, name in rows} == {**codes, **plain}


def test_usage_and_config_errors_exit_differently(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compile_cli.main(["build", "--no-such-option"])
    assert e.value.code == USAGE
    p = tmp_path / "r.toml"
    p.write_text("[router]\nlayers = 3\n")
    assert compile_cli.main(["build", str(p), "-o", str(tmp_path / "o")]) == ConfigError.exit_code != USAGE


def test_a_closed_stdout_pipe_is_a_quiet_exit_not_a_traceback():
    import subprocess
    import sys

    cmd = f"{sys.executable} -m moqe_compile.cli.main recipes | head -c 1"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr


@pytest.mark.parametrize("manifest", ['{"task": {"kind": []}}', "[" * 100_000 + "]" * 100_000, b"\xff\xfe{"])
def test_eval_on_a_malformed_manifest_is_one_line_and_exit_4(tmp_path, capsys, manifest):
    (tmp_path / "manifest.json").write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
    assert compile_cli.main(["eval", str(tmp_path), "--no-latency"]) == errors.BundleError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("moqe-compile: error:") and "Traceback" not in err


def test_lm_bundles_are_refused_by_the_image_only_commands(lm_bundle, tmp_path, capsys):
    bundle, _ = lm_bundle
    assert compile_cli.main(["export-triton", str(bundle), "-o", str(tmp_path / "repo")]) == errors.BundleError.exit_code
    assert "causal-lm" in capsys.readouterr().err and not (tmp_path / "repo").exists()
    assert compile_cli.main(["engines", str(bundle)]) == errors.BundleError.exit_code
    assert "no engines to build" in capsys.readouterr().err


def test_sensitivity_refuses_a_language_model_recipe(capsys):
    assert compile_cli.main(["sensitivity", "smollm2-135m"]) == ConfigError.exit_code
    assert "image-classification models" in capsys.readouterr().err


def test_moqe_serve_refuses_options_ray_would_ignore(tiny_bundle, capsys):
    from moqe_compile.cli import serve as serve_cli

    assert serve_cli.main([str(tiny_bundle), "--ray", "--only-expert", "minmax", "--workers", "4"]) == \
        ConfigError.exit_code
    err = capsys.readouterr().err
    assert "--only-expert, --workers do(es) not apply with --ray" in err


def test_build_logging_shows_moqe_messages_only(monkeypatch):
    import logging

    from moqe_compile.cli.main import _logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    _logging(type("Args", (), {"verbose": False, "quiet": False})())
    assert logging.getLogger("moqe_compile.build").isEnabledFor(logging.INFO)
    assert not logging.getLogger("onnxscript").isEnabledFor(logging.INFO)  # other libraries stay quiet


def test_input_file_that_is_a_directory_is_named(lm_bundle, tmp_path, capsys):
    bundle, _ = lm_bundle
    assert run_cli.main([str(bundle), "--input-file", str(tmp_path), "--score"]) == errors.InputError.exit_code
    assert "is a directory" in capsys.readouterr().err


def test_a_terminated_build_removes_its_temporary_folders(tiny_onnx, tiny_images, tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, docker stop, a cancelled CI job) mid-build: exit 143, and nothing beside
    the output path: no bundle, no .partial or .work folder for a later build to clean up."""
    import os
    import signal

    import moqe_compile.tasks.image.steps as steps

    before = signal.getsignal(signal.SIGTERM)
    recipe = write_tiny_recipe(tmp_path / "r.toml", tiny_onnx, tiny_images)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(steps, "train_router", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    assert compile_cli.main(["build", str(recipe), "-o", str(out_dir / "b"), "-q"]) == 143
    assert "terminated; its temporary files were removed" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lasts as long as the build


@pytest.mark.parametrize("bad, match", [("nan", "max_drop = nan must be a finite number"),
                                        ("inf", "max_drop = inf must be a finite number")])
def test_a_non_finite_budget_is_refused_not_ignored(bad, match, capsys):
    assert compile_cli.main(["build", "--dry-run", "--max-drop", bad]) == ConfigError.exit_code
    assert match in capsys.readouterr().err


def test_dry_run_checks_the_output_path_as_the_build_would(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    code = compile_cli.main(["build", "--dry-run", "-o", str(tmp_path / "notes")])
    assert code != 0 and "not a moqe bundle" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_recipe_files_that_cannot_be_read_are_config_errors(tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert compile_cli.main(["build", "--dry-run", str(deep)]) == ConfigError.exit_code
    assert "nests too deeply" in capsys.readouterr().err
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert compile_cli.main(["build", "--dry-run", str(big)]) == ConfigError.exit_code
    assert "a recipe has at most" in capsys.readouterr().err


def test_budget_options_without_a_budget_and_quiet_with_verbose_are_refused(tmp_path, capsys):
    assert compile_cli.main(["build", "--dry-run", "--cost", "size"]) == ConfigError.exit_code
    assert "give a budget --max-drop > 0" in capsys.readouterr().err
    assert compile_cli.main(["build", "smollm2-budget", "--dry-run", "--max-drop", "0", "--cost", "size"]) == 8
    assert compile_cli.main(["build", "fmnist-cnn", "--dry-run", "--max-drop", "1", "--cost", "size"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compile_cli.main(["build", "--dry-run", "-q", "-v"])
    assert e.value.code == USAGE


def test_a_recipe_saved_with_a_byte_order_mark_reads(tmp_path, capsys):
    p = tmp_path / "bom.toml"
    p.write_bytes("\ufeff[router]\nepochs = 3\n".encode("utf-8"))
    assert compile_cli.main(["build", "--dry-run", str(p)]) == 0


def test_a_negative_token_count_is_a_config_error(lm_bundle, capsys):
    assert run_cli.main([str(lm_bundle[0]), "--input", "the dog", "--max-new-tokens", "-1"]) == ConfigError.exit_code
    assert "--max-new-tokens -1 must be >= 0" in capsys.readouterr().err
