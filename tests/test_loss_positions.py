"""Every loss on outputs (…, K) of rank > 2: the mean over all N = prod(…) positions.

A sequence model's logits (batch, time, K) with labels (batch, time) give the
per-position loss averaged over batch and time, so each value equals the rank-2
loss on the (batch·time, K) rows and each gradient carries 1/N. The hand-written
gradient is checked against ``jax.value_and_grad`` of the value code, and the
value against the flattened rank-2 loss (which ``test_loss_values`` pins to
NumPy, optax and PyTorch). Float64 comes from ``tests/conftest.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import losses
from tests.helpers import rel_error

B, T, K = 2, 3, 4
TOL = 1e-10


def targets_for(kind, shape, rng):
    """Targets of ``kind`` for outputs ``shape`` (…, K), built with NumPy."""
    *positions, classes = shape
    if kind == "real":
        return rng.normal(size=shape)
    if kind == "labels":
        return rng.integers(0, classes, size=positions)
    if kind == "probabilities":
        return rng.dirichlet(np.ones(classes), size=positions)
    if kind == "one-hot":
        return np.eye(classes, dtype=np.int32)[rng.integers(0, classes, size=positions)]
    if kind == "binary":
        t = rng.uniform(size=shape)
        t.reshape(-1)[::3] = 1.0  # hard targets too
        return t
    raise AssertionError(kind)


CASES = [  # (loss, kind of targets)
    (losses.HalfSquaredError(), "real"),
    (losses.MeanSquaredError(), "real"),
    (losses.SoftmaxCrossEntropy(), "labels"),
    (losses.SoftmaxCrossEntropy(), "probabilities"),
    (losses.SoftmaxCrossEntropy(), "one-hot"),
    (losses.SigmoidBinaryCrossEntropy(), "binary"),
    (losses.Hinge(), "labels"),
    (losses.Hinge(0.5), "labels"),
]
IDS = [f"{loss!r}-{kind}" for loss, kind in CASES]


def outputs(shape, seed):
    return np.random.default_rng(seed).normal(size=shape) * 3


def flatten(y_hat, y):
    """(…, K) → (N, K); labels (…) → (N,), targets (…, K) → (N, K)."""
    n = int(np.prod(y_hat.shape[:-1]))
    return y_hat.reshape(n, y_hat.shape[-1]), y.reshape(n, *y.shape[y_hat.ndim - 1:])


def check_against_autodiff_and_rows(loss, y_hat, y):
    """The hand-written (L, ∂L/∂y_hat) on (…, K) against autodiff and the rank-2 loss."""
    value, grad = loss.value_and_grad(y_hat, y)
    assert np.shape(value) == () and grad.shape == y_hat.shape
    assert grad.dtype == value.dtype == np.float64

    ad_value, ad_grad = jax.value_and_grad(loss.value)(jnp.asarray(y_hat), jnp.asarray(y))
    errors = rel_error(value, ad_value), rel_error(grad, ad_grad)
    assert max(errors) <= TOL, errors

    rows_value, rows_grad = loss.value_and_grad(*flatten(y_hat, y))
    assert rows_grad.shape == (int(np.prod(y_hat.shape[:-1])), y_hat.shape[-1])
    assert float(value) == float(rows_value)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(rows_grad).reshape(y_hat.shape))
    return max(errors)


@pytest.mark.parametrize("loss, kind", CASES, ids=IDS)
def test_batch_time_outputs_match_autodiff_and_the_flattened_loss(loss, kind):
    rng = np.random.default_rng(0)
    y_hat, y = outputs((B, T, K), 1), targets_for(kind, (B, T, K), rng)
    check_against_autodiff_and_rows(loss, y_hat, y)
    # and under jit, where the same code sees abstract shapes only
    value, grad = jax.jit(loss.value_and_grad)(y_hat, y)
    want_value, want_grad = loss.value_and_grad(y_hat, y)
    assert rel_error(value, want_value) <= TOL and rel_error(grad, want_grad) <= TOL


@pytest.mark.parametrize("loss, kind", CASES, ids=IDS)
def test_value_is_the_mean_of_the_per_position_losses(loss, kind):
    """N = B·T, not B: the mean of the per-position values, each a rank-2 loss on one row."""
    rng = np.random.default_rng(2)
    y_hat, y = outputs((B, T, K), 3), targets_for(kind, (B, T, K), rng)
    # MeanSquaredError too: a row's (1/K) Σ_k, averaged over the rows, is the mean of every entry
    want = np.mean([float(loss.value(y_hat[b, t][None], y[b, t][None]))
                    for b in range(B) for t in range(T)])
    assert float(loss.value(y_hat, y)) == pytest.approx(want, rel=1e-13)


def test_rank_four_outputs():
    """(batch, height, width, classes) logits with (batch, height, width) labels."""
    shape = (2, 3, 2, 5)
    rng = np.random.default_rng(4)
    loss = losses.SoftmaxCrossEntropy()
    for kind in ("labels", "probabilities"):
        y_hat, y = outputs(shape, 5), targets_for(kind, shape, rng)
        check_against_autodiff_and_rows(loss, y_hat, y)
    y_hat, y = outputs(shape, 6), targets_for("labels", shape, rng)
    _, grad = loss.value_and_grad(y_hat, y)
    # (softmax(z) − onehot) / N with N = 12: every position's gradient row sums to 0
    np.testing.assert_allclose(np.sum(grad, axis=-1), 0, atol=1e-15)
    softmax = np.exp(y_hat) / np.exp(y_hat).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(grad, (softmax - np.eye(5)[y]) / 12, rtol=1e-12, atol=1e-16)


# ---------------------------------------------------------------- label and target checks
def labels_with(value, at=(1, 2)):
    y = np.zeros((B, T), dtype=np.int64)
    y[at] = value
    return y


@pytest.mark.parametrize("loss", [losses.SoftmaxCrossEntropy(), losses.Hinge()],
                         ids=lambda loss: loss.name)
@pytest.mark.parametrize("bad, got", [(K, f"[0, {K}]"), (-2, "[-2, 0]")])
def test_out_of_range_labels_on_batch_time_labels(loss, bad, got):
    y_hat, y = outputs((B, T, K), 7), labels_with(bad)
    msg = f"{loss.name}: integer labels must lie in [0, {K}) for {K} classes; got values in {got}"
    for call in (loss.value_and_grad, loss.value, jax.grad(loss.value),
                 lambda o, t: loss.check_target_values(jax.ShapeDtypeStruct(o.shape, o.dtype), t)):
        with pytest.raises(ValueError, match=re.escape(msg)):
            call(jnp.asarray(y_hat), jnp.asarray(y))
    loss.value_and_grad(y_hat, labels_with(K - 1))  # the top label is in range


def test_probability_and_binary_targets_are_checked_on_batch_time_shapes():
    rng = np.random.default_rng(8)
    y_hat = outputs((B, T, K), 9)
    p = targets_for("probabilities", (B, T, K), rng)
    p[1, 2] *= 1.5  # one position's row sums to 1.5
    with pytest.raises(ValueError, match=re.escape(
            "SoftmaxCrossEntropy: each row of probability targets must sum to 1")):
        losses.SoftmaxCrossEntropy().value_and_grad(y_hat, p)
    p = targets_for("probabilities", (B, T, K), rng)
    p[0, 1, 0] = -0.25
    p[0, 1, 1] += 0.25
    with pytest.raises(ValueError, match=re.escape(
            "SoftmaxCrossEntropy: probability targets must be >= 0; got 1 negative value(s)")):
        losses.SoftmaxCrossEntropy().value_and_grad(y_hat, p)
    t = targets_for("binary", (B, T, K), rng)
    t[1, 0, 3] = 1.5
    with pytest.raises(ValueError, match=re.escape(
            "SigmoidBinaryCrossEntropy: targets must lie in [0, 1] (probabilities of class 1); "
            "got values in [")):
        losses.SigmoidBinaryCrossEntropy().value_and_grad(y_hat, t)


WRONG_SHAPES = [
    (losses.SoftmaxCrossEntropy(), np.zeros((2, 6), np.int64),
     "SoftmaxCrossEntropy: integer labels y must have shape (2, 5) for output (2, 5, 7); "
     "got (2, 6)"),
    (losses.SoftmaxCrossEntropy(), np.zeros((10,), np.int64),
     "SoftmaxCrossEntropy: y must be integer labels (2, 5) or probability targets (2, 5, 7); "
     "got shape (10,) with dtype int64"),
    (losses.SoftmaxCrossEntropy(), np.zeros((10, 7)),
     "SoftmaxCrossEntropy: y must be integer labels (2, 5) or probability targets (2, 5, 7); "
     "got shape (10, 7) with dtype float64"),
    (losses.SoftmaxCrossEntropy(), np.zeros((2, 5)),
     "SoftmaxCrossEntropy: y must be integer labels (2, 5) or probability targets (2, 5, 7); "
     "got shape (2, 5) with dtype float64"),
    (losses.Hinge(), np.zeros((5, 2), np.int64),
     "Hinge: integer labels y must have shape (2, 5) for output (2, 5, 7); got (5, 2)"),
    (losses.Hinge(), np.zeros((2, 5)),
     "Hinge: y must be integer labels of shape (2, 5); got dtype float64 with shape (2, 5)"),
    (losses.HalfSquaredError(), np.zeros((10, 7)),
     "HalfSquaredError: target y must have the shape of the network output (2, 5, 7); "
     "got (10, 7)"),
    (losses.MeanSquaredError(), np.zeros((2, 5, 1)),
     "MeanSquaredError: target y must have the shape of the network output (2, 5, 7); "
     "got (2, 5, 1)"),
    (losses.SigmoidBinaryCrossEntropy(), np.zeros((2, 5), np.int64),
     "SigmoidBinaryCrossEntropy: target y must have the shape of the network output "
     "(2, 5, 7); got (2, 5)"),
]


@pytest.mark.parametrize("loss, y, msg", WRONG_SHAPES,
                         ids=[f"{loss.name}-{y.shape}" for loss, y, _ in WRONG_SHAPES])
def test_targets_of_the_wrong_shape_name_loss_and_both_shapes(loss, y, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        loss.value_and_grad(jnp.zeros((2, 5, 7)), jnp.asarray(y))


def test_outputs_without_positions_or_of_rank_one():
    loss = losses.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=re.escape(
            "SoftmaxCrossEntropy: the output has no positions (shape (2, 0, 3)); the loss "
            "averages over at least one position")):
        loss.value_and_grad(jnp.zeros((2, 0, 3)), jnp.zeros((2, 0), int))
    with pytest.raises(ValueError, match=re.escape(
            "SoftmaxCrossEntropy: the batch is empty (output shape (0, 4, 3))")):
        loss.value_and_grad(jnp.zeros((0, 4, 3)), jnp.zeros((0, 4), int))
    with pytest.raises(ValueError, match=re.escape(
            "HalfSquaredError: network output y_hat must have rank >= 2 (batch, ..., outputs); "
            "got shape (3,)")):
        losses.HalfSquaredError().value_and_grad(jnp.zeros(3), jnp.zeros(3))


# ---------------------------------------------------------------- random leading shapes
@settings(max_examples=10, deadline=None)  # the first examples compile kernels
@given(case=st.sampled_from(range(len(CASES))),
       positions=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       classes=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_leading_shapes(case, positions, classes, seed):
    loss, kind = CASES[case]
    shape = (*positions, classes)
    rng = np.random.default_rng(seed)
    y_hat, y = outputs(shape, seed + 1), targets_for(kind, shape, rng)
    check_against_autodiff_and_rows(loss, y_hat, y)
