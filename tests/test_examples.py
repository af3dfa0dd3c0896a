"""The tutorials' published numbers, computed by jaxbp."""

import jax
import jax.numpy as jnp
import pytest

from jaxbp import Sequential, layers, losses, models
from tests.helpers import max_tree_rel_error, rel_error


def test_worked_example_forward_matches_printed_digits():
    net, params, x, y = models.worked_example()
    y_hat, trace = net.forward_with_residuals(params, x)
    assert round(float(trace[0]["y"][0, 0]), 4) == 0.3775  # net_h1
    assert round(float(trace[1]["y"][0, 0]), 9) == 0.593269992  # out_h1
    assert round(float(trace[1]["y"][0, 1]), 9) == 0.596884378  # out_h2
    assert round(float(trace[2]["y"][0, 0]), 9) == 1.105905967  # net_o1
    assert round(float(y_hat[0, 0]), 8) == 0.75136507
    assert round(float(y_hat[0, 1]), 9) == 0.772928465
    e = 0.5 * (y - y_hat) ** 2
    assert round(float(e[0, 0]), 9) == 0.274811083
    assert round(float(e[0, 1]), 9) == 0.023560026
    assert round(float(net.loss(params, x, y)), 9) == 0.298371109


def test_worked_example_dE_dw5_is_the_chain_rule_product():
    net, params, x, y = models.worked_example()
    y_hat, trace = net.forward_with_residuals(params, x)
    out_o1, target_o1, out_h1 = y_hat[0, 0], y[0, 0], trace[1]["y"][0, 0]
    dE_dout = out_o1 - target_o1  # ∂E/∂out_o1 = −(target − out)
    dout_dnet = out_o1 * (1 - out_o1)  # σ'(net_o1)
    dnet_dw5 = out_h1  # net_o1 = w5·out_h1 + w6·out_h2 + b2
    product = dE_dout * dout_dnet * dnet_dw5
    assert round(float(dE_dout), 8) == 0.74136507
    assert round(float(dout_dnet), 9) == 0.186815602
    assert round(float(product), 9) == 0.082167041
    grads = net.manual_backward(params, x, y)
    assert rel_error(grads[2]["W"][0, 0], product) <= 1e-14  # w5 = W[h1 → o1]
    assert max_tree_rel_error(grads, jax.grad(net.loss)(params, x, y)) <= 1e-12


def test_worked_example_one_update_of_the_weights():
    """lr 0.5, biases fixed: the tutorial's updated w5 = 0.35891648 and w1 = 0.149780716."""
    net, params, x, y = models.worked_example()
    grads = net.manual_backward(params, x, y)
    new = [{**p, "W": p["W"] - 0.5 * g["W"]} if p else p for p, g in zip(params, grads)]
    assert round(float(new[2]["W"][0, 0]), 8) == 0.35891648
    assert round(float(new[0]["W"][0, 0]), 9) == 0.149780716
    assert float(net.loss(new, x, y)) < float(net.loss(params, x, y))


def test_d2l_closed_forms_with_weight_decay():
    """Tutorial 003: o = W2 h, h = φ(W1 x), J = L + λ/2(‖W1‖² + ‖W2‖²), no biases.

    In the column convention ∂J/∂W2 = (∂J/∂o) hᵀ + λW2 and ∂J/∂W1 = (∂J/∂z) xᵀ + λW1
    with ∂J/∂z = W2ᵀ(∂J/∂o) ⊙ φ'(z). jaxbp stores W transposed (in, out), so the
    same formulas read hᵀ(∂J/∂o) + λW2 and xᵀ(∂J/∂z) + λW1 over a batch of rows.
    """
    lam = 0.7
    net = Sequential(
        [layers.Dense(5, use_bias=False), layers.Tanh(), layers.Dense(3, use_bias=False)],
        loss=losses.SoftmaxCrossEntropy(),
        weight_decay=lam,
    )
    params = net.init(jax.random.key(0), (4,))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    W1, W2 = params[0]["W"], params[2]["W"]
    z = x @ W1
    h = jnp.tanh(z)
    o = h @ W2
    dJ_do = (jax.nn.softmax(o) - jax.nn.one_hot(y, 3)) / 6
    dJ_dh = dJ_do @ W2.T
    dJ_dz = dJ_dh * (1 - h**2)
    grads = net.manual_backward(params, x, y)
    assert rel_error(grads[2]["W"], h.T @ dJ_do + lam * W2) <= 1e-12
    assert rel_error(grads[0]["W"], x.T @ dJ_dz + lam * W1) <= 1e-12
    assert set(grads[0]) == {"W"} and grads[1] == {}


@pytest.mark.parametrize("logit", [1e4, -1e4])
def test_softmax_cross_entropy_is_stable_for_huge_logits(logit):
    loss = losses.SoftmaxCrossEntropy()
    z = jnp.array([[logit, 0.0, -logit]])
    value, dz = loss.value_and_grad(z, jnp.array([1]))
    assert jnp.isfinite(value) and jnp.all(jnp.isfinite(dz))
    assert float(value) == pytest.approx(abs(logit))
    auto = jax.grad(lambda a: loss.value(a, jnp.array([1])))(z)
    assert rel_error(dz, auto) <= 1e-12


def test_sigmoid_bce_is_stable_for_huge_logits():
    loss = losses.SigmoidBinaryCrossEntropy()
    z = jnp.array([[1e4, -1e4]])
    t = jnp.array([[0.0, 1.0]])
    value, dz = loss.value_and_grad(z, t)
    assert float(value) == pytest.approx(2e4)
    # σ(1e4) − 0 = 1 and σ(−1e4) − 1 = −1 exactly in float64, over a batch of one
    assert jnp.array_equal(dz, jnp.array([[1.0, -1.0]]))
    assert rel_error(jax.grad(lambda a: loss.value(a, t))(z), dz) <= 1e-15


def test_probability_targets_equal_integer_labels():
    loss = losses.SoftmaxCrossEntropy()
    z = jax.random.normal(jax.random.key(0), (4, 3))
    labels = jnp.array([2, 0, 1, 1])
    a = loss.value_and_grad(z, labels)
    b = loss.value_and_grad(z, jax.nn.one_hot(labels, 3))
    assert max_tree_rel_error(a, b) <= 1e-15


def test_soft_targets_gradient_matches_autodiff():
    loss = losses.SoftmaxCrossEntropy()
    z = jax.random.normal(jax.random.key(0), (4, 3))
    t = jax.random.uniform(jax.random.key(1), (4, 3))
    t = t / t.sum(1, keepdims=True)  # soft targets: each row a probability distribution
    _, dz = loss.value_and_grad(z, t)
    assert rel_error(dz, jax.grad(lambda a: loss.value(a, t))(z)) <= 1e-12


def test_hinge_matches_cs231n_definition():
    scores = jnp.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    labels = jnp.array([0, 1, 2])
    # CS231n's example: per-sample losses 2.9, 0, 12.9 -> mean 5.27 (to 2 d.p.)
    assert float(losses.Hinge().value(scores, labels)) == pytest.approx(15.8 / 3)
