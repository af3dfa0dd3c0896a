"""Every dense-family layer's hand-written backward against ``jax.vjp`` of its forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import layers
from jaxbp.layers.base import call
from tests.helpers import RUN_ONCE, max_tree_rel_error, rel_error

ACTIVATIONS = [
    layers.Identity(),
    layers.Sigmoid(),
    layers.Tanh(),
    layers.ReLU(),
    layers.LeakyReLU(0.1),
    layers.ELU(1.3),
    layers.GELU(approximate=True),
    layers.GELU(approximate=False),
    layers.Softplus(),
    layers.Softmax(),
]
ALL_LAYERS = [layers.Dense(5), layers.Dense(4, use_bias=False), *ACTIVATIONS]
CTX = layers.Context()  # eval mode, no key: these layers are deterministic and stateless


def forward(layer, params, x):
    """``(y, residuals)`` through ``check`` then ``forward``, as a container runs a layer."""
    y, state, residuals = call(layer, "layer", params, {}, x, CTX)
    assert state == {}, state
    return y, residuals


def vjp_oracle(layer, params, x, dy):
    """(dparams, dx) from autodiff of the layer's forward."""
    _, pullback = jax.vjp(lambda p, a: forward(layer, p, a)[0], params, x)
    return pullback(dy)


def manual(layer, params, x, dy):
    _, residuals = forward(layer, params, x)
    return layer.backward(params, residuals, dy)


def random_case(layer, batch, features, seed, dtype):
    k_init, k_x, k_dy = jax.random.split(jax.random.key(seed), 3)
    params, state, out_shape = layer.init(k_init, (features,), dtype)
    assert state == {}
    x = 2.0 * jax.random.normal(k_x, (batch, features), dtype)
    dy = jax.random.normal(k_dy, (batch, *out_shape), dtype)
    return params, x, dy


@pytest.mark.parametrize("layer", ALL_LAYERS, ids=repr)
@pytest.mark.parametrize("batch", [1, 7])
def test_backward_matches_vjp_float64(layer, batch):
    params, x, dy = random_case(layer, batch, 6, seed=batch, dtype=jnp.float64)
    got = manual(layer, params, x, dy)
    want = vjp_oracle(layer, params, x, dy)
    assert max_tree_rel_error(got, want) <= 1e-10


@pytest.mark.parametrize("layer", ALL_LAYERS, ids=repr)
def test_backward_matches_vjp_float32(layer):
    """float32: both sides round differently; 1e-5 relative is the documented bound."""
    params, x, dy = random_case(layer, 8, 6, seed=3, dtype=jnp.float32)
    got = manual(layer, params, x, dy)
    want = vjp_oracle(layer, params, x, dy)
    assert jax.tree.leaves(got)[-1].dtype == jnp.float32
    assert max_tree_rel_error(got, want) <= 1e-5


@pytest.mark.parametrize("layer", ACTIVATIONS, ids=repr)
def test_activation_backward_on_images(layer):
    """Activations are element-wise (softmax: over the last axis) for any rank, e.g. NHWC."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    dy = jax.random.normal(jax.random.key(1), x.shape)
    assert max_tree_rel_error(manual(layer, {}, x, dy), vjp_oracle(layer, {}, x, dy)) <= 1e-10


def test_kinks_follow_autodiff():
    """At x = 0 the subgradients chosen by hand equal autodiff's for this code."""
    x = jnp.array([[-1.0, 0.0, 1.0]])
    dy = jnp.ones_like(x)
    for layer in [layers.ReLU(), layers.LeakyReLU(0.2), layers.ELU(0.5)]:
        assert max_tree_rel_error(manual(layer, {}, x, dy), vjp_oracle(layer, {}, x, dy)) <= 1e-15


def test_softmax_backward_is_full_jacobian_product():
    """dx = Jᵀ dy with the explicit Jacobian J_ij = y_i(δ_ij − y_j)."""
    x = jax.random.normal(jax.random.key(0), (1, 5))
    dy = jax.random.normal(jax.random.key(1), (1, 5))
    y = jax.nn.softmax(x[0])
    jacobian = jnp.diag(y) - jnp.outer(y, y)
    _, dx = manual(layers.Softmax(), {}, x, dy)
    assert rel_error(dx[0], jacobian.T @ dy[0]) <= 1e-12


def test_gelu_variants_match_jax_nn():
    x = jnp.linspace(-4, 4, 17)[None, :]
    for approximate in (True, False):
        y, _ = forward(layers.GELU(approximate), {}, x)
        assert rel_error(y, jax.nn.gelu(x, approximate=approximate)) <= 1e-14


def test_softplus_is_stable():
    x = jnp.array([[-1e4, 0.0, 1e4]])
    y, _ = forward(layers.Softplus(), {}, x)
    np.testing.assert_allclose(y, [[0.0, np.log(2.0), 1e4]])


@pytest.mark.parametrize("scheme", ["lecun_normal", "glorot_normal", "he_normal"])
def test_dense_init_schemes_have_expected_variance(scheme):
    fan_in, fan_out = 400, 300
    params, state, shape = layers.Dense(fan_out, init=scheme).init(jax.random.key(0), (fan_in,))
    assert state == {} and shape == (fan_out,)
    assert params["W"].shape == (fan_in, fan_out) and params["b"].shape == (fan_out,)
    assert not params["b"].any()
    want = {"lecun_normal": 1 / fan_in, "glorot_normal": 2 / (fan_in + fan_out),
            "he_normal": 2 / fan_in}[scheme]
    assert abs(float(jnp.var(params["W"])) / want - 1) < 0.05


def test_dense_without_bias_has_only_W():
    params, _, _ = layers.Dense(3, use_bias=False).init(jax.random.key(0), (2,))
    assert set(params) == {"W"}
    x = jnp.ones((4, 2))
    dparams, _ = manual(layers.Dense(3, use_bias=False), params, x, jnp.ones((4, 3)))
    assert set(dparams) == {"W"}


def test_layers_are_hashable_values():
    assert layers.Dense(3) == layers.Dense(3) and hash(layers.Dense(3)) == hash(layers.Dense(3))
    assert layers.LeakyReLU(0.1) != layers.LeakyReLU(0.2)
    assert repr(layers.Dense(3)) == "Dense(units=3, init='lecun_normal', use_bias=True)"


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def manual_and_vjp(layer, params, x, dy):
    """The hand-written backward and autodiff's, compiled together once per shape."""
    return manual(layer, params, x, dy), vjp_oracle(layer, params, x, dy)


@settings(max_examples=12)
@given(
    layer_index=st.integers(0, len(ALL_LAYERS) - 1),
    batch=st.integers(1, 9),
    features=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_backward_matches_vjp_random_shapes(layer_index, batch, features, seed):
    """NumPy draws the inputs: eager ``jax.random`` calls would compile a kernel per shape."""
    layer = ALL_LAYERS[layer_index]
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: layer.init(k, (features,), jnp.float64)[0],
                            jax.random.key(0))
    params = jax.tree.map(lambda s: rng.normal(size=s.shape) / np.sqrt(s.shape[0]), shapes)
    x = 2.0 * rng.normal(size=(batch, features))
    y = jax.eval_shape(lambda p, a: forward(layer, p, a)[0], params, x)
    got, want = manual_and_vjp(layer, params, x, rng.normal(size=y.shape))
    assert max_tree_rel_error(got, want) <= 1e-10
