"""Inverted dropout: ``Dropout(rate)``, where ``rate`` is the probability of DROPPING a unit.

In train mode each entry is zeroed with probability ``rate`` and the survivors
are scaled by ``1/(1 − rate)``, so the expected output equals the input and eval
mode is simply the identity (Srivastava et al., 2014, in the "inverted" form
every framework uses). The mask comes from ``ctx.key``: the same key gives the
same mask, so the hand-written backward and autodiff see the same network.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import Layer, check_parameterless, check_params, check_real, check_train_flag, is_key


class DropoutResiduals(NamedTuple):
    """Train mode with rate > 0: which entries survived."""

    keep: jax.Array  # bool, the shape of x: True where the entry is kept (and scaled)


class DropoutIdentityResiduals(NamedTuple):
    """Eval mode, or rate 0: the layer is the identity and its backward needs nothing."""


@dataclasses.dataclass(frozen=True, repr=False)
class Dropout(Layer):
    """``y = where(keep, x / (1 − rate), 0)`` in train mode, ``y = x`` in eval mode.

    **``rate`` is the probability of DROPPING (zeroing) a unit**, as in
    PyTorch's ``nn.Dropout(p)``, Keras's and Flax's ``rate``. stax's
    ``Dropout(rate)`` and CS231n's ``p`` are the opposite, the probability of
    KEEPING a unit: their 0.8 is ``Dropout(0.2)`` here.

    Train mode (``ctx.train``) with rate > 0: ``keep = jax.random.bernoulli(
    ctx.key, 1 − rate, x.shape)``, each entry kept with probability 1 − rate,
    independently; kept entries are divided by 1 − rate (inverted dropout), so
    ``E[y] = x`` and eval mode needs no rescaling. Train mode needs
    ``ctx.key``; the mask is a function of the key alone, so the same key gives
    the same mask. Eval mode, or rate 0: the identity, no key needed. No params,
    no state; any input shape.

    Args:
      rate: the probability of dropping each entry, 0 ≤ rate < 1.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers.base import Context
      >>> layer = Dropout(0.5)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (4,))
      >>> x = jnp.ones((1, 4))
      >>> y, _, res = layer.forward(params, state, x, Context(train=True, key=jax.random.key(1)))
      >>> set(y[0].tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 1/(1 - 0.5)
      True
      >>> bool(jnp.all(y == jnp.where(res.keep, 2.0, 0.0)))
      True
      >>> bool(jnp.all(layer.forward(params, state, x, Context(train=False))[0] == x))
      True
    """

    rate: float

    def __post_init__(self):
        try:
            rate = check_real(self.name, "rate", self.rate)
            in_range = 0.0 <= rate < 1.0
        except ValueError:
            in_range = False
        if not in_range:
            raise ValueError(
                f"{self.name}: rate must be a finite number in [0, 1) (the probability of "
                f"DROPPING a unit; stax's and CS231n's p is the keep probability, 1 - rate); "
                f"got {self.rate!r}"
            )
        object.__setattr__(self, "rate", rate)

    @property
    def stochastic(self) -> bool:
        """Train mode needs ``ctx.key`` exactly when something can be dropped."""
        return self.rate > 0

    def check(self, params, state, x, ctx) -> None:
        """Params and state ``{}``, ``x`` an array, ``ctx``; a PRNG key when train mode drops."""
        check_parameterless(self.name, params, x)
        check_params(self.name, state, {}, "state")
        check_train_flag(self.name, ctx)
        if ctx.train and self.stochastic:
            if ctx.key is None:
                raise ValueError(f"{self.name}: train=True needs a PRNG key for the dropout mask "
                                 f"(pass key=...); got key=None")
            if not is_key(ctx.key):
                raise ValueError(
                    f"{self.name}: ctx.key must be one PRNG key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)); got {type(ctx.key).__name__} "
                    f"{getattr(ctx.key, 'dtype', '')}{tuple(getattr(ctx.key, 'shape', ()))}"
                )

    def forward(self, params, state, x, ctx):
        if not (ctx.train and self.stochastic):
            return x, state, DropoutIdentityResiduals()
        keep = jax.random.bernoulli(ctx.key, 1.0 - self.rate, x.shape)
        y = jnp.where(keep, x / (1.0 - self.rate), 0)
        return y, state, DropoutResiduals(keep=keep)

    def backward(self, params, residuals, dy):
        """The same mask and scale as the forward: ``y`` is linear in ``x`` given ``keep``.

        Shapes: dy, keep, dx the shape of x. Train mode, ``y_i = keep_i·x_i/(1 − rate)``
        so ``∂y_i/∂x_j = δ_ij·keep_i/(1 − rate)``:

          dx = where(keep, dy / (1 − rate), 0)

        Eval mode or rate 0 (``DropoutIdentityResiduals``): ``dx = dy``. No params.
        """
        if isinstance(residuals, DropoutIdentityResiduals):
            return {}, dy
        return {}, jnp.where(residuals.keep, dy / (1.0 - self.rate), 0)
