"""``Flatten``: images (batch, H, W, C) to vectors (batch, H·W·C) so a CNN can end in Dense."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax

from .base import Layer, check_int


class FlattenResiduals(NamedTuple):
    x: jax.Array  # the layer's input (backward reads only its shape)


@dataclasses.dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``y[n] = x[n].reshape(-1)`` in row-major (C) order: NHWC gives index ``(h·W + w)·C + c``.

    Shapes: x (batch, d1, …, dk), y (batch, d1·…·dk).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> Flatten().init(jax.random.key(0), (7, 7, 16))
      ({}, {}, (784,))
      >>> Flatten().forward({}, {}, jnp.zeros((2, 3, 3, 4)), Context())[0].shape
      (2, 36)
    """

    def init(self, key, input_shape, dtype=None):
        del key, dtype
        if len(tuple(input_shape)) < 1:
            raise ValueError(
                f"Flatten: input_shape must have at least one axis (batch axis excluded); "
                f"got {tuple(input_shape)}"
            )
        for axis, size in enumerate(input_shape):
            check_int("Flatten", f"input_shape[{axis}]", size)
        return {}, {}, (math.prod(input_shape),)

    def check(self, params, state, x, ctx):
        super().check(params, state, x, ctx)
        if x.ndim < 2:
            raise ValueError(
                f"Flatten: input x must have rank >= 2 (batch, ...); got shape "
                f"{tuple(x.shape)} (rank {x.ndim})"
            )

    def forward(self, params, state, x, ctx):
        y = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also for an empty batch
        return y, state, FlattenResiduals(x=x)

    def backward(self, params, residuals, dy):
        """dx = dy reshaped back to x's shape: (batch, d1·…·dk) → (batch, d1, …, dk)."""
        return {}, dy.reshape(residuals.x.shape)
