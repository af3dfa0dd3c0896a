"""Fully-connected layer in the row-vector convention ``y = x @ W + b``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import Layer, check_int, check_params, check_rank, default_float_dtype

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
    x: jax.Array  # the layer's input, (batch, in)


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
      >>> layer = Dense(3)
      >>> params, out_shape = layer.init(jax.random.key(0), (2,))
      >>> y, res = layer.forward(params, jnp.ones((4, 2)))
      >>> y.shape, out_shape
      ((4, 3), (3,))
    """

    units: int
    init_scheme: str = "lecun_normal"
    use_bias: bool = True

    decay_keys = ("W",)

    def __init__(self, units: int, init: str = "lecun_normal", use_bias: bool = True):
        check_int("Dense", "units", units)
        object.__setattr__(self, "units", int(units))
        object.__setattr__(self, "init_scheme", check_init("Dense", init))
        object.__setattr__(self, "use_bias", bool(use_bias))

    def init(self, key, input_shape, dtype=None):
        input_shape = tuple(input_shape)
        if len(input_shape) != 1:
            raise ValueError(
                f"Dense: input_shape must be (features,) (batch axis excluded); got "
                f"{input_shape}. Put a Flatten() before Dense for image inputs."
            )
        check_int("Dense", "input_shape[0] (features)", input_shape[0])
        dtype = dtype or default_float_dtype()
        W = INITIALIZERS[self.init_scheme]()(key, (input_shape[0], self.units), dtype)
        params = {"W": W}
        if self.use_bias:
            params["b"] = jnp.zeros((self.units,), dtype)
        return params, (self.units,)

    def forward(self, params, x):
        check_params("Dense", params, self._expected())
        W = params["W"]
        check_rank("Dense", "input x", x, 2, "(batch, features)")
        if x.shape[1] != W.shape[0]:
            raise ValueError(
                f"Dense: input x has {x.shape[1]} features but W expects {W.shape[0]} "
                f"(W shape {tuple(W.shape)}); got x shape {tuple(x.shape)}, expected "
                f"(batch, {W.shape[0]})"
            )
        y = x @ W
        if self.use_bias:
            y = y + params["b"][None, :]
        return y, DenseResiduals(x=x)

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
        """
        x = residuals.x
        dparams = {"W": x.T @ dy}
        if self.use_bias:
            dparams["b"] = jnp.sum(dy, axis=0)
        dx = dy @ params["W"].T
        return dparams, dx
