"""Dropout: hand-written backward against ``jax.vjp`` with the same key, masks reproducible from
the key, the dropped fraction and the 1/(1 − rate) scale, identity in eval mode, pinned errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp.layers.base import Context, LayerError, call
from jaxbp.layers.dropout import Dropout, DropoutIdentityResiduals, DropoutResiduals
from tests.helpers import RUN_ONCE, max_tree_rel_error


def run(layer, x, ctx):
    """``check`` then ``forward``, as a container runs a layer."""
    layer.check({}, {}, x, ctx)
    return layer.forward({}, {}, x, ctx)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE)
def _both(layer, train, key, x, dy):
    """y, residuals, and the (manual, autodiff) cotangents from one key, as one program."""
    ctx = Context(train=train, key=key)
    y, _, residuals = run(layer, x, ctx)
    manual = layer.backward({}, residuals, dy)
    _, pullback = jax.vjp(lambda p, a: layer.forward(p, {}, a, ctx)[0], {}, x)
    return y, residuals, manual, pullback(dy)


def random_case(shape, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 4, 5)], ids=str)
def test_backward_matches_vjp_float64(rate, shape):
    x, dy = random_case(shape, seed=len(shape))
    y, residuals, manual, auto = _both(Dropout(rate), True, jax.random.key(0), x, dy)
    assert type(residuals) is DropoutResiduals and residuals.keep.dtype == jnp.bool_
    assert max_tree_rel_error(manual, auto) <= 1e-10
    keep = np.asarray(residuals.keep)
    assert 0 < keep.sum() < keep.size  # some dropped and some kept, so the check means something
    np.testing.assert_array_equal(np.asarray(manual[1]) == 0, ~keep)  # x, dy nonzero a.s.
    np.testing.assert_array_equal(np.asarray(y) == 0, ~keep)


@pytest.mark.parametrize("layer, train", [(Dropout(0.5), False), (Dropout(0.0), True)],
                         ids=["eval", "rate0"])
def test_eval_and_rate_zero_are_the_identity_without_a_key(layer, train):
    x, dy = random_case((4, 3), seed=1)
    y, residuals, manual, auto = _both(layer, train, None, x, dy)
    assert type(residuals) is DropoutIdentityResiduals
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(manual[1], dy)
    np.testing.assert_array_equal(auto[1], dy)
    assert manual[0] == {} == auto[0]
    # eagerly: the very same arrays come back, and the state too
    state = {}
    y, new_state, _ = layer.forward({}, state, x, Context(train=train))
    assert y is x and new_state is state


def test_same_key_same_mask_other_key_other_mask():
    layer, x = Dropout(0.5), np.ones((8, 16, 8))
    mask = lambda key: np.asarray(run(layer, x, Context(True, key))[2].keep)  # noqa: E731
    a = mask(jax.random.key(3))
    np.testing.assert_array_equal(a, mask(jax.random.key(3)))
    assert np.mean(a != mask(jax.random.key(4))) > 0.3  # ≈ 0.5 for independent masks
    # forward is a function of the key: jitted, it draws the same mask as eagerly
    jitted = jax.jit(lambda k, v: layer.forward({}, {}, v, Context(True, k))[2].keep)
    np.testing.assert_array_equal(jitted(jax.random.key(3), x), a)
    # a raw uint32 key (jax.random.PRNGKey) works as well
    raw = mask(jax.random.PRNGKey(3))
    assert raw.shape == x.shape and 0 < raw.mean() < 1


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
def test_dropped_fraction_is_rate_and_survivors_scale_exactly(rate):
    """On n = 10⁶ entries the dropped fraction is within 5 standard deviations of ``rate``
    (σ = √(rate(1 − rate)/n) ≤ 5e-4; the key is fixed, so this cannot flake)."""
    n = 10**6
    x = np.random.default_rng(2).uniform(0.5, 2.0, size=(1000, 1000))
    y, _, residuals = run(Dropout(rate), x, Context(True, jax.random.key(5)))
    y, keep = np.asarray(y), np.asarray(residuals.keep)
    dropped = 1 - keep.mean()
    assert abs(dropped - rate) <= 5 * np.sqrt(rate * (1 - rate) / n), dropped
    np.testing.assert_array_equal(y[~keep], 0.0)
    np.testing.assert_array_equal(y[keep], x[keep] / (1 - rate))  # bit for bit
    assert abs(y.mean() - x.mean()) < 0.01  # inverted dropout keeps the expectation


def test_float32_stays_float32():
    x, dy = random_case((6, 5), seed=3, dtype=np.float32)
    y, _, manual, auto = _both(Dropout(0.25), True, jax.random.key(1), x, dy)
    assert y.dtype == manual[1].dtype == jnp.float32
    assert max_tree_rel_error(manual, auto) <= 1e-6


def test_layer_attributes_and_init():
    assert Dropout(0.5).stochastic and not Dropout(0.0).stochastic
    assert not Dropout(0.5).stateful and Dropout(0.5).decay_keys == ()
    assert repr(Dropout(0.5)) == "Dropout(rate=0.5)" and Dropout(1 / 4) == Dropout(0.25)
    assert hash(Dropout(0.5)) == hash(Dropout(0.5))
    assert Dropout(np.float32(0.5)).rate == 0.5 and type(Dropout(0).rate) is float
    assert Dropout(0.3).init(None, (4, 4, 3)) == ({}, {}, (4, 4, 3))


KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "call_, message",
    [
        (lambda: Dropout(1.0),
         r"Dropout: rate must be a finite number in \[0, 1\) \(the probability of DROPPING a "
         r"unit; stax's and CS231n's p is the keep probability, 1 - rate\); got 1.0"),
        (lambda: Dropout(-0.1), r"Dropout: rate must be a finite number in \[0, 1\) .*; got -0.1"),
        (lambda: Dropout(float("nan")), r"Dropout: rate must be .*; got nan"),
        (lambda: Dropout("0.5"), r"Dropout: rate must be .*; got '0.5'"),
        (lambda: Dropout(True), r"Dropout: rate must be .*; got True"),
        (lambda: run(Dropout(0.5), np.ones((2, 3)), Context(train=True)),
         r"^Dropout: train=True needs a PRNG key for the dropout mask \(pass key=...\); "
         r"got key=None$"),
        (lambda: run(Dropout(0.5), np.ones((2, 3)), Context(True, 3)),
         r"Dropout: ctx.key must be one PRNG key \(jax.random.key\(seed\) or "
         r"jax.random.PRNGKey\(seed\)\); got int"),
        (lambda: run(Dropout(0.5), np.ones((2, 3)), Context(True, jax.random.split(KEY, 2))),
         r"Dropout: ctx.key must be one PRNG key .*\(2,\)"),
        (lambda: run(Dropout(0.5), [[1.0, 2.0]], Context(True, KEY)),
         r"Dropout: input x must be an array \(jax.numpy or numpy\); got list"),
        (lambda: Dropout(0.5).check({"W": np.ones(2)}, {}, np.ones((2, 3)), Context()),
         r"Dropout: params must be \{\} \(the layer has no parameters\); got \['W'\]"),
        (lambda: Dropout(0.5).check({}, {"mean": np.ones(2)}, np.ones((2, 3)), Context()),
         r"Dropout: state must be \{\} \(the layer has no state\); got \['mean'\]"),
        (lambda: Dropout(0.5).check({}, {}, np.ones((2, 3)), Context(train=np.ones(1))),
         r"Dropout: ctx.train must be a Python bool"),
    ],
)
def test_errors(call_, message):
    with pytest.raises(ValueError, match=message):
        call_()


def test_keyless_eval_and_rate_zero_pass_check_and_errors_carry_the_path():
    Dropout(0.5).check({}, {}, np.ones((2, 3)), Context(train=False))
    Dropout(0.0).check({}, {}, np.ones((2, 3)), Context(train=True))
    with pytest.raises(LayerError, match=r"^layers\[1\] Dropout: train=True needs a PRNG key"):
        call(Dropout(0.2), "layers[1]", {}, {}, np.ones((2, 3)), Context(train=True))
