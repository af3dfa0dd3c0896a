"""MaxPool2D, AvgPool2D and Flatten: tutorial numbers, NumPy oracles, backward vs ``jax.vjp``.

Max-pool ties follow ``jax.grad``: each window sends its dy to the first maximal
entry in row-major window order; constant and integer-valued inputs pin that rule.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import layers
from jaxbp.layers.pool import UNROLLED_MAX_OFFSETS
from tests.helpers import RUN_ONCE, rel_error
from tests.test_conv import (
    CTX,
    KEY,
    assert_backward_matches_vjp,
    forward,
    manual_and_vjp,
    random_case,
)

MAP = np.array([[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]], float)
POOLS = [layers.MaxPool2D, layers.AvgPool2D]


def naive_pool(kind, x, window, stride, pads):
    """Loops over windows: max over −∞-padded x, or mean over zero-padded x (÷ kh·kw)."""
    fill = -np.inf if kind is layers.MaxPool2D else 0.0
    x = np.pad(np.asarray(x), ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
    (kh, kw), (sh, sw) = window, stride
    h_out, w_out = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    reduce = np.max if kind is layers.MaxPool2D else np.mean
    y = np.zeros((x.shape[0], h_out, w_out, x.shape[3]))
    for i, j in itertools.product(range(h_out), range(w_out)):
        y[:, i, j, :] = reduce(x[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :], axis=(1, 2))
    return y


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def manual_dx(layer, x, dy):
    _, residuals = forward(layer, {}, x)
    return layer.backward({}, residuals, dy)[1]


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def vjp_dx(layer, x, dy):
    return jax.vjp(lambda a: forward(layer, {}, a)[0], x)[1](dy)[0]


def xla_max_pool(layer, a, fill=-np.inf):
    """XLA's own max pooling, ``lax.reduce_window(max)``, in ``layer``'s geometry, padded by
    ``fill``."""
    pads, _ = layer._geometry(a.shape[1:3])
    return jax.lax.reduce_window(a, np.asarray(fill, a.dtype), jax.lax.max, (1, *layer.window, 1),
                                 (1, *layer.stride, 1), ((0, 0), *pads, (0, 0)))


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def reduce_window_vjp_dx(layer, x, dy):
    """``jax.vjp`` of ``xla_max_pool``: an oracle of the tie rule independent of the layer's
    forward (whose selections ``jax.vjp`` would follow)."""
    return jax.vjp(lambda a: xla_max_pool(layer, a), x)[1](dy)[0]


# ----------------------------------------------------------- tutorial numbers
def test_tutorial_2x2_pooling_of_a_4x4_map():
    x = jnp.asarray(MAP)[None, :, :, None]
    y_max, _ = forward(layers.MaxPool2D(2), {}, x)
    y_avg, _ = forward(layers.AvgPool2D(2), {}, x)
    np.testing.assert_array_equal(y_max[0, :, :, 0], [[6, 8], [3, 4]])
    np.testing.assert_array_equal(y_avg[0, :, :, 0], [[3.25, 5.25], [2, 2]])
    assert layers.MaxPool2D(2).init(KEY, (4, 4, 5)) == ({}, {}, (2, 2, 5))  # depth unchanged


def test_max_pool_gradient_goes_to_the_arg_max():
    x = jnp.asarray(MAP)[None, :, :, None]
    dy = jnp.array([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
    dx = manual_dx(layers.MaxPool2D(2), x, dy)[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0, 0, 0, 0], [0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 0, 4]])
    dx = manual_dx(layers.AvgPool2D(2), x, dy)[0, :, :, 0]
    np.testing.assert_array_equal(dx[::2, ::2], [[0.25, 0.5], [0.75, 1.0]])


@pytest.mark.parametrize("kind", POOLS)
@pytest.mark.parametrize(
    ("window", "stride", "padding"),
    [(2, None, 0), (3, 1, 1), ((2, 3), (1, 2), ((1, 0), (0, 2))), (3, 2, "SAME"), (4, 3, "VALID")],
)
def test_forward_matches_naive_loops(kind, window, stride, padding):
    layer = kind(window, stride, padding)
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3))
    pads, _ = layer._geometry((7, 6))
    y, _ = forward(layer, {}, x)
    np.testing.assert_allclose(y, naive_pool(kind, x, layer.window, layer.stride, pads),
                               rtol=1e-12)


def test_avg_pool_padding_counts_in_the_divisor():
    """Padded zeros count: a corner window of ones with padding 1 averages to 1/4."""
    layer = layers.AvgPool2D(2, stride=1, padding=1)
    y, _ = forward(layer, {}, jnp.ones((1, 2, 2, 1)))
    np.testing.assert_array_equal(y[0, :, :, 0], [[0.25, 0.5, 0.25], [0.5, 1, 0.5],
                                                  [0.25, 0.5, 0.25]])
    dx = manual_dx(layer, jnp.ones((1, 2, 2, 1)), jnp.ones((1, 3, 3, 1)))
    np.testing.assert_array_equal(dx, np.ones((1, 2, 2, 1)))  # 4 windows × 1/4 each


# ------------------------------------------------------------- max-pool ties
@pytest.mark.parametrize(
    ("window", "stride", "padding"),
    [(2, 2, 0), (3, 1, 1), (3, 2, "SAME"), (2, 1, 0), ((3, 2), (2, 1), ((2, 0), (1, 1)))],
)
def test_ties_route_like_jax_grad(window, stride, padding):
    """Constant inputs (every window tied) and integer inputs (partial ties): the hand-written
    backward, and ``jax.vjp`` of the layer's forward, route like ``jax.grad`` of
    ``lax.reduce_window(max)``."""
    layer = layers.MaxPool2D(window, stride, padding)
    rng = np.random.default_rng(1)
    for x in (np.zeros((2, 6, 5, 2)), rng.integers(0, 3, size=(2, 6, 5, 2)).astype(float)):
        y, _ = forward(layer, {}, x)
        dy = rng.normal(size=y.shape)
        # overlapping windows sum in another order: rounding only, a misrouted dy is O(1)
        assert rel_error(manual_dx(layer, x, dy), reduce_window_vjp_dx(layer, x, dy)) <= 1e-14
        assert rel_error(vjp_dx(layer, x, dy), reduce_window_vjp_dx(layer, x, dy)) <= 1e-14


def test_tie_rule_is_first_in_row_major_order():
    """Overlapping 3×3 windows, stride 1, padding 1 on a constant 4×4 map: each window picks
    its first real entry in row-major order, −∞ padding never wins; counts accumulate."""
    layer = layers.MaxPool2D(3, stride=1, padding=1)
    dx = manual_dx(layer, jnp.zeros((1, 4, 4, 1)), jnp.ones((1, 4, 4, 1)))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[4, 2, 2, 0], [2, 1, 1, 0], [2, 1, 1, 0], [0, 0, 0, 0]])
    x = jnp.array([[0.0, 1.0], [1.0, 0.0]])[None, :, :, None]
    dx = manual_dx(layers.MaxPool2D(2), x, jnp.ones((1, 1, 1, 1)))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0, 1], [0, 0]])


def test_overlapping_windows_accumulate():
    x = jnp.array([[0.0, 0, 0], [0, 9, 0], [0, 0, 0]])[None, :, :, None]
    dx = manual_dx(layers.MaxPool2D(2, stride=1), x, jnp.ones((1, 2, 2, 1)))
    assert dx[0, 1, 1, 0] == 4  # the centre wins all four windows


def test_backward_routes_by_the_forward_arg_max_not_by_x():
    """The residual arg-max decides where dy goes: backward reads x's shape only, so an x
    recomputed with different rounding (as XLA may do when it fuses x's producer into
    both passes) cannot drop the gradient. Here every window's maximum is unique."""
    layer = layers.MaxPool2D(2, stride=1)
    x = np.random.default_rng(3).normal(size=(2, 5, 4, 3))
    _, residuals = forward(layer, {}, x)
    dy = np.ones((2, 4, 3, 3))
    dx = layer.backward({}, residuals, dy)[1]
    nudged = residuals._replace(x=np.nextafter(x, np.inf))
    np.testing.assert_array_equal(layer.backward({}, nudged, dy)[1], dx)
    np.testing.assert_array_equal(dx, vjp_dx(layer, x, dy))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_])
