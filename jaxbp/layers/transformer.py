"""The GPT pieces: learned position embeddings and the pre-LN transformer block.

A block is composed from the library's own layers and combinators — two
``Residual`` branches, each ``LayerNorm`` then a sublayer — so its backward is
theirs: each residual adds its skip path's gradient, ``dx = dy + branch.backward(dy)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .activations import GELU
from .attention import MultiHeadAttention
from .base import Layer, check_array, check_int, check_params, default_float_dtype
from .combinators import Residual, Sequential
from .dense import Dense
from .dropout import Dropout
from .norm import LayerNorm


class PositionResiduals(NamedTuple):
    """Nothing but the length: the layer adds P[:T], whose gradient needs no input."""


@dataclasses.dataclass(frozen=True, repr=False)
class PositionEmbedding(Layer):
    """``y[n, t] = x[n, t] + P[t]``: a learned vector per position (GPT-2's ``wpe``).

    ``P`` is (context, dim), N(0, 0.02²); an input (batch, time, dim) with
    time ≤ context uses its first ``time`` rows.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> layer = PositionEmbedding(16, 4)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (10, 4))
      >>> params["P"].shape, out_shape
      ((16, 4), (10, 4))
    """

    context: int
    dim: int

    decay_keys = ("P",)

    def __post_init__(self):
        check_int(self.name, "context", self.context)
        check_int(self.name, "dim", self.dim)

    def init(self, key, input_shape, dtype=None):
        if tuple(input_shape)[1:] != (self.dim,) or not 1 <= input_shape[0] <= self.context:
            raise ValueError(f"{self.name}: input_shape must be (time, {self.dim}) with time <= "
                             f"context {self.context}; got {tuple(input_shape)}")
        P = 0.02 * jax.random.normal(key, (self.context, self.dim), dtype or default_float_dtype())
        return {"P": P}, {}, tuple(input_shape)

    def check(self, params, state, x, ctx):
        check_params(self.name, params, {"P": ((self.context, self.dim), "(context, dim)")})
        check_params(self.name, state, {}, "state")
        check_array(self.name, "input x", x)
        if x.ndim != 3 or x.shape[-1] != self.dim or x.shape[1] > self.context:
            raise ValueError(f"{self.name}: input x must have shape (batch, time, {self.dim}) "
                             f"with time <= context {self.context}; got {tuple(x.shape)}")

    def forward(self, params, state, x, ctx):
        return x + params["P"][None, : x.shape[1]], state, PositionResiduals()

    def backward(self, params, residuals, dy):
        """``dP[t] = Σ_n dy[n, t]`` for t < time (0 for the unused rows); ``dx = dy``."""
        dP = jnp.zeros_like(params["P"]).at[: dy.shape[1]].set(jnp.sum(dy, axis=0))
        return {"P": dP}, dy


@dataclasses.dataclass(frozen=True, repr=False)
class TransformerBlock(Layer):
    """The pre-LN GPT block on (batch, time, C): attention, then an MLP, each with a skip.

      x = x + Dropout(Attn(LN1(x)))
      x = x + Dropout(Dense_C(GELU_tanh(Dense_{r·C}(LN2(x)))))

    Built as ``Sequential([Residual(Sequential([LayerNorm, MultiHeadAttention,
    Dropout])), Residual(Sequential([LayerNorm, Dense, GELU, Dense, Dropout]))])``
    for the C its input has (``body(C)``); params, state, gradients and
    nested paths are that Sequential's (``layers[0].body.layers[1].Wqkv``).
    Dropout is left out when ``dropout`` is 0.

    Args:
      num_heads: attention heads (C must be a multiple).
      mlp_ratio: the MLP's hidden width is ``mlp_ratio · C``.
      dropout: the residual branches' dropout rate.
      backward: the attention's backward, "standard" or "lean".

    Example:
      >>> import jax
      >>> block = TransformerBlock(2)
      >>> params, state, out_shape = block.init(jax.random.key(0), (5, 8))
      >>> out_shape, [layer.name for layer in block.body(8).layers]
      ((5, 8), ['Residual', 'Residual'])
    """

    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    backward_mode: str = "standard"

    def __init__(self, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 backward: str = "standard"):
        check_int("TransformerBlock", "mlp_ratio", mlp_ratio)
        MultiHeadAttention(num_heads, backward=backward)  # (its own argument checks)
        Dropout(dropout)
        object.__setattr__(self, "num_heads", int(num_heads))
        object.__setattr__(self, "mlp_ratio", int(mlp_ratio))
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "backward_mode", backward)

    def body(self, C: int) -> Sequential:
        """The block for C channels, made of the library's layers."""
        drop = [Dropout(self.dropout)] if self.dropout else []
        attention = MultiHeadAttention(self.num_heads, backward=self.backward_mode)
        mlp = [Dense(self.mlp_ratio * C), GELU(approximate=True), Dense(C)]
        return Sequential([Residual(Sequential([LayerNorm(), attention, *drop])),
                           Residual(Sequential([LayerNorm(), *mlp, *drop]))])

    @property
    def stochastic(self) -> bool:
        return self.dropout > 0

    @staticmethod
    def _channels(params) -> int:
        return params[0][0]["scale"].shape[0]  # LN1's scale, (C,)

    def init(self, key, input_shape, dtype=None):
        if len(tuple(input_shape)) != 2:
            raise ValueError(f"{self.name}: input_shape must be (time, C); got "
                             f"{tuple(input_shape)}")
        return self.body(input_shape[-1]).init(key, input_shape, dtype)

    def check(self, params, state, x, ctx):
        check_array(self.name, "input x", x)
        if x.ndim != 3:
            raise ValueError(f"{self.name}: input x must have shape (batch, time, C); got "
                             f"{tuple(x.shape)}")
        self.body(x.shape[-1]).check(params, state, x, ctx)

    def forward(self, params, state, x, ctx):
        return self.body(x.shape[-1]).forward(params, state, x, ctx)

    def backward(self, params, residuals, dy):
        return self.body(self._channels(params)).backward(params, residuals, dy)

    def decayed(self, params):
        return self.body(self._channels(params)).decayed(params)

    def empty_state(self):
        return self.body(1).empty_state()  # (the structure does not depend on C)

    def param_paths(self, params, path: str):
        return self.body(self._channels(params)).param_paths(params, path)

    def __repr__(self) -> str:
        return (f"{self.name}(num_heads={self.num_heads}, mlp_ratio={self.mlp_ratio}, "
                f"dropout={self.dropout}, backward={self.backward_mode!r})")
