"""Fully-connected layer in the row-vector convention ``y = x @ W + b``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import Layer, check_array, check_int, check_params, default_float_dtype, per_feature

INITIALIZERS = {
    "lecun_normal": jax.nn.initializers.lecun_normal,
    "glorot_normal": jax.nn.initializers.glorot_normal,
    "he_normal": jax.nn.initializers.he_normal,
}


def check_init(layer: str, init) -> str:
    """``init`` if it names one of ``INITIALIZERS``; a ValueError naming ``layer`` otherwise."""
    if init not in INITIALIZERS:
        raise ValueError(f"{layer}: init must be one of {sorted(INITIALIZERS)}; got {init!r}")
    return init


class DenseResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (batch, …, in)


@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Layer):
    """``y = x @ W + b`` with ``W`` of shape (in, out) and ``b`` of shape (out,).

    Row-vector convention (tutorial 001, ``A = B·W``): a batch of samples stacks
    as rows of ``x``. ``W[i, j]`` connects input unit i to output unit j, so
    ``W`` is the transpose of the column-vector ``W^l`` of tutorial 000.

    Args:
      units: number of output features.
      init: "lecun_normal" (default), "glorot_normal" or "he_normal" for ``W``;
        ``b`` starts at zero.
      use_bias: False gives ``y = x @ W`` and params ``{"W"}`` only (the d2l MLP).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> layer = Dense(3)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (2,))
      >>> y, state, res = layer.forward(params, state, jnp.ones((4, 2)), Context())
      >>> y.shape, out_shape
      ((4, 3), (3,))
      >>> layer.init(jax.random.key(0), (5, 2))[2]  # (time, features): any leading axes
      (5, 3)
    """

    units: int
    init_scheme: str = dataclasses.field(default="lecun_normal", metadata={"argument": "init"})
    use_bias: bool = True

    decay_keys = ("W",)

    def __init__(self, units: int, init: str = "lecun_normal", use_bias: bool = True):
        check_int("Dense", "units", units)
        object.__setattr__(self, "units", int(units))
        object.__setattr__(self, "init_scheme", check_init("Dense", init))
        object.__setattr__(self, "use_bias", bool(use_bias))

    def init(self, key, input_shape, dtype=None):
        input_shape = tuple(input_shape)
        if len(input_shape) < 1:
            raise ValueError(
                f"Dense: input_shape must be (…, features) (batch axis excluded); got "
                f"{input_shape}"
            )
        for axis, size in enumerate(input_shape):
            check_int("Dense", f"input_shape[{axis}]", size)
        dtype = dtype or default_float_dtype()
        W = INITIALIZERS[self.init_scheme]()(key, (input_shape[-1], self.units), dtype)
        params = {"W": W}
        if self.use_bias:
            params["b"] = jnp.zeros((self.units,), dtype)
        return params, {}, (*input_shape[:-1], self.units)

    def check(self, params, state, x, ctx):
        check_params("Dense", params, self._expected())
        check_params("Dense", state, {}, "state")
        W = params["W"]
        check_array("Dense", "input x", x)
        if x.ndim < 2 or x.shape[-1] != W.shape[0]:
            raise ValueError(
                f"Dense: input x must have shape (batch, …, {W.shape[0]}) to match W of shape "
                f"{tuple(W.shape)}; got x shape {tuple(x.shape)}"
            )

    def forward(self, params, state, x, ctx):
        y = x @ params["W"]
        if self.use_bias:
            y = y + per_feature(params["b"], y.ndim)
        return y, state, DenseResiduals(x=x)

    def _expected(self):
        """The params' keys and shapes (``check_params``); any number of inputs."""
        expected = {"W": ((None, self.units), "(in, units)")}
        if self.use_bias:
            expected["b"] = ((self.units,), "(units,)")
        return expected

    def backward(self, params, residuals, dy):
        """Chain rule through ``y = x @ W + b``.

        Shapes: x (batch, in), W (in, out), b (out,), dy (batch, out).

          dW = xᵀ dy          (in, out)    ∂L/∂W_ij = Σ_n x_ni dy_nj
          db = Σ_batch dy     (out,)
          dx = dy Wᵀ          (batch, in)  ∂L/∂x_ni = Σ_j dy_nj W_ij

        Inputs (batch, …, in) of any rank apply the same W at every position, so
        the sums over n run over every leading axis: dW = Σ_{n,…} x[n,…]ᵀ dy[n,…].
        """
        x = residuals.x
        lead = tuple(range(x.ndim - 1))  # the batch axis and any others before the features
        dparams = {"W": jnp.tensordot(x, dy, axes=(lead, lead))}
        if self.use_bias:
            dparams["b"] = jnp.sum(dy, axis=lead)
        dx = dy @ params["W"].T
        return dparams, dx
