"""Every loss's value against formulas of its own: NumPy in float64, optax and PyTorch.

``jax.grad`` differentiates the value code itself, so a wrong value with a
consistent gradient would pass every gradient test; these oracles share no code
with ``jaxbp.losses``. Logits reach ±1e4 and the float64 overflow point of
``exp`` (±710), where a naive formula gives inf or NaN.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp import losses

BATCH, CLASSES = 7, 4


def logits(seed):
    """Random logits of several scales, then rows of extreme and exactly-zero logits."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(BATCH, CLASSES)) * np.array([[0.1], [1], [1], [3], [10], [30], [1]])
    extreme = np.array([[1e4, -1e4, 0.0, 1.0], [710.0, -710.0, 745.0, -745.0],
                        [0.0, 0.0, 0.0, 0.0], [-1e4, -1e4 + 1, -1e4 + 2, -1e4]])
    return np.concatenate([z, extreme])


def labels(seed, n):
    return np.random.default_rng(seed + 1).integers(0, CLASSES, size=n)


def probabilities(seed, n):
    return np.random.default_rng(seed + 2).dirichlet(np.ones(CLASSES), size=n)


def binary_targets(seed, n):
    t = np.random.default_rng(seed + 3).uniform(size=(n, CLASSES))
    t[:, 0], t[:, 1] = 0.0, 1.0  # the hard targets, where one log term vanishes
    return t


# ------------------------------------------------------------------ NumPy oracles
def log_softmax(z):
    return z - np.logaddexp.reduce(z, axis=1, keepdims=True)


def numpy_half_squared_error(o, t):
    return np.mean(np.sum(0.5 * (t - o) ** 2, axis=1))


def numpy_mean_squared_error(o, t):
    return np.mean((o - t) ** 2)


def numpy_softmax_cross_entropy(z, t):
    """−Σ_k t_k log softmax(z)_k, averaged; integer labels pick one term."""
    if t.ndim == 1:
        return -np.mean(log_softmax(z)[np.arange(len(t)), t])
    return -np.mean(np.sum(t * log_softmax(z), axis=1))


def numpy_sigmoid_binary_cross_entropy(z, t):
    """−t log σ(z) − (1 − t) log(1 − σ(z)), with −log σ(z) = log(1 + e^{−z})."""
    minus_log_p, minus_log_q = np.logaddexp(0, -z), np.logaddexp(0, z)
    return np.mean(np.sum(t * minus_log_p + (1 - t) * minus_log_q, axis=1))


def numpy_hinge(s, y, margin):
    """CS231n's loop: Σ_{j ≠ y} max(0, s_j − s_y + Δ) per sample, averaged."""
    total = 0.0
    for scores, label in zip(s, y):
        total += sum(max(0.0, scores[j] - scores[label] + margin)
                     for j in range(len(scores)) if j != label)
    return total / len(s)


def value(loss, y_hat, y):
    return float(loss.value(jnp.asarray(y_hat), jnp.asarray(y)))


