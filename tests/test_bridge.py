"""The custom_vjp bridge runs the hand-written backward under jax.grad, vmap, jit and optax."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxbp import Sequential, layers, losses, models, with_manual_grad
from tests.helpers import max_tree_rel_error
from tests.mutations import DenseBiasNotSummed, replace_layer


@pytest.fixture(scope="module")
def case():
    """A tanh MLP with weight decay and softmax cross-entropy, float64."""
    net = models.mlp(hidden=(5, 4), classes=3, activation=layers.Tanh, weight_decay=0.05)
    k_init, k_x = jax.random.split(jax.random.key(0))
    params = net.init(k_init, (4,), jnp.float64)
    x = jax.random.normal(k_x, (6, 4), jnp.float64)
    return net, params, x, jnp.array([0, 1, 2, 2, 1, 0])


def test_grad_and_value_and_grad_equal_autodiff(case):
    net, params, x, y = case
    loss = with_manual_grad(net)
    value, grads = jax.value_and_grad(loss)(params, x, y)
    want_value, want = jax.value_and_grad(net.loss)(params, x, y)
    assert value == want_value
    assert max_tree_rel_error(grads, want) <= 1e-10
    assert max_tree_rel_error(jax.grad(loss)(params, x, y), want) <= 1e-10


def test_gradient_wrt_x_and_zero_wrt_targets(case):
    net, params, x, _ = case
    y = jax.nn.one_hot(jnp.array([0, 1, 2, 2, 1, 0]), 3, dtype=jnp.float64)
    dx, dy = jax.grad(with_manual_grad(net), argnums=(1, 2))(params, x, y)
    assert max_tree_rel_error(dx, jax.grad(net.loss, argnums=1)(params, x, y)) <= 1e-10
    assert jnp.all(dy == 0)


def test_property_is_the_cached_bridge(case):
    net = case[0]
    assert net.loss_with_manual_grad is with_manual_grad(net)


def test_vmap_per_example_gradients_equal_autodiff(case):
    net, params, x, y = case
    per_example = jax.vmap(jax.grad(with_manual_grad(net)), in_axes=(None, 0, 0))
    got = jax.jit(per_example)(params, x[:, None], y[:, None])
    want = jax.vmap(jax.grad(net.loss), in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
    assert jax.tree.leaves(got)[0].shape[0] == 6
    assert max_tree_rel_error(got, want) <= 1e-10


def _train(loss, params, x, y, steps=3):
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state, x, y)
    return params


def test_optax_update_under_jit_matches_autodiff(case):
    net, params, x, y = case
    got = _train(net.loss_with_manual_grad, params, x, y)
    want = _train(net.loss, params, x, y)
    assert max_tree_rel_error(got, want) <= 1e-9
    assert max_tree_rel_error(got, params) > 1e-4  # it did train


def test_a_wrong_manual_backward_changes_the_gradient(case):
    """Proof that the manual path runs: a wrong test-only layer shows up in jax.grad."""
    net, params, x, y = case
    wrong = replace_layer(net, 4, DenseBiasNotSummed(3))
    got = jax.jit(jax.grad(with_manual_grad(wrong)))(params, x, y)
    assert max_tree_rel_error(got[4]["b"], wrong.manual_backward(params, x, y)[4]["b"]) == 0
    assert max_tree_rel_error(got[4]["b"], jax.grad(wrong.loss)(params, x, y)[4]["b"]) > 0.1
    assert max_tree_rel_error(got[:4], jax.grad(net.loss)(params, x, y)[:4]) <= 1e-10


def test_hvp_through_manual_backward_equals_autodiff_hessian():
    """jax.jvp of the manual backward = forward-over-reverse HVP = jax.hessian · v (float64)."""
    net = Sequential(
        [layers.Dense(3), layers.Softplus(), layers.Dense(2), layers.Tanh()],
        loss=losses.HalfSquaredError(),
        weight_decay=0.1,
    )
    k_init, k_x, k_y, k_v = jax.random.split(jax.random.key(1), 4)
    params = net.init(k_init, (2,), jnp.float64)
    x = jax.random.normal(k_x, (4, 2), jnp.float64)
    y = jax.random.normal(k_y, (4, 2), jnp.float64)
    flat, unravel = ravel_pytree(params)
    v_flat = jax.random.normal(k_v, flat.shape, flat.dtype)
    v = unravel(v_flat)

    _, manual_hvp = jax.jvp(lambda p: net.manual_backward(p, x, y), (params,), (v,))
    _, fwd_over_rev = jax.jvp(lambda p: jax.grad(net.loss)(p, x, y), (params,), (v,))
    assert max_tree_rel_error(manual_hvp, fwd_over_rev) <= 1e-10

    hessian = jax.hessian(lambda f: net.loss(unravel(f), x, y))(flat)
    assert max_tree_rel_error(manual_hvp, unravel(hessian @ v_flat)) <= 1e-10

    # reverse-over-reverse through the bridge differentiates the manual backward too
    bridge = net.loss_with_manual_grad

    def grad_dot_v(p):
        g = jax.tree.leaves(jax.grad(bridge)(p, x, y))
        return sum(jnp.vdot(a, b) for a, b in zip(g, jax.tree.leaves(v), strict=True))

    rev_over_rev = jax.grad(grad_dot_v)(params)
    assert max_tree_rel_error(rev_over_rev, fwd_over_rev) <= 1e-10