def test_max_pool_forward_is_reduce_window_max_for_nan_int_and_bool(dtype):
    """y is ``lax.reduce_window(max)``'s, NaN included (a NaN in a window makes its max NaN);
    the arg-max residual counts the window's offsets in the smallest integer dtype."""
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, size=(2, 5, 6, 2)).astype(dtype)
    if dtype == np.float64:
        x[0, 1, 2, 0] = x[1, 4, 5, 1] = np.nan
    for layer in (layers.MaxPool2D(2), layers.MaxPool2D(3, stride=2, padding="SAME")):
        y, residuals = forward(layer, {}, x)
        fill = -np.inf if dtype == np.float64 else (False if dtype == np.bool_ else -2**31)
        np.testing.assert_array_equal(y, xla_max_pool(layer, jnp.asarray(x), fill))
        assert y.dtype == dtype and residuals.first.dtype == np.int8
    assert forward(layers.MaxPool2D((12, 11)), {}, np.zeros((1, 12, 11, 1)))[1].first.dtype \
        == np.int16  # 132 offsets do not fit in int8


def test_large_tiling_windows_reduce_rows_with_the_same_rule():
    """Over ``UNROLLED_MAX_OFFSETS`` offsets, tiling windows take max and argmax of rows: the
    NumPy oracle's maxima (NaN included) and ``jax.vjp`` of ``lax.reduce_window(max)``'s
    routing, ties included (integer inputs); 19 × 21 leaves end rows no window reads."""
    rng = np.random.default_rng(5)
    layer = layers.MaxPool2D((9, 10))
    assert 9 * 10 > UNROLLED_MAX_OFFSETS
    for x in (rng.normal(size=(2, 19, 21, 2)), rng.integers(0, 3, size=(2, 19, 21, 2)) * 1.0):
        y, _ = forward(layer, {}, x)
        np.testing.assert_array_equal(y, naive_pool(layers.MaxPool2D, x, (9, 10), (9, 10),
                                                    ((0, 0), (0, 0))))
        dy = rng.normal(size=y.shape)
        assert rel_error(manual_dx(layer, x, dy), reduce_window_vjp_dx(layer, x, dy)) <= 1e-15
    x[1, 3, 4, 0] = np.nan
    np.testing.assert_array_equal(forward(layer, {}, x)[0], naive_pool(
        layers.MaxPool2D, x, (9, 10), (9, 10), ((0, 0), (0, 0))))


