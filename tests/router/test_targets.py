import numpy as np

from moqe_compile.router.train import make_targets
from moqe_compile.tasks.image.router import kl_to_fp_matrix
from moqe_compile.evaluate.losses import sample_losses
from moqe_compile.tasks.image.score import score


def _L():
    return np.array([[0.3, 0.1, 0.2], [1.0, 2.0, 0.5]])


def test_hard_and_soft_targets():
    L = _L()
    np.testing.assert_array_equal(make_targets(L, "hard", 0.1).numpy(), [[0, 1, 0], [0, 0, 1]])
    soft = make_targets(L, "soft", 0.1).numpy()
    ref = np.exp(-L / 0.1) / np.exp(-L / 0.1).sum(1, keepdims=True)
    np.testing.assert_allclose(soft, ref, rtol=1e-5)
    # Temperature: larger T -> flatter targets, same ranking.
    flat = make_targets(L, "soft", 10.0).numpy()
    assert (flat.max(1) < soft.max(1)).all() and (flat.argmax(1) == soft.argmax(1)).all()
    np.testing.assert_allclose(make_targets(L, "fp-teacher", 0.1).numpy(), soft, rtol=1e-6)


class _Fixed:
    def __init__(self, y):
        self.y = y

    def run(self, x):
        return self.y[: len(x)]


def test_kl_matrix_equals_the_fp_loss_without_labels():
    rng = np.random.default_rng(0)
    fp = rng.normal(size=(20, 5)).astype(np.float32)
    ex = [fp + rng.normal(0, s, fp.shape).astype(np.float32) for s in (0.1, 0.5, 1.0)]
    labels = rng.integers(0, 5, 20)
    x = np.zeros((20, 1), np.float32)
    with_labels = score(_Fixed(fp), [_Fixed(e) for e in ex], x, labels, "labels")
    no_labels = score(_Fixed(fp), [_Fixed(e) for e in ex], x, None, "fp")
    kl = kl_to_fp_matrix(with_labels.fp_logits, with_labels.expert_logits)
    # With labelled data the build's loss is cross-entropy; fp-teacher computes the KL matrix
    # from the same Scores, which is exactly the label-free loss.
    np.testing.assert_allclose(kl, no_labels.loss, rtol=1e-12)
    assert not np.allclose(kl, with_labels.loss)
    assert (kl >= -1e-9).all() and np.allclose(kl[:, 0], sample_losses(ex[0], fp, None, "fp"))


def test_train_router_uses_the_target_matrix():
    # Inputs carry which of two experts wins; loss_train says expert 0 everywhere, the target
    # matrix says the truth: the router must follow target_matrix, and validate on loss_val.
    from moqe_compile.tasks.image.config import RouterConfig
    from moqe_compile.tasks.image.router import predict_probs, small_inputs, train_router

    rng = np.random.default_rng(0)
    k = rng.integers(0, 2, 96)
    x = rng.normal(0, 0.3, (96, 3, 8, 8)).astype(np.float32)
    x[:, 0] += np.where(k == 1, 2.0, -2.0)[:, None, None]
    truth = np.where(np.eye(2)[k] > 0, 0.0, 1.0)
    misleading = np.tile([0.0, 1.0], (96, 1))
    cfg = RouterConfig(preset="small", input_size=4, epochs=6, batch_size=16, targets="fp-teacher")
    res = train_router(cfg, x[:64], misleading[:64], x[64:], truth[64:], target_matrix=truth[:64])
    route = predict_probs(res.model, small_inputs(x[64:], 4, cfg.downsample)).argmax(1)
    assert (route == k[64:]).mean() >= 0.9
