"""Row, column and augmented conventions: exact round trips, equal outputs and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import Sequential, layers, losses
from jaxbp.conventions import (
    augment,
    augmented_forward,
    augmented_to_column,
    augmented_to_row,
    column_forward,
    column_to_augmented,
    column_to_row,
    looped_forward,
    row_forward,
    row_to_augmented,
    row_to_column,
)
from jaxbp.layers.base import call

from .helpers import max_tree_rel_error, rel_error


def _row_params(n_in=3, n_out=4, seed=0):
    kw, kb = jax.random.split(jax.random.key(seed))
    return {
        "W": jax.random.normal(kw, (n_in, n_out)),
        "b": jax.random.normal(kb, (n_out,)),
    }


def test_round_trips_are_exact():
    row = _row_params()
    col = row_to_column(row)
    assert col["W"].shape == (4, 3) and col["b"].shape == (4,)
    Wb = column_to_augmented(col)
    assert Wb.shape == (4, 4)
    np.testing.assert_array_equal(Wb[:, :3], row["W"].T)
    np.testing.assert_array_equal(Wb[:, 3], row["b"])
    for back in (column_to_row(col), augmented_to_row(Wb), column_to_row(augmented_to_column(Wb))):
        assert sorted(back) == ["W", "b"]
        np.testing.assert_array_equal(back["W"], row["W"])
        np.testing.assert_array_equal(back["b"], row["b"])
    np.testing.assert_array_equal(row_to_augmented(row), Wb)


def test_no_bias_layer_converts_without_b():
    row = {"W": jnp.arange(6.0).reshape(2, 3)}
    col = row_to_column(row)
    assert sorted(col) == ["W"]
    np.testing.assert_array_equal(column_to_row(col)["W"], row["W"])
    x = jnp.ones((5, 2))
    np.testing.assert_array_equal(row_forward(row, x), column_forward(col, x.T).T)
    with pytest.raises(ValueError, match=r"column_to_augmented: params has no 'b'.*use_bias"):
        column_to_augmented(col)


def test_three_forwards_agree_with_dense_layer():
    row = _row_params()
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y_dense, _, _ = call(layers.Dense(4), "layers[0]", row, {}, x, layers.Context())
    np.testing.assert_array_equal(row_forward(row, x), y_dense)
    z_col = column_forward(row_to_column(row), x.T)
    z_aug = augmented_forward(row_to_augmented(row), x.T)
    assert z_col.shape == z_aug.shape == (4, 5)
    assert rel_error(z_col.T, y_dense) <= 1e-14
    assert rel_error(z_aug.T, y_dense) <= 1e-14
    assert rel_error(looped_forward(row, x), y_dense) <= 1e-14


def test_gradients_convert_like_params():
    """The column-form loss's jax.grad is row_to_column of the hand-written row gradient."""
    row = _row_params()
    x = jax.random.normal(jax.random.key(2), (5, 3))
    t = jax.random.normal(jax.random.key(3), (5, 4))
    net = Sequential([layers.Dense(4)], loss=losses.HalfSquaredError())
    manual = net.manual_backward([row], x, t)[0]

    def column_loss(col):
        r = column_forward(col, x.T) - t.T
        return 0.5 * jnp.sum(r * r) / x.shape[0]

    def augmented_loss(Wb):
        r = augmented_forward(Wb, x.T) - t.T
        return 0.5 * jnp.sum(r * r) / x.shape[0]

    col_grad = jax.grad(column_loss)(row_to_column(row))
    aug_grad = jax.grad(augmented_loss)(row_to_augmented(row))
    assert max_tree_rel_error(col_grad, row_to_column(manual)) <= 1e-12
    assert rel_error(aug_grad, row_to_augmented(manual)) <= 1e-12


def test_augment_appends_ones():
    a = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(augment(a), [[0, 1], [2, 3], [4, 5], [1, 1]])


@pytest.mark.parametrize(
    ("fn", "arg", "match"),
    [
        (row_to_column, {"W": jnp.ones(3)}, r"row_to_column: params\['W'\] must be a matrix"),
        (row_to_column, {"b": jnp.ones(3)}, r"row_to_column: params must .* 'W'; got \['b'\]"),
        (
            row_to_column,
            {"W": jnp.ones((2, 3)), "b": jnp.ones(2)},
            r"row_to_column: params\['b'\] must have shape \(3,\) .* \(2, 3\); got \(2,\)",
        ),
        (
            column_to_row,
            {"W": jnp.ones((2, 3)), "b": jnp.ones(3)},
            r"column_to_row: params\['b'\] must have shape \(2,\) .*; got \(3,\)",
        ),
        (augmented_to_column, jnp.ones((2, 1)), r"augmented_to_column: Wb must have at least 2"),
        (augmented_to_column, jnp.ones(4), r"augmented_to_column: Wb must be a matrix"),
        (augment, jnp.ones(3), r"augment: a must be a matrix .*got shape \(3,\)"),
    ],
)
def test_bad_input_raises(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)


_ROW = {"W": jnp.ones((2, 3)), "b": jnp.ones(3)}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: row_forward(_ROW, jnp.ones((1, 5))),
         "row_forward: x must have shape (batch, n_in) = (*, 2) for weights of shape (2, 3); "
         "got (1, 5)"),
        (lambda: column_forward(row_to_column(_ROW), jnp.ones((5, 1))),
         "column_forward: a must have shape (n_in, batch) = (2, *) for weights of shape (3, 2); "
         "got (5, 1)"),
        (lambda: augmented_forward(row_to_augmented(_ROW), jnp.ones((5, 1))),
         "augmented_forward: a must have shape (n_in, batch) = (2, *) for weights of shape "
         "(3, 3); got (5, 1)"),
        (lambda: looped_forward(_ROW, jnp.ones((1, 5))),
         "looped_forward: x must have shape (batch, n_in) = (*, 2)"),
        (lambda: row_to_column({"W": [[1.0, 2.0]]}),
         "row_to_column: params['W'] must be an array (jax.numpy or numpy); got list"),
    ],
)
def test_forwards_check_their_inputs(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