# ------------------------------------------------------------ backward vs vjp
def pool_grid():
    """Window 1–4 × stride 1–3 × padding (0, 1, 2, SAME, VALID) where padding ≤ window − 1."""
    cases = []
    for i, (kind, k, s, p) in enumerate(itertools.product(
            POOLS, range(1, 5), range(1, 4), [0, 1, 2, "SAME", "VALID"])):
        if isinstance(p, int) and p > k - 1:
            continue
        rng = np.random.default_rng(i)
        h, w, c = int(rng.integers(5, 7)), int(rng.integers(7, 9)), int(rng.integers(1, 5))
        layer = kind(k, s, p)
        cases.append((layer, random_case(layer, (h, w, c), (1, 3)[i % 2], seed=i)))
    return cases


def test_backward_matches_vjp_over_grid():
    cases = pool_grid()
    assert len(cases) == 2 * 3 * (3 + 4 + 5 + 5)  # padding ≤ window − 1, SAME, VALID
    assert_backward_matches_vjp(cases)


def test_backward_float32():
    cases = [(kind(3, 2, "SAME"), random_case(kind(3, 2, "SAME"), (9, 8, 3), 4, 7, np.float32))
             for kind in POOLS]
    assert manual_and_vjp(cases)[0][0][1].dtype == jnp.float32
    assert_backward_matches_vjp(cases, bound=1e-6)


