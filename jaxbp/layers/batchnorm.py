"""Batch normalisation over every axis but the last: ``BatchNorm`` (Ioffe and Szegedy, 2015).

Unlike LayerNorm, BatchNorm mixes samples: each channel (the last axis, of size
C) is normalised with statistics over the batch and, for images, space, so a
dense input (N, C) has N values per channel and an NHWC image batch
(N, H, W, C) has M = N·H·W. In train mode the layer uses the batch's statistics
and updates running averages of them (its state); in eval mode it uses the
running averages, so a single sample is normalised the same way whatever batch
it comes in. The forward stores the input and two statistics per channel for
the backward, never the normalised copy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from .base import (
    Layer,
    check_array,
    check_params,
    check_real,
    check_train_flag,
    default_float_dtype,
    is_int,
    per_feature,
)


class BatchNormResiduals(NamedTuple):
    """Train mode: the batch's own statistics normalised ``x``."""

    x: jax.Array  # the layer's input, (batch, …, C)
    mean: jax.Array  # batch mean μ_B per channel, (C,)
    rstd: jax.Array  # 1/√(σ²_B + ε) per channel, σ²_B the biased batch variance, (C,)


class BatchNormEvalResiduals(NamedTuple):
    """Eval mode: the running statistics (constants for the gradient) normalised ``x``."""

    x: jax.Array  # the layer's input, (batch, …, C)
    mean: jax.Array  # running mean per channel, (C,)
    rstd: jax.Array  # 1/√(running var + ε) per channel, (C,)


