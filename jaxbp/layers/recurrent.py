"""Recurrent layers (``RNN``, ``LSTM``, ``GRU``) with backpropagation through time by hand.

All three read a sequence ``x`` of shape (batch, time, features) and share one
layout, in the row-vector convention with the k gates side by side along the
last axis:

    Wx (features, k·hidden)   Wh (hidden, k·hidden)   b (k·hidden,)

The input's contribution to every gate at every step does not depend on the
recurrence, so the forward pass computes it for all steps at once, one matmul
``xw = x Wx + b`` of shape (batch, time, k·hidden); a ``lax.scan`` then runs the
recurrent step ``carry_t = step(carry_{t−1}, xw_t)`` (the program's size does
not grow with the sequence length).

The backward pass is BPTT written out: a reverse ``lax.scan`` carries ∂L/∂h
(and, for the LSTM, ∂L/∂c) from step t+1 back to step t, adds the output's own
gradient ∂L/∂h_t, and returns ``da_t``, the gradient of the gate
pre-activations. Every parameter gradient is a sum over time of outer products
with ``da_t``, so each is one matmul after the scan:

    dWx = Σ_{n,t} x_{n,t}ᵀ da_{n,t}      dWh = Σ_{n,t} h_{n,t−1}ᵀ da_{n,t}
    db  = Σ_{n,t} da_{n,t}               dx_t = da_t Wxᵀ

The one-step functions are public (``layer.step`` and ``layer.step_backward``),
so a single step can be looked at and checked on its own.

The input may be ``x`` alone (the initial state is zeros) or a tuple with the
initial state, ``(x, h0)`` — for the LSTM ``(x, (h0, c0))`` — each (batch,
hidden); then ``dx`` is the matching tuple ``(dx, dh0)`` or ``(dx, (dh0, dc0))``.
The output is every hidden state, (batch, time, hidden), or with
``return_sequences=False`` the last one, (batch, hidden).

Weights convert exactly from and to PyTorch's ``nn.RNN``, ``nn.LSTM`` and
``nn.GRU`` with :func:`jaxbp.layers.torch_weights.from_torch` and ``to_torch``.
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
    check_int,
    check_params,
    default_float_dtype,
    per_feature,
)


class RecurrentResiduals(NamedTuple):
    x: jax.Array  # the input sequence, (batch, time, features)
    carry0: object  # the given initial state (h0, or (h0, c0)); None when it defaulted to zeros
    steps: NamedTuple  # the step residuals stacked over time, time-major: (time, batch, …)


class RNNStep(NamedTuple):
    h_prev: jax.Array  # h_{t−1}, (batch, hidden)
    h: jax.Array  # h_t = tanh(a_t), (batch, hidden)


class LSTMStep(NamedTuple):
    h_prev: jax.Array  # h_{t−1}, (batch, hidden)
    c_prev: jax.Array  # c_{t−1}, (batch, hidden)
    ifo: jax.Array  # σ of the input, forget and output gates side by side, (batch, 3·hidden)
    g: jax.Array  # the candidate tanh(a_g), (batch, hidden)
    tanh_c: jax.Array  # tanh(c_t), (batch, hidden)


class GRUStep(NamedTuple):
    h_prev: jax.Array  # h_{t−1}, (batch, hidden)
    r: jax.Array  # reset gate, (batch, hidden)
    z: jax.Array  # update gate, (batch, hidden)
    n: jax.Array  # new (candidate) state, (batch, hidden)
    hn: jax.Array  # h_{t−1} Wh_n + b_hn, what the reset gate scales, (batch, hidden)


@dataclasses.dataclass(frozen=True, repr=False)
class _Recurrent(Layer):
    """What the three cells share: shapes, checks, the forward scan and the BPTT scan."""

    hidden: int
    return_sequences: bool = True

    gates: ClassVar[int] = 1  # k: how many gate blocks of width `hidden` Wx, Wh and b hold
    decay_keys = ("Wx", "Wh")

    def __post_init__(self):
        check_int(self.name, "hidden", self.hidden)
        object.__setattr__(self, "hidden", int(self.hidden))
        object.__setattr__(self, "return_sequences", bool(self.return_sequences))

    # ------------------------------------------------------------- the carry
    def zero_carry(self, batch: int, dtype):
        """The default initial state: h0 = 0 (the LSTM: h0 = c0 = 0), each (batch, hidden)."""
        return jnp.zeros((batch, self.hidden), dtype)

    def output_of(self, steps):
        """The hidden states h_t of all steps, time-major (time, batch, hidden)."""
        return steps.h

    def add_to_h(self, dcarry, dh):
        """∂L/∂carry with the output's gradient ∂L/∂h_t added to its h part."""
        return dcarry + dh

    # ---------------------------------------------------------------- shapes
    def _carry_shape(self):
        return (self.hidden,)

    def init(self, key, input_shape, dtype=None):
        """Params drawn as PyTorch's: U(−1/√hidden, 1/√hidden) for Wx and Wh; b = 0.

        ``input_shape`` is (time, features), or ((time, features), carry shapes)
        for an input with its initial state.
        """
        shape = tuple(input_shape)
        with_carry = len(shape) == 2 and isinstance(shape[0], tuple)
        seq = tuple(shape[0]) if with_carry else shape
        if len(seq) != 2:
            raise ValueError(f"{self.name}: input_shape must be (time, features), batch axis "
                             f"excluded (or ((time, features), initial-state shapes)); got "
                             f"{tuple(input_shape)}")
        for axis, size in enumerate(seq):
            check_int(self.name, f"input_shape[{axis}]", size)
        if with_carry and _shapes(shape[1]) != _shapes(self._carry_shape()):
            raise ValueError(f"{self.name}: the initial state must have shape "
                             f"{self._carry_shape()} (batch axis excluded); got {shape[1]}")
        dtype = dtype or default_float_dtype()
        width, bound = self.gates * self.hidden, 1.0 / math.sqrt(self.hidden)
        kx, kh = jax.random.split(key)
        params = {
            "Wx": jax.random.uniform(kx, (seq[1], width), dtype, -bound, bound),
            "Wh": jax.random.uniform(kh, (self.hidden, width), dtype, -bound, bound),
            "b": jnp.zeros((width,), dtype),
            **self._extra_params(dtype),
        }
        out = (seq[0], self.hidden) if self.return_sequences else (self.hidden,)
        return params, {}, out

    def _extra_params(self, dtype):
        return {}

    def _expected(self):
        k, h = self.gates, self.hidden
        return {
            "Wx": ((None, k * h), f"(features, {k}·hidden)"),
            "Wh": ((h, k * h), f"(hidden, {k}·hidden)"),
            "b": ((k * h,), f"({k}·hidden,)"),
        }

    def check(self, params, state, x, ctx):
        check_params(self.name, params, self._expected())
        check_params(self.name, state, {}, "state")
        if isinstance(x, tuple) and len(x) != 2:
            raise ValueError(f"{self.name}: input must be x or (x, initial state); got a tuple "
                             f"of {len(x)}")
        seq, carry0 = x if isinstance(x, tuple) else (x, None)
        check_array(self.name, "input x", seq)
        if not jnp.issubdtype(seq.dtype, jnp.floating):
            raise ValueError(f"{self.name}: input x must be floating-point; got dtype "
                             f"{seq.dtype} (integer token ids go through layers.Embedding first)")
        features = params["Wx"].shape[0]
        if seq.ndim != 3 or seq.shape[-1] != features or seq.shape[1] == 0:
            raise ValueError(f"{self.name}: input x must have shape (batch, time, {features}) "
                             f"with time >= 1 to match Wx of shape {tuple(params['Wx'].shape)}; "
                             f"got x shape {tuple(seq.shape)}")
        if carry0 is not None:
            want = jax.tree.map(lambda s: (seq.shape[0], *s), self._carry_shape(),
                                is_leaf=lambda s: isinstance(s, tuple) and all(
                                    isinstance(i, int) for i in s))
            got = jax.tree.map(lambda a: tuple(a.shape), carry0)
            if _shapes(got) != _shapes(want) or not all(
                    jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(carry0)):
                raise ValueError(f"{self.name}: the initial state must be floating-point with "
                                 f"shape {want} for x of shape {tuple(seq.shape)}; got {got}")

    # --------------------------------------------------------------- forward
    def forward(self, params, state, x, ctx):
        seq, carry0 = x if isinstance(x, tuple) else (x, None)
        xw = seq @ params["Wx"] + per_feature(params["b"], 3)  # all steps' input terms (B, T, kH)
        start = self.zero_carry(seq.shape[0], xw.dtype) if carry0 is None else carry0

        def step(carry, xw_t):
            return self.step(params, carry, xw_t)

        _, steps = jax.lax.scan(step, start, jnp.swapaxes(xw, 0, 1))
        hs = self.output_of(steps)  # (T, B, H)
        y = jnp.swapaxes(hs, 0, 1) if self.return_sequences else hs[-1]
        return y, state, RecurrentResiduals(x=seq, carry0=carry0, steps=steps)

    # -------------------------------------------------------------- backward
    def backward(self, params, residuals, dy):
        """BPTT: a reverse scan carrying ∂L/∂carry, then each parameter gradient as one sum.

        Shapes: x (B, T, F), dy (B, T, H) — or (B, H) for ``return_sequences=False``,
        where only the last step's output reaches the loss.

          dh_t  = dy_t + dh_from_{t+1}           (the output's gradient plus the carried one)
          (dcarry_{t−1}, da_t) = step_backward(step_t, dcarry_t)
          dWx = Σ xᵀ da (F, k·H)   dWh = Σ h_prevᵀ da (H, k·H)   db = Σ da (k·H,)
          dx  = da Wxᵀ (B, T, F)   dcarry_0 for the given initial state
        """
        x, carry0, steps = residuals
        batch, time = x.shape[:2]
        if self.return_sequences:
            dh_out = jnp.swapaxes(dy, 0, 1)  # (T, B, H)
        else:
            dh_out = jnp.zeros((time, batch, self.hidden), dy.dtype).at[-1].set(dy)

        def step_back(dcarry, inputs):
            dh_t, step_t = inputs
            return self.step_backward(params, step_t, self.add_to_h(dcarry, dh_t))

        dcarry0, da = jax.lax.scan(step_back, self.zero_carry(batch, dy.dtype), (dh_out, steps),
                                   reverse=True)
        dparams, dxw = self.sum_over_time(x, steps, da)
        dx = dxw @ params["Wx"].T
        return dparams, (dx if carry0 is None else (dx, dcarry0))

    def sum_over_time(self, x, steps, da):
        """``(dparams, dxw)``: the parameter gradients summed over batch and time.

        ``da`` (T, B, k·H) is the gradient of the gate pre-activations; ``dxw``
        (B, T, k·H) the gradient of ``xw = x Wx + b``.
        """
        return {
            "Wx": jnp.einsum("btf,tbk->fk", x, da),
            "Wh": jnp.einsum("tbh,tbk->hk", steps.h_prev, da),
            "b": jnp.sum(da, axis=(0, 1)),
        }, jnp.swapaxes(da, 0, 1)


