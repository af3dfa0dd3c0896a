"""Token embedding: integer ids select rows of a table, ``y[n, t] = W[ids[n, t]]``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import (
    Layer,
    call,
    call_backward,
    call_init,
    check_array,
    check_int,
    check_params,
    check_real,
    default_float_dtype,
)


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
      std: the standard deviation of the initial ``W`` (1: PyTorch's; GPT-2 uses 0.02).

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
    std: float = 1.0

    decay_keys = ("W",)  # a weight matrix: weight decay applies to it, as to Dense's W

    def __post_init__(self):
        check_int("Embedding", "vocab_size", self.vocab_size)
        check_int("Embedding", "dim", self.dim)
        object.__setattr__(self, "vocab_size", int(self.vocab_size))
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "std", check_real("Embedding", "std", self.std, 0, strict=True))

    def init(self, key, input_shape, dtype=None):
        input_shape = tuple(input_shape)
        for axis, size in enumerate(input_shape):
            check_int("Embedding", f"input_shape[{axis}]", size)
        W = jax.random.normal(key, (self.vocab_size, self.dim), dtype or default_float_dtype())
        return {"W": self.std * W}, {}, (*input_shape, self.dim)

    def check(self, params, state, x, ctx):
        check_params(self.name, params, {"W": ((self.vocab_size, self.dim),
                                               "(vocab_size, dim)")})
        check_params(self.name, state, {}, "state")
        self._check_ids(x)

    def _check_ids(self, x):
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


class TiedResiduals(NamedTuple):
    ids: jax.Array  # the integer input, (batch, …)
    h: jax.Array  # the body's output, (batch, …, dim)
    body: object  # the body's residuals


@dataclasses.dataclass(frozen=True, repr=False)
class TiedEmbedding(Embedding):
    """``logits = body(W[ids]) Wᵀ``: one table embeds the ids and is the output projection.

    GPT-2's weight tying: ``W`` (vocab_size, dim) both looks up each id's vector
    and, transposed, maps the body's output (batch, …, dim) to logits (batch, …,
    vocab_size). ``W`` is used twice, so its gradient is the sum of both uses:

      dW = Σ_p dlogits[p]ᵀ h[p]  +  Σ_{p: ids[p] = v} de[p]  (row v)   (vocab_size, dim)

    with ``dh = dlogits W`` going down through the body, which returns ``de``.
    Params ``{"W", "body"}``; state and residuals of the body are nested.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp import layers
      >>> tied = TiedEmbedding(7, 4, body=layers.LayerNorm())
      >>> params, state, out_shape = tied.init(jax.random.key(0), (5,))
      >>> sorted(params), out_shape
      (['W', 'body'], (5, 7))
    """

    body: Layer = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.body, Layer):
            raise ValueError(f"TiedEmbedding: body must be a jaxbp layer mapping (…, dim) to "
                             f"(…, dim); got {type(self.body).__name__}")

    @property
    def stateful(self) -> bool:
        return self.body.stateful

    @property
    def stochastic(self) -> bool:
        return self.body.stochastic

    def init(self, key, input_shape, dtype=None):
        k_emb, k_body = jax.random.split(key)
        table, _, shape = super().init(k_emb, input_shape, dtype)
        body, state, out = call_init(self.body, "body", k_body, shape, dtype)
        if tuple(out) != tuple(shape):
            raise ValueError(f"TiedEmbedding: the body maps {tuple(shape)} to {tuple(out)}; the "
                             f"tied projection needs (…, {self.dim})")
        return {"W": table["W"], "body": body}, state, (*input_shape, self.vocab_size)

    def check(self, params, state, x, ctx):
        if not isinstance(params, dict) or sorted(params) != ["W", "body"]:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"TiedEmbedding: params must have the keys ['W', 'body']; got {got}")
        check_params(self.name, {"W": params["W"]}, {"W": ((self.vocab_size, self.dim),
                                                           "(vocab_size, dim)")})
        self._check_ids(x)

    def forward(self, params, state, x, ctx):
        e, _, _ = super().forward({"W": params["W"]}, {}, x, ctx)
        h, state, body = call(self.body, "body", params["body"], state, e, ctx)
        return h @ params["W"].T, state, TiedResiduals(ids=x, h=h, body=body)

    def backward(self, params, residuals, dy):
        """Down through the projection, the body and the lookup; both uses of W summed."""
        lead = tuple(range(dy.ndim - 1))
        dW_out = jnp.tensordot(dy, residuals.h, axes=(lead, lead))  # (vocab_size, dim)
        dbody, de = call_backward(self.body, "body", params["body"], residuals.body,
                                  dy @ params["W"])
        dW_in, _ = super().backward({"W": params["W"]}, EmbeddingResiduals(residuals.ids), de)
        return {"W": dW_out + dW_in["W"], "body": dbody}, None

    def decayed(self, params):
        return {"W": True, "body": self.body.decayed(params["body"])}

    def empty_state(self):
        return self.body.empty_state()

    def param_paths(self, params, path: str):
        return {"W": f"{path}.W", "body": self.body.param_paths(params["body"], f"{path}.body")}

    def __repr__(self) -> str:
        return f"{self.name}({self.vocab_size}, {self.dim}, body={self.body!r})"