@dataclasses.dataclass(frozen=True, repr=False)
class BatchNorm(Layer):
    """``y = γ ⊙ (x − μ) / √(σ² + ε) + β`` per channel (the last axis), over batch and space.

    Input ``(batch, …, C)`` of any rank ≥ 2: dense ``(N, C)``, sequences
    ``(N, L, C)``, NHWC images ``(N, H, W, C)``. Each channel's M values (all
    axes but the last; M = N·H·W for images) share one μ and σ². Params
    ``{"scale": γ (C,), "offset": β (C,)}`` start at ones and zeros (weight
    decay leaves both alone); state ``{"mean": (C,), "var": (C,)}`` starts at
    zeros and ones.

    Train mode (``ctx.train``): μ = μ_B, the batch mean, and σ² = σ²_B, the
    BIASED batch variance (mean of (x − μ_B)²); the new state is

      mean ← (1 − momentum)·mean + momentum·μ_B
      var  ← (1 − momentum)·var  + momentum·σ²_B·M/(M − 1)    (the unbiased variance)

    Train mode needs M ≥ 2 values per channel (PyTorch refuses M = 1 too).
    Eval mode: μ and σ² are the running ``mean`` and ``var``, and the state is
    returned unchanged; the layer is then a fixed per-channel affine map.

    Momentum convention: PyTorch's. ``momentum`` is the weight of the NEW
    batch (default 0.1). Flax's ``nn.BatchNorm(momentum=0.9)`` (and Keras's
    0.99) weight the OLD running value, so Flax's momentum m equals 1 − ours:
    Flax 0.9 is ``BatchNorm(momentum=0.1)`` here, Flax 0.99 is 0.01.

    To reproduce ``torch.nn.BatchNorm1d(C)`` / ``BatchNorm2d(C)`` exactly: use
    the same ``momentum`` and ``eps`` (PyTorch's defaults are these, 0.1 and
    1e-5; PyTorch's ``momentum=None``, a cumulative average, has no
    equivalent), copy ``weight`` to ``scale`` and ``bias`` to ``offset``, and
    move the channel axis last: ``(N, C)`` is the same, ``(N, C, L)`` is
    ``x.transpose(0, 2, 1)``, NCHW is ``x.transpose(0, 2, 3, 1)`` (NHWC; the
    outputs and dx transpose back with ``(0, 3, 1, 2)``). Both normalise with
    the biased batch variance and store the unbiased one in ``running_var``.

    Args:
      momentum: weight of the new batch in the running averages, in [0, 1].
      eps: ε > 0 added to the variance.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers.base import Context
      >>> layer = BatchNorm()
      >>> params, state, out_shape = layer.init(jax.random.key(0), (1,))
      >>> x = jnp.array([[1.0], [3.0]])
      >>> y, state, res = layer.forward(params, state, x, Context(train=True))
      >>> [round(float(v), 4) for v in y[:, 0]]
      [-1.0, 1.0]
      >>> round(float(state["mean"][0]), 4), round(float(state["var"][0]), 4)
      (0.2, 1.1)
      >>> y, _, _ = layer.forward(params, state, x, Context(train=False))
      >>> [round(float(v), 4) for v in y[:, 0]]
      [0.7628, 2.6697]
    """

    momentum: float = 0.1
    eps: float = 1e-5

    stateful: ClassVar[bool] = True
    decay_keys = ()

    def __post_init__(self):
        try:
            momentum = check_real(self.name, "momentum", self.momentum)
            in_range = 0.0 <= momentum <= 1.0
        except ValueError:
            in_range = False
        if not in_range:
            raise ValueError(
                f"{self.name}: momentum must be a finite number in [0, 1] (the weight of the new "
                f"batch, PyTorch's convention; Flax's momentum=0.9 is 0.1 here); got "
                f"{self.momentum!r}"
            )
        eps = check_real(self.name, "eps", self.eps, 0, strict=True)
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "eps", eps)

    def init(self, key, input_shape, dtype=None):
        del key
        input_shape = tuple(input_shape)
        if len(input_shape) < 1 or not all(is_int(s) and s >= 1 for s in input_shape):
            raise ValueError(f"{self.name}: input_shape must be (…, channels) with positive sizes "
                             f"(batch axis excluded); got {input_shape}")
        input_shape = tuple(int(s) for s in input_shape)
        dtype = dtype or default_float_dtype()
        c = input_shape[-1]
        params = {"scale": jnp.ones((c,), dtype), "offset": jnp.zeros((c,), dtype)}
        state = {"mean": jnp.zeros((c,), dtype), "var": jnp.ones((c,), dtype)}
        return params, state, input_shape

    def check(self, params, state, x, ctx) -> None:
        """Params and state of shape (C,), ``x`` (batch, …, C), ``ctx``; M ≥ 2 in train mode."""
        c = params["scale"].shape[0] if (isinstance(params, dict) and "scale" in params
                                         and getattr(params["scale"], "ndim", 0) == 1) else None
        per_channel = ((c,), "(channels,)")
        check_params(self.name, params, {"scale": per_channel, "offset": per_channel})
        check_params(self.name, state, {"mean": per_channel, "var": per_channel}, "state")
        check_array(self.name, "input x", x)
        if x.ndim < 2 or x.shape[-1] != c:
            raise ValueError(
                f"{self.name}: input x must have shape (batch, …, {c}) to match scale of shape "
                f"({c},); got x shape {tuple(x.shape)}"
            )
        check_train_flag(self.name, ctx)
        m = math.prod(x.shape[:-1])
        if ctx.train and m < 2:
            raise ValueError(
                f"{self.name}: train=True needs at least 2 values per channel for batch "
                f"statistics (PyTorch refuses 1 too); got x shape {tuple(x.shape)}, {m} value(s) "
                f"per channel. Use a larger batch, or train=False to use the running statistics"
            )

    def forward(self, params, state, x, ctx):
        axes = tuple(range(x.ndim - 1))
        if ctx.train:
            m = math.prod(x.shape[:-1])
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - per_feature(mean, x.ndim)), axis=axes)  # biased
            keep, new = 1.0 - self.momentum, self.momentum
            batch = jax.lax.stop_gradient((mean, var * (m / (m - 1))))  # unbiased running var
            new_state = {
                "mean": (keep * state["mean"] + new * batch[0]).astype(state["mean"].dtype),
                "var": (keep * state["var"] + new * batch[1]).astype(state["var"].dtype),
            }
            residuals_type = BatchNormResiduals
        else:
            mean, var = state["mean"], state["var"]
            new_state = state
            residuals_type = BatchNormEvalResiduals
        rstd = jax.lax.rsqrt(var + self.eps)
        y = ((x - per_feature(mean, x.ndim)) * per_feature(rstd * params["scale"], x.ndim)
             + per_feature(params["offset"], x.ndim))
        return y, new_state, residuals_type(x=x, mean=mean, rstd=rstd)

    def backward(self, params, residuals, dy):
        """Chain rule through the channel's batch mean and variance (train) or an affine map (eval).

        Shapes: x, dy (batch, …, C); μ, rstd, γ, β (C,). Per channel, over its M
        values (sums Σ run over every axis but the last), with ``x̂ = (x − μ)·rstd``
        and ``y = γ·x̂ + β``:

          dγ = Σ dy ⊙ x̂        (C,)
          dβ = Σ dy             (C,)

        Eval (``BatchNormEvalResiduals``): μ and rstd are the running statistics,
        constants, so ``dx = dy ⊙ γ·rstd`` (no mean terms).

        Train (``BatchNormResiduals``): μ = (1/M)Σx and σ² = (1/M)Σ(x − μ)² depend
        on every x_i of the channel: ``∂μ/∂x_i = 1/M``, ``∂σ²/∂x_i = 2(x_i − μ)/M``,
        so ``∂rstd/∂x_i = −rstd²·x̂_i/M`` and

          ∂x̂_j/∂x_i = rstd·(δ_ij − 1/M − x̂_i x̂_j / M).

        With ``dx̂ = γ·dy`` (γ is one number per channel),
        ``dx_i = Σ_j dx̂_j ∂x̂_j/∂x_i = γ·rstd·(dy_i − (1/M)Σdy − x̂_i (1/M)Σ dy ⊙ x̂)``:

          dx = (1/M)·γ·rstd ⊙ (M·dy − Σdy − x̂ ⊙ Σ(dy ⊙ x̂))    (batch, …, C)

        whose two sums are dβ and dγ. The running-statistics update is state:
        no gradient flows through it.
        """
        x, mean, rstd = residuals
        nd = dy.ndim
        axes = tuple(range(nd - 1))
        x_hat = (x - per_feature(mean, nd)) * per_feature(rstd, nd)
        dscale, doffset = jnp.sum(dy * x_hat, axis=axes), jnp.sum(dy, axis=axes)
        gain = params["scale"] * rstd  # γ·rstd, (C,)
        if isinstance(residuals, BatchNormEvalResiduals):
            dx = dy * per_feature(gain, nd)
        else:
            m = math.prod(dy.shape[:-1])
            dx = per_feature(gain / m, nd) * (m * dy - per_feature(doffset, nd)
                                            - x_hat * per_feature(dscale, nd))
        return {"scale": dscale, "offset": doffset}, dx
