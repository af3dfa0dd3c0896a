"""Every loss and activation at 0 and at its kinks: jax.grad of the value, the hand-written
gradient and central finite differences (float64) agree.

Where the function is smooth all three must agree; at a true kink (ReLU and LeakyReLU at 0,
ELU with α ≠ 1 at 0, the hinge at its margin) finite differences give the mean of the two
one-sided slopes, so there autodiff and the hand-written backward must take the same
documented one-sided derivative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import layers, losses
from jaxbp.layers.base import call
from tests.helpers import rel_error

STEP = 1e-6
CTX = layers.Context()  # eval mode: activations are stateless and deterministic


def forward(layer, x):
    """An activation's ``(y, residuals)`` through ``check`` then ``forward``."""
    y, state, residuals = call(layer, "layer", {}, {}, x, CTX)
    assert state == {}, state
    return y, residuals


def finite_differences(f, z):
    """Central differences of the scalar ``f`` at every entry of the float64 array ``z``."""
    z = np.asarray(z, np.float64)
    grad = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[i] += STEP
        down[i] -= STEP
        grad[i] = (float(f(jnp.asarray(up))) - float(f(jnp.asarray(down)))) / (2 * STEP)
    return grad


# (name, loss, logits, targets, smooth): logits at 0 (ties included) and at the kinks.
LOSS_CASES = [
    ("half-squared", losses.HalfSquaredError(), np.zeros((2, 3)),
     np.array([[0.5, -1.0, 0.0], [2.0, 0.0, 1.0]]), True),
    ("mse", losses.MeanSquaredError(), np.zeros((2, 3)),
     np.array([[0.5, -1.0, 0.0], [2.0, 0.0, 1.0]]), True),
    ("softmax-ce-labels", losses.SoftmaxCrossEntropy(), np.zeros((2, 3)), np.array([0, 2]), True),
    ("softmax-ce-probabilities", losses.SoftmaxCrossEntropy(),
     np.array([[0.0, 0.0, -1.0], [2.0, 2.0, 2.0]]),
     np.array([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]]), True),
    ("sigmoid-bce", losses.SigmoidBinaryCrossEntropy(), np.zeros((2, 3)),
     np.array([[0.0, 0.25, 1.0], [0.5, 0.75, 1.0]]), True),
    ("sigmoid-bce-mixed", losses.SigmoidBinaryCrossEntropy(),
     np.array([[0.0, -2.0, 3.0], [1e-9, -1e-9, 0.0]]),
     np.array([[0.75, 0.0, 1.0], [1.0, 0.0, 0.3]]), True),
    ("hinge-zero", losses.Hinge(), np.zeros((2, 3)), np.array([0, 1]), True),
    # s_j − s_y + Δ = 0 exactly for j = 1 (row 0) and j = 0 (row 1): at the margin
    ("hinge-margin", losses.Hinge(), np.array([[1.0, 0.0, -3.0], [1.5, 2.5, -1.0]]),
     np.array([0, 1]), False),
]


@pytest.mark.parametrize("name, loss, z, t, smooth", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_gradients_agree_at_zero_and_kinks(name, loss, z, t, smooth):
    z, t = jnp.asarray(z, jnp.float64), jnp.asarray(t)
    value = jax.jit(lambda a: loss.value(a, t))
    manual = loss.value_and_grad(z, t)[1]
    auto = jax.grad(value)(z)
    assert rel_error(auto, manual) <= 1e-12, (name, auto, manual)
    if smooth:
        assert rel_error(finite_differences(value, z), manual) <= 1e-6, name


def test_sigmoid_bce_at_zero_is_sigma_minus_t():
    """σ(0) − t = 0.5 − t per unit: the value written through softplus has this autodiff too."""
    loss = losses.SigmoidBinaryCrossEntropy()
    t = jnp.array([[0.0, 0.25, 0.75, 1.0]])
    auto = jax.grad(lambda a: loss.value(a, t))(jnp.zeros((1, 4)))
    np.testing.assert_allclose(auto, [[0.5, 0.25, -0.25, -0.5]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype, logit", [(jnp.float64, 1e300), (jnp.float32, 1e30)])
def test_sigmoid_bce_stays_exact_at_huge_logits(dtype, logit):
    loss = losses.SigmoidBinaryCrossEntropy()
    z = jnp.array([[logit, -logit, logit, -logit]], dtype)
    t = jnp.array([[1.0, 0.0, 0.0, 1.0]], dtype)
    value, manual = loss.value_and_grad(z, t)
    auto = jax.grad(lambda a: loss.value(a, t))(z)
    assert float(value) == pytest.approx(2 * logit, rel=1e-6)  # the two wrong units
    np.testing.assert_array_equal(manual, [[0, 0, 1, -1]])
    np.testing.assert_array_equal(auto, manual)


# (layer, smooth at 0): the points checked are 0 and small steps either side.
ACTIVATION_CASES = [
    (layers.Identity(), True),
    (layers.Sigmoid(), True),
    (layers.Tanh(), True),
    (layers.ReLU(), False),
    (layers.LeakyReLU(0.1), False),
    (layers.ELU(1.0), True),  # α = 1: slope 1 from both sides
    (layers.ELU(0.5), False),
    (layers.GELU(approximate=True), True),
    (layers.GELU(approximate=False), True),
    (layers.Softplus(), True),
    (layers.Softmax(), True),  # all logits tied at 0
]


@pytest.mark.parametrize("layer, smooth", ACTIVATION_CASES,
                         ids=[repr(c[0]) for c in ACTIVATION_CASES])
def test_activation_gradients_agree_at_zero_and_kinks(layer, smooth):
    x = jnp.array([[0.0, 0.0, -1e-3, 1e-3], [0.0, 2.0, -2.0, 0.0]])
    dy = jnp.array([[1.0, -0.5, 2.0, 0.25], [1.5, -1.0, 0.5, 3.0]])

    @jax.jit
    def both(x):
        y, residuals = forward(layer, x)
        _, manual = layer.backward({}, residuals, dy)
        _, vjp = jax.vjp(lambda a: forward(layer, a)[0], x)
        return manual, vjp(dy)[0]

    manual, auto = both(x)
    assert rel_error(auto, manual) <= 1e-12, (auto, manual)
    value = jax.jit(lambda a: jnp.sum(dy * forward(layer, a)[0]))
    fd = finite_differences(value, x)
    at_zero = np.asarray(x) == 0
    if smooth:
        assert rel_error(fd, manual) <= 1e-6
    else:  # away from the kink all three agree; at it, the one-sided slope is documented
        off = ~at_zero
        assert np.max(np.abs(fd[off] - np.asarray(manual)[off])) <= 1e-6
        slope_at_zero = {"ReLU": 0.0, "LeakyReLU": 1.0, "ELU": 0.5}[layer.name]
        np.testing.assert_allclose(np.asarray(manual)[at_zero],
                                   slope_at_zero * np.asarray(dy)[at_zero], rtol=1e-15)