@settings(max_examples=14)
@given(kind=st.sampled_from(POOLS), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 4), sw=st.integers(1, 4), data=st.data())
def test_property_backward_matches_vjp(kind, kh, kw, sh, sw, data):
    pads = tuple((data.draw(st.integers(0, k - 1)), data.draw(st.integers(0, k - 1)))
                 for k in (kh, kw))
    h = data.draw(st.integers(max(1, kh - sum(pads[0])), 9))
    w = data.draw(st.integers(max(1, kw - sum(pads[1])), 9))
    layer = kind((kh, kw), (sh, sw), pads)
    integer_valued = data.draw(st.booleans())  # integers make ties likely
    params, x, dy = random_case(layer, (h, w, data.draw(st.integers(1, 3))), 2,
                                seed=data.draw(st.integers(0, 99)))
    x = np.round(x) if integer_valued else x
    assert_backward_matches_vjp([(layer, (params, x, dy))])


# -------------------------------------------------------------------- Flatten
def test_flatten_order_shape_and_backward():
    x = np.arange(2 * 3 * 2 * 4, dtype=float).reshape(2, 3, 2, 4)
    y, res = forward(layers.Flatten(), {}, x)
    assert y.shape == (2, 24) and layers.Flatten().init(KEY, (3, 2, 4)) == ({}, {}, (24,))
    assert y[1, (2 * 2 + 1) * 4 + 3] == x[1, 2, 1, 3]  # index (h·W + w)·C + c
    dy = np.random.default_rng(0).normal(size=y.shape)
    np.testing.assert_array_equal(layers.Flatten().backward({}, res, dy)[1], dy.reshape(x.shape))
    np.testing.assert_array_equal(vjp_dx(layers.Flatten(), x, dy), dy.reshape(x.shape))


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", POOLS)
def test_bad_hyperparameters(kind):
    name = kind.__name__
    with pytest.raises(ValueError, match=re.escape(
            f"{name}: window must be a positive int or a pair of positive ints; got 0")):
        kind(0)
    with pytest.raises(ValueError, match=re.escape(
            f"{name}: stride must be a positive int or a pair of positive ints; got (2, 0)")):
        kind(2, (2, 0))
    with pytest.raises(ValueError, match=re.escape(f"{name}: padding must be")):
        kind(2, padding=-1)
    msg = (f"{name}: padding must be at most window − 1 = 1 on each side so every window "
           f"holds an input element; got width padding (0, 2) for window (2, 2)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        kind(2, padding=((1, 1), (0, 2)))


@pytest.mark.parametrize("kind", POOLS)
def test_bad_inputs(kind):
    name = kind.__name__
    msg = (f"{name}: input x must have rank 4 (batch, height, width, channels) NHWC; "
           f"got shape (4, 4) (rank 2)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        kind(2).check({}, {}, jnp.ones((4, 4)), CTX)
    msg = (f"{name}: output height ⌊(W − F + P_lo + P_hi)/S⌋ + 1 = ⌊(2 − 3 + 0 + 0)/3⌋ + 1 = 0 "
           f"is smaller than 1 (input height W=2, kernel F=3, stride S=3, padding (0, 0))")
    with pytest.raises(ValueError, match=re.escape(msg)):
        kind(3).init(KEY, (2, 8, 1))
    with pytest.raises(ValueError, match=re.escape(f"{name}: input_shape must be (height, "
                                                   f"width, channels)")):
        kind(2).init(KEY, (8, 8))


def test_flatten_bad_input():
    msg = "Flatten: input x must have rank >= 2 (batch, ...); got shape (5,) (rank 1)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        layers.Flatten().check({}, {}, jnp.ones((5,)), CTX)
