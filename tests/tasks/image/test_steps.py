"""The router stage end to end on the tiny model: small preset, fp-teacher targets on
labelled data, stabilizers, confidence fallback recorded in the manifest and served."""

import json

import numpy as np
import onnx
import pytest

from moqe_compile import Runtime
from moqe_compile.build import build
from moqe_compile.tasks.image import steps
from moqe_compile.tasks.image.config import RouterConfig

from ...models import CROP, tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny routers: one torch thread


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_onnx, tiny_images):
    cfg = tiny_config(tiny_onnx, tiny_images, targets="labels")
    # input_size 12 does not divide the 32 px crop: the subsample is a Gather of centre pixels
    cfg.router = RouterConfig(preset="small", input_size=12, epochs=3, batch_size=8, targets="fp-teacher",
                              stabilizers=["balance", "usage-bias", "noise"])
    seen = {"fallback": []}
    real, real_fallback = steps.train_router, steps.choose_fallback

    def spy(rc, x_train, loss_train, x_val, loss_val, progress=None, target_matrix=None):
        seen.update(loss_train=loss_train, target_matrix=target_matrix)
        return real(rc, x_train, loss_train, x_val, loss_val, progress, target_matrix=target_matrix)

    def fallback_spy(probs, loss):
        seen["fallback"].append((np.array(probs), np.array(loss)))
        return real_fallback(probs, loss)

    mp = pytest.MonkeyPatch()
    mp.setattr(steps, "train_router", spy)
    mp.setattr(steps, "choose_fallback", fallback_spy)
    try:
        out = build(cfg, tmp_path_factory.mktemp("b") / "small", quiet=True)
    finally:
        mp.undo()
    return out, seen


def test_fp_teacher_on_labelled_data_trains_on_the_kl_matrix(built):
    _, seen = built
    kl, ce = seen["target_matrix"], seen["loss_train"]
    assert kl is not None and kl.shape == ce.shape and (kl >= -1e-9).all()
    assert not np.allclose(kl, ce)  # the build's loss is cross-entropy here; the teacher is KL to FP


def test_manifest_records_the_fallback_and_runtime_serves_it(built):
    out, seen = built
    m = json.loads((out / "manifest.json").read_text())
    r = m["routing"]
    assert 0.0 <= r["fallback_threshold"] <= 1.0 and r["fallback_expert"] == r["default_expert"]
    chosen = r["fallback_chosen_on"]
    # The router's validation probabilities and losses as the build had them (the copies
    # control's router has another width); the threshold and losses recomputed by trying
    # every threshold that changes something, sample by sample.
    (probs, loss), = [c for c in seen["fallback"] if c[0].shape[1] == len(m["experts"])]
    best = int(loss.mean(0).argmin())
    assert m["experts"][best]["name"] == r["fallback_expert"]
    conf, route = probs.max(1), probs.argmax(1)

    def val_loss(t):
        return float(np.mean([loss[i, best if conf[i] < t else route[i]] for i in range(len(loss))]))

    candidates = sorted({0.0, 1.0, *conf.tolist()})
    losses = [val_loss(t) for t in candidates]
    assert chosen["val_routed_loss"] == pytest.approx(val_loss(0.0), rel=1e-9)
    assert chosen["val_loss_with_fallback"] == pytest.approx(min(losses), rel=1e-9)
    assert val_loss(r["fallback_threshold"]) == pytest.approx(min(losses), rel=1e-9)
    assert m["router"]["config"]["preset"] == "small" and m["router"]["config"]["downsample"] == "subsample"
    ops = {n.op_type for n in onnx.load(str(out / m["router"]["path"])).graph.node}
    assert "Gather" in ops and "Resize" not in ops and CROP % m["router"]["config"]["input_size"]
    x = np.random.default_rng(0).normal(size=(12, 3, CROP, CROP)).astype(np.float32)
    with Runtime.load(out) as rt:
        probs = rt._router.run(x)
        idx, conf = rt.route(x)
        t, k = rt.fallback_threshold, rt.expert_names.index(r["fallback_expert"])
        np.testing.assert_array_equal(idx, np.where(probs.max(1) < t, k, probs.argmax(1)))
        np.testing.assert_allclose(conf, probs.max(1))
