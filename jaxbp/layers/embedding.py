"""Token embedding: integer ids select rows of a table, ``y[n, t] = W[ids[n, t]]``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import Layer, check_array, check_int, check_params, default_float_dtype


class EmbeddingResiduals(NamedTuple):
    ids: jax.Array  # the integer input, (batch, …)


@dataclasses.dataclass(frozen=True, repr=False)
class Embedding(Layer):
    """``y = W[ids]``: each integer id in [0, vocab_size) picks a row of ``W`` (vocab_size, dim).

    Input: integer ids of any shape (batch, …), e.g. (batch, time); output
    (batch, …, dim). ``W`` starts as N(0, 1), PyTorch's ``nn.Embedding``. It is
    the same as ``one_hot(ids) @ W`` without building the one-hot matrix.

    An id outside [0, vocab_size) is an error where its value is known (a model
    checks its inputs before it jits); inside a trace it cannot be checked, and
    its output row is NaN, never another token's row.

    Args:
      vocab_size: the number of distinct ids.
      dim: the size of each embedding vector.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> layer = Embedding(5, 3)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (4,))
      >>> ids = jnp.array([[0, 4, 4, 1]])
      >>> y, _, res = layer.forward(params, state, ids, Context())
      >>> y.shape, out_shape, bool(jnp.all(y[0, 1] == params["W"][4]))
      ((1, 4, 3), (4, 3), True)
    """

    vocab_size: int
    dim: int

    decay_keys = ("W",)  # a weight matrix: weight decay applies to it, as to Dense's W

    def __post_init__(self):
        check_int("Embedding", "vocab_size", self.vocab_size)
        check_int("Embedding", "dim", self.dim)
        object.__setattr__(self, "vocab_size", int(self.vocab_size))
        object.__setattr__(self, "dim", int(self.dim))

    def init(self, key, input_shape, dtype=None):
        input_shape = tuple(input_shape)
        for axis, size in enumerate(input_shape):
            check_int("Embedding", f"input_shape[{axis}]", size)
        W = jax.random.normal(key, (self.vocab_size, self.dim), dtype or default_float_dtype())
        return {"W": W}, {}, (*input_shape, self.dim)

    def check(self, params, state, x, ctx):
        check_params("Embedding", params, {"W": ((self.vocab_size, self.dim),
                                                 "(vocab_size, dim)")})
        check_params("Embedding", state, {}, "state")
        check_array("Embedding", "input ids", x)
        if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim < 1:
            raise ValueError(f"Embedding: input ids must be an integer array (batch, …); got "
                             f"dtype {x.dtype} with shape {tuple(x.shape)}")
        if not isinstance(x, jax.core.Tracer):
            self.check_input_values(x)

    def check_input_values(self, ids) -> None:
        """A ValueError unless every id lies in [0, vocab_size) (concrete ids only)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"Embedding: input ids must lie in [0, {self.vocab_size}) for "
                             f"vocab_size {self.vocab_size}; got values in [{ids.min()}, "
                             f"{ids.max()}]")

    def forward(self, params, state, x, ctx):
        inside = (x >= 0) & (x < self.vocab_size)  # (jnp.take would wrap a negative id)
        y = jnp.where(inside[..., None], jnp.take(params["W"], jnp.where(inside, x, 0), axis=0),
                      jnp.nan)
        return y, state, EmbeddingResiduals(ids=x)

    def backward(self, params, residuals, dy):
        """Each position's gradient goes to the row it read; repeated ids accumulate.

        Shapes: ids (batch, …), dy (batch, …, dim), dW (vocab_size, dim).

          dW[v] = Σ_{positions p with ids[p] = v} dy[p]      (a scatter-add, = one_hot(ids)ᵀ dy)

        Integer ids have no gradient: ``dx`` is ``None`` (``jax.vjp`` gives a
        ``float0`` zero there). An id outside [0, vocab_size) adds to no row.
        """
        ids = residuals.ids.reshape(-1)
        ids = jnp.where(ids >= 0, ids, self.vocab_size)  # (a negative index would wrap around)
        dW = jnp.zeros_like(params["W"]).at[ids].add(dy.reshape(-1, self.dim), mode="drop")
        return {"W": dW}, None