def _shapes(tree):
    """A nested tuple of shapes, compared structurally (tuples of ints stay leaves)."""
    return jax.tree.map(tuple, tree, is_leaf=lambda s: isinstance(s, tuple) and all(
        isinstance(i, int) for i in s))


@dataclasses.dataclass(frozen=True, repr=False)
class RNN(_Recurrent):
    """The Elman RNN: ``h_t = tanh(x_t Wx + h_{t−1} Wh + b)``.

    Params: ``Wx`` (features, hidden), ``Wh`` (hidden, hidden), ``b`` (hidden,),
    PyTorch's ``nn.RNN`` (tanh) with its two biases summed into ``b``.

    Args:
      hidden: the size of the hidden state.
      return_sequences: True (default): every h_t, (batch, time, hidden); False:
        the last, (batch, hidden).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> layer = RNN(4)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (7, 3))
      >>> y, _, res = layer.forward(params, state, jnp.ones((2, 7, 3)), Context())
      >>> y.shape, out_shape, res.steps.h.shape  # step residuals are time-major
      ((2, 7, 4), (7, 4), (7, 2, 4))
    """

    def step(self, params, h_prev, xw_t):
        """One step: ``h_t = tanh(h_{t−1} Wh + xw_t)`` with ``xw_t = x_t Wx + b``, (batch, hidden).

        Returns ``(h_t, RNNStep)``.
        """
        h = jnp.tanh(h_prev @ params["Wh"] + xw_t)
        return h, RNNStep(h_prev=h_prev, h=h)

    def step_backward(self, params, step, dh):
        """One step back, given dh = ∂L/∂h_t (output and carried gradient together):

          da      = dh ⊙ (1 − h_t²)       (batch, hidden)   tanh' = 1 − tanh²
          dh_prev = da Whᵀ                 (batch, hidden)

        Returns ``(dh_prev, da)``.
        """
        da = dh * (1 - step.h * step.h)
        return da @ params["Wh"].T, da


