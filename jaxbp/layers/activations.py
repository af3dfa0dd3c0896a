"""Element-wise activations and the softmax layer.

Each activation maps ``x`` of any shape to ``y`` of the same shape. Its backward is
``dx = dy ⊙ f'(x)``, with ``f'`` written from whichever stored value gives the
cheapest exact formula (``σ' = y(1 − y)``, ``tanh' = 1 − y²``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from .base import Layer, check_real


class OutputResiduals(NamedTuple):
    y: jax.Array  # the activation's output, shape of x


class InputResiduals(NamedTuple):
    x: jax.Array  # the activation's input, shape of x


class NoResiduals(NamedTuple):
    pass


class Elementwise(Layer):
    """``y = f(x)`` entry by entry: no params, no state, ``y`` and ``dx`` of ``x``'s shape.

    Subclasses write ``forward`` (storing whichever of x or y gives the cheapest
    exact derivative) and ``backward`` as ``dx = dy ⊙ f'``; shapes, ``init`` and
    ``check`` come from here (stax's ``elementwise``).
    """


@dataclasses.dataclass(frozen=True, repr=False)
class Identity(Elementwise):
    """``y = x``; ``dx = dy``."""

    def forward(self, params, state, x, ctx):
        return x, state, NoResiduals()

    def backward(self, params, residuals, dy):
        """dx = dy (shape of x)."""
        return {}, dy


@dataclasses.dataclass(frozen=True, repr=False)
class Sigmoid(Elementwise):
    """``y = σ(x) = 1 / (1 + e^{-x})``."""

    def forward(self, params, state, x, ctx):
        y = jax.nn.sigmoid(x)
        return y, state, OutputResiduals(y=y)

    def backward(self, params, residuals, dy):
        """dx = dy ⊙ σ'(x) = dy ⊙ y ⊙ (1 − y); all arrays have the shape of x."""
        y = residuals.y
        return {}, dy * y * (1 - y)


@dataclasses.dataclass(frozen=True, repr=False)
class Tanh(Elementwise):
    """``y = tanh(x)``."""

    def forward(self, params, state, x, ctx):
        y = jnp.tanh(x)
        return y, state, OutputResiduals(y=y)

    def backward(self, params, residuals, dy):
        """dx = dy ⊙ (1 − y²); all arrays have the shape of x."""
        y = residuals.y
        return {}, dy * (1 - y * y)


@dataclasses.dataclass(frozen=True, repr=False)
class ReLU(Elementwise):
    """``y = max(x, 0)`` (``jax.nn.relu``, whose derivative at 0 is taken as 0)."""

    def forward(self, params, state, x, ctx):
        y = jax.nn.relu(x)
        return y, state, OutputResiduals(y=y)

    def backward(self, params, residuals, dy):
        """dx = dy ⊙ 1[x > 0] = dy ⊙ 1[y > 0]; all arrays have the shape of x.

        ``x > 0`` exactly when ``y > 0``, so the mask is read off the output, which
        the next layer keeps anyway: the pre-activation need not be stored at all.
        """
        return {}, jnp.where(residuals.y > 0, dy, 0)


@dataclasses.dataclass(frozen=True, repr=False)
class LeakyReLU(Elementwise):
    """``y = x`` for x ≥ 0, ``y = s·x`` otherwise (s = negative_slope)."""

    negative_slope: float = 0.01

    def __post_init__(self):
        slope = check_real("LeakyReLU", "negative_slope", self.negative_slope)
        object.__setattr__(self, "negative_slope", slope)

    def forward(self, params, state, x, ctx):
        y = jnp.where(x >= 0, x, self.negative_slope * x)
        return y, state, InputResiduals(x=x)

    def backward(self, params, residuals, dy):
        """dx = dy for x ≥ 0 and s·dy otherwise; all arrays have the shape of x."""
        return {}, jnp.where(residuals.x >= 0, dy, self.negative_slope * dy)


@dataclasses.dataclass(frozen=True, repr=False)
class ELU(Elementwise):
    """``y = x`` for x > 0, ``y = α(eˣ − 1)`` otherwise."""

    alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "alpha", check_real("ELU", "alpha", self.alpha))

    def forward(self, params, state, x, ctx):
        negative = self.alpha * jnp.expm1(jnp.where(x > 0, 0, x))  # no overflow for x > 0
        y = jnp.where(x > 0, x, negative)
        return y, state, InputResiduals(x=x)

    def backward(self, params, residuals, dy):
        """dx = dy for x > 0 and dy ⊙ α eˣ otherwise; all arrays have the shape of x."""
        x = residuals.x
        return {}, jnp.where(x > 0, dy, dy * self.alpha * jnp.exp(jnp.where(x > 0, 0, x)))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_INV_SQRT_2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


@dataclasses.dataclass(frozen=True, repr=False)
class GELU(Elementwise):
    """Gaussian error linear unit ``y = x Φ(x)``.

    ``approximate=True`` (default, as ``jax.nn.gelu``) uses
    ``y = ½x(1 + tanh(u))`` with ``u = √(2/π)(x + 0.044715x³)``; False uses the
    exact ``Φ(x) = ½(1 + erf(x/√2))``.
    """

    approximate: bool = True

    def __post_init__(self):
        if not isinstance(self.approximate, (bool, np.bool_)):
            raise ValueError(f"GELU: approximate must be True (the tanh form) or False (erf); "
                             f"got {self.approximate!r}")
        object.__setattr__(self, "approximate", bool(self.approximate))

    def forward(self, params, state, x, ctx):
        if self.approximate:
            u = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
            y = 0.5 * x * (1 + jnp.tanh(u))
        else:
            y = 0.5 * x * (1 + erf(x * _INV_SQRT_2))
        return y, state, InputResiduals(x=x)

    def backward(self, params, residuals, dy):
        """dx = dy ⊙ y'(x); all arrays have the shape of x.

        tanh form: y' = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²), t = tanh(u).
        exact:     y' = Φ(x) + x φ(x),  φ(x) = e^{−x²/2} / √(2π).
        """
        x = residuals.x
        if self.approximate:
            t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
            du_dx = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            dydx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx
        else:
            cdf = 0.5 * (1 + erf(x * _INV_SQRT_2))
            pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
            dydx = cdf + x * pdf
        return {}, dy * dydx


@dataclasses.dataclass(frozen=True, repr=False)
class Softplus(Elementwise):
    """``y = log(1 + eˣ)``, computed stably as ``logaddexp(x, 0)``."""

    def forward(self, params, state, x, ctx):
        return jnp.logaddexp(x, 0.0), state, InputResiduals(x=x)

    def backward(self, params, residuals, dy):
        """dx = dy ⊙ σ(x); all arrays have the shape of x."""
        return {}, dy * jax.nn.sigmoid(residuals.x)


@dataclasses.dataclass(frozen=True, repr=False)
class Softmax(Layer):
    """``y_i = e^{x_i} / Σ_j e^{x_j}`` over the last axis (a layer, not a loss).

    Its Jacobian is ``∂y_i/∂x_j = y_i(δ_ij − y_j)``, so the vector-Jacobian
    product never forms the (K, K) matrix.
    """

    def forward(self, params, state, x, ctx):
        y = jax.nn.softmax(x, axis=-1)
        return y, state, OutputResiduals(y=y)

    def backward(self, params, residuals, dy):
        """dx_i = Σ_j dy_j y_j(δ_ji − y_i) = y_i (dy_i − Σ_j dy_j y_j).

        Shapes: y, dy, dx are (..., K); the sum runs over the last axis.
        """
        y = residuals.y
        return {}, y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True))
