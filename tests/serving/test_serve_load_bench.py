"""bench/serve_load.py builds requests the server takes: both payload kinds from the bundle's
stored test split come back 200 with their own id and the same expert/logits shape, and its
histogram reader turns two /metrics snapshots into the right count and quantile buckets."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from moqe_compile import Runtime  # noqa: E402
from moqe_compile.serving.app import create_app  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def serve_load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["tensor", "image"])
def test_each_payload_kind_is_served_with_its_own_id(serve_load, tiny_bundle, kind):
    with Runtime.load(tiny_bundle) as rt:
        payloads = serve_load._payloads(str(tiny_bundle), rt.input_shape, 3, kind)
        assert payloads[0][1]["name"] == ("input" if kind == "tensor" else "image")
        with TestClient(create_app(rt, "m", close_on_shutdown=False)) as c:
            for i, p in enumerate(payloads):
                body, headers = serve_load.request_body(p, f"r{i}")
                r = c.post("/v2/models/m/infer", content=body, headers=headers)
                assert r.status_code == 200, r.text
                assert r.json()["id"] == f"r{i}"


def test_image_payload_is_a_jpeg_of_the_stored_pixels(serve_load, tiny_bundle):
    import io

    from PIL import Image

    with np.load(Path(tiny_bundle) / "report" / "eval_data.npz") as z:
        pix = z["test_pixels"][0]
    raw, spec = serve_load.image_payload(pix)
    assert spec["parameters"]["binary_data_size"] == len(raw)
    with Image.open(io.BytesIO(raw[4:])) as im:
        assert im.format == "JPEG" and im.size == (pix.shape[2], pix.shape[1])
        # Lossy, and the tiny images are noise: the colours survive, not each pixel.
        got = np.asarray(im, np.float64).transpose(2, 0, 1).mean(axis=(1, 2))
        assert np.abs(got - pix.mean(axis=(1, 2))).max() < 4


def test_hist_delta_counts_only_what_was_observed_between_snapshots(serve_load):
    def snap(counts, total):
        out = {f'h_bucket{{le="{le}",model="m"}}': float(c) for le, c in zip(("0.1", "1.0", "+Inf"), counts)}
        return {**out, "h_count": float(counts[-1]), "h_sum": total}

    d = serve_load.hist_delta(snap([5, 5, 5], 0.2), snap([55, 104, 105], 40.2), "h")
    assert d["count"] == 100 and d["mean_s"] == pytest.approx(0.4)
    assert d["p50_le_s"] == 0.1 and d["p99_le_s"] == 1.0