@dataclasses.dataclass(frozen=True, repr=False)
class LSTM(_Recurrent):
    """Long short-term memory, gates in the order **i, f, o, g** along the last axis:

      a = x_t Wx + h_{t−1} Wh + b                       (batch, 4·hidden)
      i = σ(a_i)  f = σ(a_f)  o = σ(a_o)  g = tanh(a_g)  (input, forget, output, candidate)
      c_t = f ⊙ c_{t−1} + i ⊙ g
      h_t = o ⊙ tanh(c_t)

    Params: ``Wx`` (features, 4·hidden), ``Wh`` (hidden, 4·hidden), ``b``
    (4·hidden,). PyTorch's ``nn.LSTM`` orders its gates i, f, g, o and stores
    transposed weights with two biases; ``torch_weights`` converts exactly. The
    initial state is (h0, c0); the output is h.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> layer = LSTM(4, return_sequences=False)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (7, 3))
      >>> params["Wx"].shape, params["Wh"].shape, out_shape
      ((3, 16), (4, 16), (4,))
    """

    gates = 4

    def zero_carry(self, batch, dtype):
        zeros = jnp.zeros((batch, self.hidden), dtype)
        return zeros, zeros

    def _carry_shape(self):
        return (self.hidden,), (self.hidden,)

    def output_of(self, steps):
        return steps.ifo[..., 2 * self.hidden:] * steps.tanh_c  # h = o ⊙ tanh(c)

    def add_to_h(self, dcarry, dh):
        dh_next, dc_next = dcarry
        return dh_next + dh, dc_next

    def step(self, params, carry, xw_t):
        """One step: ``(h_{t−1}, c_{t−1}), xw_t ↦ ((h_t, c_t), LSTMStep)``."""
        h_prev, c_prev = carry
        H = self.hidden
        a = h_prev @ params["Wh"] + xw_t  # (batch, 4H): i, f, o, g
        ifo = jax.nn.sigmoid(a[:, :3 * H])
        g = jnp.tanh(a[:, 3 * H:])
        c = ifo[:, H:2 * H] * c_prev + ifo[:, :H] * g
        tanh_c = jnp.tanh(c)
        h = ifo[:, 2 * H:] * tanh_c
        return (h, c), LSTMStep(h_prev=h_prev, c_prev=c_prev, ifo=ifo, g=g, tanh_c=tanh_c)

    def step_backward(self, params, step, dcarry):
        """One step back, given (dh, dc) = (∂L/∂h_t, ∂L/∂c_t carried from step t+1):

          do = dh ⊙ tanh(c_t)
          dc = dc + dh ⊙ o ⊙ (1 − tanh²(c_t))      (c_t feeds h_t and c_{t+1})
          di = dc ⊙ g    df = dc ⊙ c_{t−1}    dg = dc ⊙ i
          da = [di, df, do] ⊙ σ'  and  dg ⊙ (1 − g²)   (batch, 4·hidden), σ' = σ(1 − σ)
          dh_prev = da Whᵀ    dc_prev = dc ⊙ f         (the forget gate's path)

        Returns ``((dh_prev, dc_prev), da)``.
        """
        dh, dc = dcarry
        H = self.hidden
        i, f, o = step.ifo[:, :H], step.ifo[:, H:2 * H], step.ifo[:, 2 * H:]
        do = dh * step.tanh_c
        dc = dc + dh * o * (1 - step.tanh_c * step.tanh_c)
        difo = jnp.concatenate([dc * step.g, dc * step.c_prev, do], axis=-1)
        da = jnp.concatenate([difo * step.ifo * (1 - step.ifo),
                              dc * i * (1 - step.g * step.g)], axis=-1)
        return (da @ params["Wh"].T, dc * f), da


