"""Combinators are layers: ``Sequential`` chains layers, ``Residual`` adds a skip path.

Both check each child when they are built (``check_contract``: its class's
methods take what they pass, and it is hashable), keep their children's params
and state as plain pytrees (a list per ``Sequential``, the body's own for
``Residual``), pass each child its nested path (for error messages and
gradcheck's blame) and its own key (``ctx.at(i)``), and answer for their
children what weight decay applies to.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence

import jax

from .base import Layer, at_path, call, call_backward, call_init, check_contract


def _add(a, b):
    """``a + b`` leaf by leaf (inputs and signals may be tuples of arrays)."""
    return jax.tree.map(lambda u, v: u + v, a, b)


def _like(params, items):
    """``items`` as the sequence type of ``params`` (a tuple stays a tuple, as jax.grad's)."""
    return tuple(items) if isinstance(params, tuple) else list(items)


@dataclasses.dataclass(frozen=True, repr=False)
class Sequential(Layer):
    """``x → layers[0] → … → layers[-1]``; with ``loss=`` the model users train.

    Without a loss it is a layer like any other and nests: params and state are
    lists with one entry per child, and its backward walks the children in
    reverse, each receiving the ``dy`` the one above returned:

      forward:   a₀ = x,  a_{i+1} = layers[i](a_i)
      backward:  da_n = dy,  (dθ_i, da_i) = layers[i].backward(θ_i, r_i, da_{i+1})

    ``Sequential(layers, loss=..., weight_decay=...)`` returns a
    :class:`jaxbp.network.Model` around ``Sequential(layers)``: the object with
    ``init``, ``loss``, ``manual_backward`` and the rest.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp import layers
      >>> block = Sequential([layers.Dense(3), layers.Tanh()])
      >>> params, state, out_shape = block.init(jax.random.key(0), (2,))
      >>> y, state, res = block.forward(params, state, jnp.ones((4, 2)), layers.Context())
      >>> [sorted(p) for p in params], out_shape
      ([['W', 'b'], []], (3,))
    """

    layers: tuple[Layer, ...]

    def __new__(cls, layers=(), loss=None, weight_decay=0.0):
        if loss is None:
            if weight_decay:
                raise ValueError("Sequential: weight_decay needs a loss (loss=...): the model "
                                 "owns the objective J = L + λ/2 Σ‖W‖²")
            return super().__new__(cls)
        from ..network import Model  # the model builds on this layer

        return Model(Sequential(layers), loss=loss, weight_decay=weight_decay)

    def __init__(self, layers, loss=None, weight_decay=0.0):
        del loss, weight_decay  # (a model was returned instead)
        if isinstance(layers, Layer) or not isinstance(layers, Sequence):
            raise ValueError(f"Sequential: layers must be a list of jaxbp layers; got "
                             f"{type(layers).__name__}")
        layers = tuple(layers)
        if not layers:
            raise ValueError("Sequential: layers must contain at least one layer; got []")
        for i, layer in enumerate(layers):
            check_contract(f"Sequential: layers[{i}]", layer)
        object.__setattr__(self, "layers", layers)

    @property
    def stateful(self) -> bool:
        return any(layer.stateful for layer in self.layers)

    @property
    def stochastic(self) -> bool:
        return any(layer.stochastic for layer in self.layers)

    def init(self, key, input_shape, dtype=None):
        params, state, shape = [], [], tuple(input_shape)
        for i, (layer, k) in enumerate(zip(self.layers, jax.random.split(key, len(self.layers)))):
            p, s, shape = call_init(layer, f"layers[{i}]", k, shape, dtype)
            params.append(p)
            state.append(s)
        return params, state, shape

    def check(self, params, state, x, ctx) -> None:
        n = len(self.layers)
        for what, tree in (("params", params), ("state", state)):
            if not isinstance(tree, (list, tuple)) or len(tree) != n:
                got = len(tree) if isinstance(tree, (list, tuple)) else type(tree).__name__
                raise ValueError(f"Sequential: {what} must be a list with one entry per layer "
                                 f"({n}); got {got}")

    def check_input_values(self, x) -> None:
        with at_path("layers[0]"):
            self.layers[0].check_input_values(x)

    def forward(self, params, state, x, ctx):
        new_state, residuals = [], []
        for i, layer in enumerate(self.layers):
            x, s, r = call(layer, f"layers[{i}]", params[i], state[i], x, ctx.at(i))
            new_state.append(s)
            residuals.append(r)
        return x, _like(state, new_state), residuals

    def backward(self, params, residuals, dy):
        """Each child's backward in reverse order; dparams is the list of theirs."""
        grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            grads[i], dy = call_backward(self.layers[i], f"layers[{i}]", params[i],
                                         residuals[i], dy)
        return _like(params, grads), dy

    def decayed(self, params):
        return _like(params, (layer.decayed(p) for layer, p in zip(self.layers, params)))

    def empty_state(self):
        return [layer.empty_state() for layer in self.layers]

    def param_paths(self, params, path: str):
        prefix = f"{path}." if path else ""
        return _like(params, (layer.param_paths(p, f"{prefix}layers[{i}]")
                              for i, (layer, p) in enumerate(zip(self.layers, params))))

    def __repr__(self) -> str:
        """On one line if it fits in 80 characters; else one layer a line, nested ones indented."""
        line = f"{self.name}([{', '.join(map(repr, self.layers))}])"
        if len(line) <= 80 and "\n" not in line:
            return line
        inner = textwrap.indent(",\n".join(map(repr, self.layers)), "  ")
        return f"{self.name}([\n{inner},\n])"


@dataclasses.dataclass(frozen=True, repr=False)
class Residual(Layer):
    """``y = x + body(x)``: a skip connection around any layer (ResNet, a transformer block).

    ``x`` is used twice — by the body and by the sum — and the gradient of a
    value used twice is the sum of both paths (llm.c's ``residual_backward``):

      dx = dy + body.backward(dy)        (dy, dx: the shape of x)

    Params, state and residuals are the body's own. The body must map x to
    its own shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp import layers
      >>> block = Residual(Sequential([layers.Dense(2), layers.ReLU()]))
      >>> params, state, out_shape = block.init(jax.random.key(0), (2,))
      >>> out_shape
      (2,)
    """

    body: Layer

    def __post_init__(self):
        check_contract("Residual: body", self.body)

    @property
    def stateful(self) -> bool:
        return self.body.stateful

    @property
    def stochastic(self) -> bool:
        return self.body.stochastic

    def init(self, key, input_shape, dtype=None):
        params, state, shape = call_init(self.body, "body", key, input_shape, dtype)
        if tuple(shape) != tuple(input_shape):
            raise ValueError(f"Residual: the body maps input shape {tuple(input_shape)} to "
                             f"{tuple(shape)}; x + body(x) needs the same shape")
        return params, state, shape

    def check(self, params, state, x, ctx) -> None:
        """Nothing of its own: the body checks its params, state and input."""

    def check_input_values(self, x) -> None:
        with at_path("body"):
            self.body.check_input_values(x)

    def forward(self, params, state, x, ctx):
        y, state, residuals = call(self.body, "body", params, state, x, ctx)
        _check_same_shape(x, y)
        return _add(x, y), state, residuals

    def backward(self, params, residuals, dy):
        """dx = dy (the skip path) + the body's dx; dparams are the body's."""
        dparams, dx = call_backward(self.body, "body", params, residuals, dy)
        return dparams, _add(dx, dy)

    def decayed(self, params):
        return self.body.decayed(params)

    def empty_state(self):
        return self.body.empty_state()

    def param_paths(self, params, path: str):
        return self.body.param_paths(params, f"{path}.body")

    def __repr__(self) -> str:
        return f"{self.name}({self.body!r})"


def _check_same_shape(x, y) -> None:
    """A ValueError if the body's output would broadcast against x instead of matching it."""
    xs, ys = (tuple(tuple(a.shape) for a in jax.tree.leaves(t)) for t in (x, y))
    if xs != ys:
        xs, ys = (s[0] if len(s) == 1 else s for s in (xs, ys))
        raise ValueError(f"Residual: the body's output has shape {ys} but x has {xs}; "
                         f"x + body(x) needs the same shape")
