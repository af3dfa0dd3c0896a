"""Multi-head scaled dot-product self-attention with a hand-written backward, two ways.

For x of shape (batch, time, C) with ``num_heads`` heads of size d = C / num_heads:

    [q, k, v] = x Wqkv + bqkv           Wqkv (C, 3C): q, k, v side by side, heads contiguous in each
    S = q kᵀ / √d                        (batch, heads, time, time), per head
    P = softmax(S) over the keys         masked: causal (key ≤ query) and padding (valid keys)
    O = P v                              (batch, heads, time, d), heads merged to (batch, time, C)
    y = O Wo + bo                        Wo (C, C)

This is the layout of llm.c and nanoGPT (``c_attn``, ``c_proj``). A row whose every
key is masked (a padded query that sees no valid key) has P = 0, so its output is
``bo`` and its gradients are finite zeros, never NaN.

The backward, per head, with dO = dy Woᵀ split into heads:

    dV = Pᵀ dO          dP = dO Vᵀ
    dS = P ⊙ (dP − rowsum(dP ⊙ P)) = P ⊙ (dP − δ),   δ = rowsum(dO ⊙ O)   (softmax backward)
    dQ = dS K / √d      dK = dSᵀ Q / √d

then the projections as in ``Dense``. ``backward="standard"`` stores P (memory
O(time²) per head, as llm.c does); ``backward="lean"`` stores only O and each
row's log-sum-exp L (O(time)) and recomputes P = exp(S − L) block by block of
``block_size`` keys, accumulating dQ and writing each block's dK and dV
(FlashAttention-2's backward; δ is computed once from dO and O).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import Layer, check_array, check_int, check_params, default_float_dtype, per_feature

BACKWARDS = ("standard", "lean")


class AttentionResiduals(NamedTuple):
    """``backward="standard"``: the probabilities themselves."""

    x: jax.Array  # the input, (batch, time, C)
    valid: object  # the padding mask given with x, (batch, time) bool, or None
    q: jax.Array  # queries, keys and values per head, (batch, heads, time, d)
    k: jax.Array
    v: jax.Array
    P: jax.Array  # attention probabilities, (batch, heads, time, time); 0 where masked
    O: jax.Array  # the heads' outputs merged, (batch, time, C)


class LeanAttentionResiduals(NamedTuple):
    """``backward="lean"``: O(time) per head besides q, k and v; P is recomputed."""

    x: jax.Array
    valid: object  # as for AttentionResiduals
    q: jax.Array
    k: jax.Array
    v: jax.Array
    lse: jax.Array  # each row's log-sum-exp of S over its allowed keys, (batch, heads, time)
    O: jax.Array


@dataclasses.dataclass(frozen=True, repr=False)
class MultiHeadAttention(Layer):
    """Causal (by default) multi-head self-attention on (batch, time, C).

    The input is ``x`` or ``(x, valid)`` with ``valid`` a bool (batch, time) array
    marking the keys that are not padding; the output has the shape of ``x``, and
    for ``(x, valid)`` the input gradient is ``(dx, None)``. Params ``Wqkv`` (C, 3C),
    ``bqkv`` (3C,), ``Wo`` (C, C), ``bo`` (C,); weights N(0, 0.02²) (GPT-2's),
    biases 0.

    Args:
      num_heads: the number of heads; C must be a multiple of it.
      causal: True (default): query t sees keys 0…t only.
      backward: "standard" (store P) or "lean" (store the row log-sum-exp and
        recompute P blockwise in the backward).
      block_size: keys per block of the lean backward.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp.layers import Context
      >>> layer = MultiHeadAttention(2)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (5, 8))
      >>> y, _, res = layer.forward(params, state, jnp.ones((3, 5, 8)), Context())
      >>> y.shape, res.P.shape
      ((3, 5, 8), (3, 2, 5, 5))
    """

    num_heads: int
    causal: bool = True
    backward_mode: str = "standard"
    block_size: int = 64

    decay_keys = ("Wqkv", "Wo")

    def __init__(self, num_heads: int, causal: bool = True, backward: str = "standard",
                 block_size: int = 64):
        check_int("MultiHeadAttention", "num_heads", num_heads)
        check_int("MultiHeadAttention", "block_size", block_size)
        if backward not in BACKWARDS:
            raise ValueError(f"MultiHeadAttention: backward must be one of {BACKWARDS}; got "
                             f"{backward!r}")
        object.__setattr__(self, "num_heads", int(num_heads))
        object.__setattr__(self, "causal", bool(causal))
        object.__setattr__(self, "backward_mode", backward)
        object.__setattr__(self, "block_size", int(block_size))

    def init(self, key, input_shape, dtype=None):
        shape = tuple(input_shape)
        seq = tuple(shape[0]) if len(shape) == 2 and isinstance(shape[0], tuple) else shape
        if len(seq) != 2 or seq[1] % self.num_heads:
            raise ValueError(f"MultiHeadAttention: input_shape must be (time, C) with C a "
                             f"multiple of num_heads {self.num_heads}; got {tuple(input_shape)}")
        C, dtype = seq[1], dtype or default_float_dtype()
        k1, k2 = jax.random.split(key)
        params = {"Wqkv": 0.02 * jax.random.normal(k1, (C, 3 * C), dtype),
                  "bqkv": jnp.zeros((3 * C,), dtype),
                  "Wo": 0.02 * jax.random.normal(k2, (C, C), dtype),
                  "bo": jnp.zeros((C,), dtype)}
        return params, {}, seq

    def check(self, params, state, x, ctx):
        if isinstance(x, tuple) and len(x) != 2:
            raise ValueError(f"{self.name}: input must be x or (x, valid); got a tuple of "
                             f"{len(x)}")
        seq, valid = x if isinstance(x, tuple) else (x, None)
        check_array(self.name, "input x", seq)
        C = seq.shape[-1] if seq.ndim == 3 else None
        if C is None or C % self.num_heads or not jnp.issubdtype(seq.dtype, jnp.floating):
            raise ValueError(f"{self.name}: input x must be floating-point (batch, time, C) with "
                             f"C a multiple of num_heads {self.num_heads}; got shape "
                             f"{tuple(seq.shape)} of {seq.dtype}")
        check_params(self.name, params, {"Wqkv": ((C, 3 * C), "(C, 3C)"),
                                         "bqkv": ((3 * C,), "(3C,)"),
                                         "Wo": ((C, C), "(C, C)"), "bo": ((C,), "(C,)")})
        check_params(self.name, state, {}, "state")
        if valid is not None:
            check_array(self.name, "the padding mask valid", valid)
        if valid is not None and (tuple(valid.shape) != seq.shape[:2] or valid.dtype != bool):
            raise ValueError(f"{self.name}: the padding mask must be a bool array "
                             f"{seq.shape[:2]} (True: a valid key); got {valid.dtype} "
                             f"{tuple(valid.shape)}")

    # ------------------------------------------------------------- forward
    def _heads(self, a):
        """(batch, time, C) → (batch, heads, time, d)."""
        B, T, C = a.shape
        return a.reshape(B, T, self.num_heads, C // self.num_heads).transpose(0, 2, 1, 3)

    def _allowed(self, valid, T_q, keys):
        """Which keys each query may see, (batch, 1, T_q, len(keys)), for key indices ``keys``."""
        allowed = valid[:, None, None, :]
        if self.causal:
            allowed = allowed & (keys[None, :] <= jnp.arange(T_q)[:, None])[None, None]
        return allowed

    def forward(self, params, state, x, ctx):
        seq, given = x if isinstance(x, tuple) else (x, None)
        B, T, C = seq.shape
        valid = jnp.ones((B, T), bool) if given is None else given
        qkv = seq @ params["Wqkv"] + per_feature(params["bqkv"], 3)
        q, k, v = (self._heads(a) for a in jnp.split(qkv, 3, axis=-1))
        scale = 1 / math.sqrt(C // self.num_heads)
        merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
        if self.backward_mode == "lean":
            O, lse = self._online_softmax(q, k, v, valid, scale)
            y = merge(O) @ params["Wo"] + per_feature(params["bo"], 3)
            return y, state, LeanAttentionResiduals(x=seq, valid=given, q=q, k=k, v=v, lse=lse,
                                                    O=merge(O))
        P, _ = _softmax(q @ jnp.swapaxes(k, -1, -2) * scale, self._allowed(valid, T, jnp.arange(T)))
        O = merge(P @ v)
        y = O @ params["Wo"] + per_feature(params["bo"], 3)
        return y, state, AttentionResiduals(x=seq, valid=given, q=q, k=k, v=v, P=P, O=O)

    def _blocks(self, a, T):
        """Keys or values (B, H, T, d) as ``block_size`` blocks (n, B, H, block_size, d)."""
        B, H, _, d = a.shape
        n = -(-T // self.block_size)
        a = jnp.pad(a, ((0, 0), (0, 0), (0, n * self.block_size - T), (0, 0)))
        return a.reshape(B, H, n, self.block_size, d).transpose(2, 0, 1, 3, 4)

    def _valid_blocks(self, valid, T):
        """The padding mask (B, T) as blocks (n, B, block_size); padded keys are invalid."""
        n = -(-T // self.block_size)
        valid = jnp.pad(valid, ((0, 0), (0, n * self.block_size - T)))
        return valid.reshape(valid.shape[0], n, self.block_size).transpose(1, 0, 2)

    def _online_softmax(self, q, k, v, valid, scale):
        """``(O, lse)`` without the (T, T) matrix: keys a block at a time, FlashAttention-style.

        Per query row, a running maximum m, sum l = Σ exp(S − m) and output
        a = Σ exp(S − m) v; a new block with maximum m' rescales both by exp(m − m').
        At the end O = a / l and lse = m + log l (+inf for a row with no allowed key).
        """
        T = q.shape[2]

        def block(carry, inputs):
            m, l, a = carry
            k_j, v_j, valid_j, j = inputs
            allowed = self._allowed(valid_j, T, j * self.block_size + jnp.arange(self.block_size))
            S = q @ jnp.swapaxes(k_j, -1, -2) * scale  # (B, H, T, block)
            m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, S, -jnp.inf), axis=-1))
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0)[..., None]
            p = jnp.exp(jnp.where(allowed, S - shift, -jnp.inf))
            rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift[..., 0], -jnp.inf))
            return (m_new, l * rescale + jnp.sum(p, axis=-1),
                    a * rescale[..., None] + p @ v_j), None

        start = (jnp.full(q.shape[:3], -jnp.inf, q.dtype), jnp.zeros(q.shape[:3], q.dtype),
                 jnp.zeros_like(q))
        n = -(-T // self.block_size)
        (m, l, a), _ = jax.lax.scan(block, start, (self._blocks(k, T), self._blocks(v, T),
                                                   self._valid_blocks(valid, T), jnp.arange(n)))
        seen = l > 0
        O = a / jnp.where(seen, l, 1)[..., None]
        lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0) + jnp.log(jnp.where(seen, l, 1)),
                        jnp.inf)
        return O, lse

    # ------------------------------------------------------------ backward
    def backward(self, params, residuals, dy):
        """Projections as in Dense; the attention core per head (see the module docstring).

        Shapes: x, dy (B, T, C); q, k, v, dQ, dK, dV (B, heads, T, d); P, dS (B, heads, T, T).

          dWo = Σ Oᵀ dy (C, C)    dbo = Σ dy    dO = dy Woᵀ, split into heads
          dV = Pᵀ dO    dS = P ⊙ (dO Vᵀ − δ),  δ = rowsum(dO ⊙ O)
          dQ = dS K / √d    dK = dSᵀ Q / √d
          dqkv = [dQ, dK, dV] merged (B, T, 3C)   dWqkv = Σ xᵀ dqkv   dx = dqkv Wqkvᵀ
        """
        r = residuals
        B, T, C = r.x.shape
        scale = 1 / math.sqrt(C // self.num_heads)
        lead = (0, 1)
        dO = dy @ params["Wo"].T
        delta = jnp.sum(self._heads(dO) * self._heads(r.O), axis=-1)  # (B, heads, T)
        if self.backward_mode == "lean":
            dq, dk, dv = self._lean_core(r, self._heads(dO), delta, scale)
        else:
            dq, dk, dv = _core(r.q, r.k, r.v, r.P, self._heads(dO), delta, scale)
        merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
        dqkv = jnp.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)
        dparams = {"Wqkv": jnp.tensordot(r.x, dqkv, axes=(lead, lead)),
                   "bqkv": jnp.sum(dqkv, axis=lead),
                   "Wo": jnp.tensordot(r.O, dy, axes=(lead, lead)),
                   "bo": jnp.sum(dy, axis=lead)}
        dx = dqkv @ params["Wqkv"].T
        return dparams, (dx if r.valid is None else (dx, None))  # (a bool mask: no gradient)

    def _lean_core(self, r, dO, delta, scale):
        """dQ, dK, dV with P = exp(S − lse) recomputed for ``block_size`` keys at a time."""
        T = r.q.shape[2]
        valid = jnp.ones(r.q.shape[:1] + (T,), bool) if r.valid is None else r.valid

        def block(dq, inputs):
            k_j, v_j, valid_j, j = inputs  # keys j·block_size … (j + 1)·block_size − 1
            allowed = self._allowed(valid_j, T, j * self.block_size + jnp.arange(self.block_size))
            S = r.q @ jnp.swapaxes(k_j, -1, -2) * scale  # (B, H, T, block)
            P = jnp.exp(jnp.where(allowed, S - r.lse[..., None], -jnp.inf))
            dS = P * (dO @ jnp.swapaxes(v_j, -1, -2) - delta[..., None])
            dk_j = jnp.swapaxes(dS, -1, -2) @ r.q * scale
            return dq + dS @ k_j * scale, (dk_j, jnp.swapaxes(P, -1, -2) @ dO)

        n = -(-T // self.block_size)
        dq, (dk, dv) = jax.lax.scan(block, jnp.zeros_like(r.q),
                                    (self._blocks(r.k, T), self._blocks(r.v, T),
                                     self._valid_blocks(valid, T), jnp.arange(n)))

        def unblock(a):  # (n, B, H, block_size, d) → (B, H, T, d)
            B, H, d = a.shape[1], a.shape[2], a.shape[4]
            return a.transpose(1, 2, 0, 3, 4).reshape(B, H, n * self.block_size, d)[:, :, :T]

        return dq, unblock(dk), unblock(dv)

    def __repr__(self) -> str:
        return (f"{self.name}(num_heads={self.num_heads}, causal={self.causal}, "
                f"backward={self.backward_mode!r}, block_size={self.block_size})")


def _softmax(S, allowed):
    """``(P, lse)``: softmax of S over its allowed keys, and each row's log-sum-exp.

    A row with no allowed key gets P = 0 and lse = +inf (so exp(S − lse) = 0 when P is
    recomputed), finite everywhere.
    """
    m = jnp.max(jnp.where(allowed, S, -jnp.inf), axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0)
    e = jnp.exp(jnp.where(allowed, S - m, -jnp.inf))  # (masked: exp(−inf) = 0, never inf)
    total = jnp.sum(e, axis=-1, keepdims=True)
    P = e / jnp.where(total > 0, total, 1)
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1)), jnp.inf)
    return P, lse[..., 0]


def _core(q, k, v, P, dO, delta, scale):
    """The attention core's backward from stored P: ``(dQ, dK, dV)``, each (B, heads, T, d)."""
    dv = jnp.swapaxes(P, -1, -2) @ dO
    dS = P * (dO @ jnp.swapaxes(v, -1, -2) - delta[..., None])
    return dS @ k * scale, jnp.swapaxes(dS, -1, -2) @ q * scale, dv