@dataclasses.dataclass(frozen=True, repr=False)
class GRU(_Recurrent):
    """Gated recurrent unit, PyTorch's ``nn.GRU`` equations, gates **r, z, n**:

      r = σ(x_t Wx_r + b_r + h_{t−1} Wh_r)           (reset)
      z = σ(x_t Wx_z + b_z + h_{t−1} Wh_z)           (update)
      n = tanh(x_t Wx_n + b_n + r ⊙ (h_{t−1} Wh_n + b_hn))   (new)
      h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

    Params: ``Wx`` (features, 3·hidden), ``Wh`` (hidden, 3·hidden), ``b``
    (3·hidden,), and ``bhn`` (hidden,), the one recurrent bias that sits inside
    the reset gate's product and so cannot be merged into ``b`` (PyTorch's other
    recurrent biases add to ``b``; ``torch_weights`` converts exactly).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = GRU(4)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (7, 3))
      >>> sorted(params), params["Wh"].shape, out_shape
      (['Wh', 'Wx', 'b', 'bhn'], (4, 12), (7, 4))
    """

    gates = 3

    def _extra_params(self, dtype):
        return {"bhn": jnp.zeros((self.hidden,), dtype)}

    def _expected(self):
        return {**super()._expected(), "bhn": ((self.hidden,), "(hidden,)")}

    def output_of(self, steps):
        return (1 - steps.z) * steps.n + steps.z * steps.h_prev

    def step(self, params, h_prev, xw_t):
        """One step: ``h_{t−1}, xw_t ↦ h_t``; returns ``(h_t, GRUStep)``."""
        H = self.hidden
        ah = h_prev @ params["Wh"]  # (batch, 3H): r, z, n
        rz = jax.nn.sigmoid(xw_t[:, :2 * H] + ah[:, :2 * H])
        r, z = rz[:, :H], rz[:, H:]
        hn = ah[:, 2 * H:] + per_feature(params["bhn"], 2)
        n = jnp.tanh(xw_t[:, 2 * H:] + r * hn)
        h = (1 - z) * n + z * h_prev
        return h, GRUStep(h_prev=h_prev, r=r, z=z, n=n, hn=hn)

    def step_backward(self, params, step, dh):
        """One step back, given dh = ∂L/∂h_t:

          dn = dh ⊙ (1 − z)    dz = dh ⊙ (h_{t−1} − n)
          da_n = dn ⊙ (1 − n²)            (n's pre-activation; also ∂L/∂(x Wx_n + b_n))
          dhn  = da_n ⊙ r                 (∂L/∂(h_{t−1} Wh_n + b_hn))
          da_r = da_n ⊙ hn ⊙ r(1 − r)    da_z = dz ⊙ z(1 − z)
          dh_prev = dh ⊙ z + [da_r, da_z, dhn] Whᵀ

        Returns ``(dh_prev, (dax, dhn))`` with ``dax = [da_r, da_z, da_n]``
        (batch, 3·hidden), the gradient of ``xw_t``; the recurrent side differs
        from it only in the n block, which is ``dhn``.
        """
        r, z, n = step.r, step.z, step.n
        dn = dh * (1 - z)
        dz = dh * (step.h_prev - n)
        dan = dn * (1 - n * n)
        drz = jnp.concatenate([dan * step.hn * r * (1 - r), dz * z * (1 - z)], axis=-1)
        dhn = dan * r
        dh_prev = dh * z + jnp.concatenate([drz, dhn], axis=-1) @ params["Wh"].T
        return dh_prev, (jnp.concatenate([drz, dan], axis=-1), dhn)

    def sum_over_time(self, x, steps, da):
        """As for RNN and LSTM, but the recurrent side's n block is ``dhn``; ``dbhn = Σ dhn``."""
        dax, dhn = da
        dah = jnp.concatenate([dax[..., :2 * self.hidden], dhn], axis=-1)
        return {
            "Wx": jnp.einsum("btf,tbk->fk", x, dax),
            "Wh": jnp.einsum("tbh,tbk->hk", steps.h_prev, dah),
            "b": jnp.sum(dax, axis=(0, 1)),
            "bhn": jnp.sum(dhn, axis=(0, 1)),
        }, jnp.swapaxes(dax, 0, 1)
