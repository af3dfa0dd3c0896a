"""Exact conversions between the three ways tutorials write a dense layer.

jaxbp uses one convention; the tutorials use three. For a layer with ``n_in``
inputs and ``n_out`` neurons:

  row (jaxbp)  y = x @ W + b            W (n_in, n_out);  x (batch, n_in), one sample per row
  column       z = W a + b              W (n_out, n_in);  a (n_in, batch), one sample per column
  augmented    z = [W | b] · [a; 1]     [W | b] (n_out, n_in + 1);  [a; 1] (n_in + 1, batch)

``w_jk`` of the column convention connects input k to neuron j, so the column
``W`` is the transpose of the row ``W``, and the augmented matrix is the column
``W`` with ``b`` appended as its last column. The conversions only transpose and
concatenate, so they are exact both ways (no rounding), and since they are
linear they convert gradients too: ``row_to_column(dparams)`` is the
column-convention gradient.

Example:
  >>> import jax.numpy as jnp
  >>> row = {"W": jnp.array([[1., 2., 3.], [4., 5., 6.]]), "b": jnp.array([7., 8., 9.])}
  >>> column_to_augmented(row_to_column(row)).tolist()
  [[1.0, 4.0, 7.0], [2.0, 5.0, 8.0], [3.0, 6.0, 9.0]]
  >>> x = jnp.array([[1., 1.]])
  >>> bool(jnp.array_equal(row_forward(row, x), column_forward(row_to_column(row), x.T).T))
  True
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .layers.base import check_array


def _check_matrix(fn: str, arg: str, W) -> None:
    check_array(fn, arg, W)
    if jnp.ndim(W) != 2:
        raise ValueError(f"{fn}: {arg} must be a matrix (rank 2); got shape {jnp.shape(W)}")


def _check_dense(fn: str, params, out_axis: int) -> None:
    if not isinstance(params, dict) or "W" not in params:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{fn}: params must be a Dense params dict with key 'W'; got {got}")
    W = params["W"]
    _check_matrix(fn, "params['W']", W)
    if "b" in params and jnp.shape(params["b"]) != (W.shape[out_axis],):
        raise ValueError(
            f"{fn}: params['b'] must have shape ({W.shape[out_axis]},) for W of shape "
            f"{tuple(W.shape)}; got {jnp.shape(params['b'])}"
        )


def _check_inputs(fn: str, arg: str, a, axis: int, n_in: int, layout: str, weights) -> None:
    """``a`` must be a matrix whose axis ``axis`` has the ``n_in`` inputs of ``weights``."""
    _check_matrix(fn, arg, a)
    if a.shape[axis] != n_in:
        raise ValueError(f"{fn}: {arg} must have shape {layout} = "
                         f"{(n_in, '*') if axis == 0 else ('*', n_in)} for weights of shape "
                         f"{tuple(weights.shape)}; got {tuple(a.shape)}".replace("'*'", "*"))


def row_to_column(params: dict) -> dict:
    """Row-convention ``{"W": (n_in, n_out), "b"}`` → column ``{"W": (n_out, n_in), "b"}``.

    ``b`` is shared unchanged; a layer without ``b`` (``Dense(use_bias=False)``)
    stays without it.
    """
    _check_dense("row_to_column", params, out_axis=1)
    return {**params, "W": params["W"].T}


def column_to_row(params: dict) -> dict:
    """Column-convention ``{"W": (n_out, n_in), "b"}`` → row ``{"W": (n_in, n_out), "b"}``."""
    _check_dense("column_to_row", params, out_axis=0)
    return {**params, "W": params["W"].T}


def column_to_augmented(params: dict):
    """Column ``{"W": (n_out, n_in), "b": (n_out,)}`` → ``[W | b]`` of shape (n_out, n_in + 1)."""
    _check_dense("column_to_augmented", params, out_axis=0)
    if "b" not in params:
        raise ValueError(
            "column_to_augmented: params has no 'b' to fold into W (a layer built with "
            "use_bias=False); got keys ['W']"
        )
    return jnp.concatenate([params["W"], params["b"][:, None]], axis=1)


def augmented_to_column(Wb) -> dict:
    """``[W | b]`` of shape (n_out, n_in + 1) → column ``{"W": (n_out, n_in), "b": (n_out,)}``."""
    _check_matrix("augmented_to_column", "Wb", Wb)
    if Wb.shape[1] < 2:
        raise ValueError(
            f"augmented_to_column: Wb must have at least 2 columns (weights and bias); got "
            f"shape {tuple(Wb.shape)}"
        )
    return {"W": Wb[:, :-1], "b": Wb[:, -1]}


def row_to_augmented(params: dict):
    """Row-convention Dense params → ``[W | b]`` (n_out, n_in + 1)."""
    return column_to_augmented(row_to_column(params))


def augmented_to_row(Wb) -> dict:
    """``[W | b]`` (n_out, n_in + 1) → row-convention ``{"W": (n_in, n_out), "b": (n_out,)}``."""
    return column_to_row(augmented_to_column(Wb))


def augment(a):
    """Append the constant input 1 to column activations: (n_in, batch) → (n_in + 1, batch)."""
    _check_matrix("augment", "a", a)
    return jnp.concatenate([a, jnp.ones((1, a.shape[1]), a.dtype)], axis=0)


def row_forward(params: dict, x):
    """``y = x @ W + b``: x (batch, n_in) → y (batch, n_out). The same as ``Dense.forward``."""
    _check_dense("row_forward", params, out_axis=1)
    W = params["W"]
    _check_inputs("row_forward", "x", x, 1, W.shape[0], "(batch, n_in)", W)
    y = x @ params["W"]
    return y + params["b"][None, :] if "b" in params else y


def column_forward(params: dict, a):
    """``z = W a + b``: a (n_in, batch) with one sample per column → z (n_out, batch)."""
    _check_dense("column_forward", params, out_axis=0)
    W = params["W"]
    _check_inputs("column_forward", "a", a, 0, W.shape[1], "(n_in, batch)", W)
    z = params["W"] @ a
    return z + params["b"][:, None] if "b" in params else z


def augmented_forward(Wb, a):
    """``z = [W | b] · [a; 1]``: a (n_in, batch) → z (n_out, batch)."""
    _check_matrix("augmented_forward", "Wb", Wb)
    _check_inputs("augmented_forward", "a", a, 0, Wb.shape[1] - 1, "(n_in, batch)", Wb)
    return Wb @ augment(a)


def looped_forward(params: dict, x) -> np.ndarray:
    """The row-convention layer one neuron at a time: ``y_nj = Σ_k x_nk W_kj + b_j``.

    A Python loop over samples n and neurons j, each a scalar weighted sum —
    the same numbers as ``row_forward``, written the way the per-neuron formula
    reads. It exists to be timed against the matrix form.

    Shapes: x (batch, n_in), W (n_in, n_out), b (n_out,); returns (batch, n_out).
    """
    _check_dense("looped_forward", params, out_axis=1)
    _check_inputs("looped_forward", "x", x, 1, params["W"].shape[0], "(batch, n_in)",
                  params["W"])
    x, W = np.asarray(x), np.asarray(params["W"])
    b = np.asarray(params["b"]) if "b" in params else np.zeros(W.shape[1], W.dtype)
    y = np.empty((x.shape[0], W.shape[1]), np.result_type(x, W))
    for n in range(x.shape[0]):
        for j in range(W.shape[1]):
            z = b[j]
            for k in range(W.shape[0]):
                z = z + x[n, k] * W[k, j]
            y[n, j] = z
    return y
