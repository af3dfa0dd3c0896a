"""Normalisation over the feature axis: ``LayerNorm`` and ``RMSNorm``.

Both normalise each sample (each row of the last axis, of size D) on its own, so
they work on any input ``(batch, …, D)`` and never mix samples. Their scale
(and LayerNorm's offset) are parameters of shape ``(D,)`` that weight decay
leaves alone. The forward stores only what the backward needs: the input and
one or two statistics per row, never the normalised copy (as llm.c's
``layernorm_forward`` keeps ``mean`` and ``rstd``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from .base import (
    Layer,
    check_array,
    check_params,
    check_real,
    default_float_dtype,
    is_int,
    per_feature,
)


def _check_shape(layer: str, input_shape) -> tuple[int, ...]:
    """``input_shape`` (batch axis excluded, features last) as ints; a ValueError otherwise."""
    input_shape = tuple(input_shape)
    if len(input_shape) < 1 or not all(is_int(s) and s >= 1 for s in input_shape):
        raise ValueError(f"{layer}: input_shape must be (…, features) with positive sizes "
                         f"(batch axis excluded); got {input_shape}")
    return tuple(int(s) for s in input_shape)


def _check_input(layer: str, x, features: int) -> None:
    check_array(layer, "input x", x)
    if x.ndim < 2 or x.shape[-1] != features:
        raise ValueError(
            f"{layer}: input x must have shape (batch, …, {features}) to match scale of shape "
            f"({features},); got x shape {tuple(x.shape)}"
        )


class _RowNorm(Layer):
    """What LayerNorm and RMSNorm share: ε > 0, per-feature params of shape (D,), checks."""

    starts: ClassVar[dict[str, float]]  # each param's name and initial value

    def __post_init__(self):
        eps = check_real(self.name, "eps", self.eps, 0, strict=True)
        object.__setattr__(self, "eps", eps)

    def init(self, key, input_shape, dtype=None):
        del key
        input_shape = _check_shape(self.name, input_shape)
        dtype = dtype or default_float_dtype()
        params = {k: jnp.full((input_shape[-1],), v, dtype) for k, v in self.starts.items()}
        return params, {}, input_shape

    def check(self, params, state, x, ctx) -> None:
        """The params' keys and shapes, and ``x``'s last axis against them."""
        d = params["scale"].shape[0] if isinstance(params, dict) and "scale" in params else None
        check_params(self.name, params, {k: ((d,), "(features,)") for k in self.starts})
        check_params(self.name, state, {}, "state")
        _check_input(self.name, x, d)


class LayerNormResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (…, D)
    mean: jax.Array  # μ per row, (…, 1)
    rstd: jax.Array  # 1/√(σ² + ε) per row, (…, 1)


@dataclasses.dataclass(frozen=True, repr=False)
class LayerNorm(_RowNorm):
    """``y = γ ⊙ (x − μ) / √(σ² + ε) + β`` over the last axis (Ba, Kiros and Hinton, 2016).

    For each row of D features: ``μ = mean(x)``, ``σ² = mean((x − μ)²)`` (the
    biased variance, as PyTorch's ``nn.LayerNorm``), ``x̂ = (x − μ)·rstd`` with
    ``rstd = 1/√(σ² + ε)``. Params ``{"scale": γ (D,), "offset": β (D,)}``
    start at ones and zeros.

    Args:
      eps: ε > 0 added to the variance.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LayerNorm()
      >>> from jaxbp.layers import Context
      >>> params, state, out_shape = layer.init(jax.random.key(0), (3,))
      >>> y, state, res = layer.forward(params, state, jnp.array([[1.0, 2.0, 3.0]]), Context())
      >>> [round(float(v), 4) for v in y[0]]
      [-1.2247, 0.0, 1.2247]
    """

    eps: float = 1e-5

    starts = {"scale": 1.0, "offset": 0.0}

    def forward(self, params, state, x, ctx):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        rstd = jax.lax.rsqrt(var + self.eps)
        gamma, beta = (per_feature(params[k], x.ndim) for k in ("scale", "offset"))
        y = (x - mean) * rstd * gamma + beta
        return y, state, LayerNormResiduals(x=x, mean=mean, rstd=rstd)

    def backward(self, params, residuals, dy):
        """Chain rule through the row's mean and variance.

        Shapes: x, dy (…, D); μ, rstd (…, 1); γ, β (D,). With ``x̂ = (x − μ)·rstd``
        and ``dx̂ = dy ⊙ γ`` (∂L/∂x̂):

          dγ = Σ_rows dy ⊙ x̂                      (D,)
          dβ = Σ_rows dy                           (D,)
          dx = rstd ⊙ (dx̂ − mean(dx̂) − x̂ ⊙ mean(dx̂ ⊙ x̂))   (…, D)

        The two means run over the row's D features. They come from
        ``∂x̂_j/∂x_i = rstd·(δ_ij − 1/D − x̂_i x̂_j / D)``: x_i moves the row's mean
        (the ``− 1/D`` term) and its variance (``∂σ²/∂x_i = 2(x_i − μ)/D``, the
        ``x̂_i x̂_j`` term).
        """
        x, mean, rstd = residuals
        x_hat = (x - mean) * rstd
        rows = tuple(range(dy.ndim - 1))
        dparams = {"scale": jnp.sum(dy * x_hat, axis=rows), "offset": jnp.sum(dy, axis=rows)}
        dx_hat = dy * per_feature(params["scale"], dy.ndim)
        dx = rstd * (dx_hat - jnp.mean(dx_hat, axis=-1, keepdims=True)
                     - x_hat * jnp.mean(dx_hat * x_hat, axis=-1, keepdims=True))
        return dparams, dx


class RMSNormResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (…, D)
    rrms: jax.Array  # 1/√(mean(x²) + ε) per row, (…, 1)


@dataclasses.dataclass(frozen=True, repr=False)
class RMSNorm(_RowNorm):
    """``y = γ ⊙ x / √(mean(x²) + ε)`` over the last axis (Zhang and Sennrich, 2019).

    LayerNorm without the mean and the offset: each row is divided by its root
    mean square. Params ``{"scale": γ (D,)}`` start at ones.

    Args:
      eps: ε > 0 added to the mean square.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = RMSNorm(eps=0.0001)
      >>> from jaxbp.layers import Context
      >>> params, state, _ = layer.init(jax.random.key(0), (2,))
      >>> y, _, _ = layer.forward(params, state, jnp.array([[3.0, 4.0]]), Context())
      >>> [round(float(v), 4) for v in y[0]]
      [0.8485, 1.1314]
    """

    eps: float = 1e-6

    starts = {"scale": 1.0}

    def forward(self, params, state, x, ctx):
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = x * rrms * per_feature(params["scale"], x.ndim)
        return y, state, RMSNormResiduals(x=x, rrms=rrms)

    def backward(self, params, residuals, dy):
        """Chain rule through the row's mean square.

        Shapes: x, dy (…, D); rrms (…, 1); γ (D,). With ``x̂ = x·rrms`` and
        ``dx̂ = dy ⊙ γ``:

          dγ = Σ_rows dy ⊙ x̂                      (D,)
          dx = rrms ⊙ (dx̂ − x̂ ⊙ mean(dx̂ ⊙ x̂))     (…, D)

        from ``∂x̂_j/∂x_i = rrms·(δ_ij − x̂_i x̂_j / D)`` (x_i also moves the
        row's mean square, ``∂ mean(x²)/∂x_i = 2 x_i / D``).
        """
        x, rrms = residuals
        x_hat = x * rrms
        rows = tuple(range(dy.ndim - 1))
        dx_hat = dy * per_feature(params["scale"], dy.ndim)
        dx = rrms * (dx_hat - x_hat * jnp.mean(dx_hat * x_hat, axis=-1, keepdims=True))
        return {"scale": jnp.sum(dy * x_hat, axis=rows)}, dx