def assert_close(got, want, rel=1e-12):
    assert np.isfinite(got), got
    assert got == pytest.approx(want, rel=rel, abs=1e-300), (got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_squared_errors_match_numpy(seed):
    rng = np.random.default_rng(seed)
    o = logits(seed) * rng.uniform(0.5, 2, size=(1, CLASSES))
    t = rng.normal(size=o.shape) * 100
    assert_close(value(losses.HalfSquaredError(), o, t), numpy_half_squared_error(o, t))
    assert_close(value(losses.MeanSquaredError(), o, t), numpy_mean_squared_error(o, t))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softmax_cross_entropy_matches_numpy(seed):
    z = logits(seed)
    for t in (labels(seed, len(z)), probabilities(seed, len(z))):
        assert_close(value(losses.SoftmaxCrossEntropy(), z, t), numpy_softmax_cross_entropy(z, t))
    one_hot = np.eye(CLASSES, dtype=np.int32)[labels(seed, len(z))]
    assert_close(value(losses.SoftmaxCrossEntropy(), z, one_hot),
                 numpy_softmax_cross_entropy(z, labels(seed, len(z))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigmoid_binary_cross_entropy_matches_numpy(seed):
    z, loss = logits(seed), losses.SigmoidBinaryCrossEntropy()
    t = binary_targets(seed, len(z))
    assert_close(value(loss, z, t), numpy_sigmoid_binary_cross_entropy(z, t))
    cases = [(0.0, 0.3, np.log(2)), (0.0, 1.0, np.log(2)), (1e4, 1.0, 0.0), (-1e4, 0.0, 0.0),
             (1e4, 0.0, 1e4), (-1e4, 1.0, 1e4), (-800.0, 0.5, 400.0),
             (30.0, 1.0, np.log1p(np.exp(-30.0)))]
    for logit, target, want in cases:
        got = value(loss, np.array([[logit]]), np.array([[target]]))
        # within rounding of the terms: softplus(z) − t·z may cancel down to ulp(z)
        ulp = 4 * np.finfo(np.float64).eps * max(abs(logit), 1.0)
        assert got == pytest.approx(want, rel=1e-15, abs=ulp), (logit, target, got)


@pytest.mark.parametrize("margin", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hinge_matches_numpy(seed, margin):
    s, loss = logits(seed), losses.Hinge(margin)
    y = labels(seed, len(s))
    assert_close(value(loss, s, y), numpy_hinge(s, y, margin))
    tied = np.array([[2.0, 2.0 - margin, 0.0]])  # a score exactly at the margin adds 0
    assert value(loss, tied, np.array([0])) == numpy_hinge(tied, [0], margin) == 0.0


# ------------------------------------------------------------------ optax
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_optax(seed):
    z = logits(seed)
    n = len(z)
    y, p, t = labels(seed, n), probabilities(seed, n), binary_targets(seed, n)
    r = np.random.default_rng(seed).normal(size=z.shape)
    cases = [
        (losses.HalfSquaredError(), z, r, np.sum(optax.l2_loss(z, r)) / n),
        (losses.MeanSquaredError(), z, r, np.mean(optax.squared_error(z, r))),
        (losses.SoftmaxCrossEntropy(), z, y,
         np.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))),
        (losses.SoftmaxCrossEntropy(), z, p, np.mean(optax.softmax_cross_entropy(z, p))),
        (losses.SigmoidBinaryCrossEntropy(), z, t,
         np.sum(optax.sigmoid_binary_cross_entropy(z, t)) / n),
    ]
    # With two classes and Δ = 1, Σ_{j≠y} max(0, s_j − s_y + 1) is optax's max-form hinge.
    two = z[:, :2]
    cases.append((losses.Hinge(), two, y % 2,
                  np.mean(optax.losses.multiclass_hinge_loss(two, y % 2))))
    for loss, y_hat, target, want in cases:
        assert_close(value(loss, y_hat, target), float(want), rel=1e-11)


# ------------------------------------------------------------------ PyTorch
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_pytorch(seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z = logits(seed)
    n = len(z)
    y, p, t = labels(seed, n), probabilities(seed, n), binary_targets(seed, n)
    r = np.random.default_rng(seed).normal(size=z.shape)
    zt, rt = torch.from_numpy(z), torch.from_numpy(r)
    cases = [
        (losses.HalfSquaredError(), z, r, 0.5 * F.mse_loss(zt, rt, reduction="sum") / n),
        (losses.MeanSquaredError(), z, r, F.mse_loss(zt, rt)),
        (losses.SoftmaxCrossEntropy(), z, y, F.cross_entropy(zt, torch.from_numpy(y))),
        (losses.SoftmaxCrossEntropy(), z, p, F.cross_entropy(zt, torch.from_numpy(p))),
        (losses.SigmoidBinaryCrossEntropy(), z, t,
         F.binary_cross_entropy_with_logits(zt, torch.from_numpy(t), reduction="sum") / n),
    ]
    for margin in (1.0, 0.5):  # PyTorch's multi-margin loss also divides by the classes
        cases.append((losses.Hinge(margin), z, y,
                      CLASSES * F.multi_margin_loss(zt, torch.from_numpy(y), margin=margin)))
    for loss, y_hat, target, want in cases:
        assert_close(value(loss, y_hat, target), float(want), rel=1e-11)
