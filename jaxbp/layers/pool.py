"""Max and average pooling: each channel of an NHWC image down-sampled on its own.

A ``kh × kw`` window slides with stride ``(S_h, S_w)`` (the window by default) over
every depth slice; the depth is unchanged. Output sizes follow
``jaxbp.conv_output_size``. Padding (at most ``window − 1`` per side, so every
window holds an input element) is ``−∞`` for max pooling, which never wins, and
zeros for average pooling, which count in the divisor: every window averages over
``kh·kw`` entries (PyTorch's ``count_include_pad=True``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .base import Layer, check_rank
from .conv import as_padding, as_pair, check_image_shape, unread_rows, window_geometry


class MaxPoolResiduals(NamedTuple):
    x: jax.Array  # the layer's input (backward reads only its shape)
    first: jax.Array  # each window's arg-max as an offset m·kw + k, (batch, H_out, W_out, C)


class AvgPoolResiduals(NamedTuple):
    x: jax.Array  # the layer's input (backward reads only its shape)


def _lowest(dtype):
    """The padding of max pooling: −∞, or the dtype's least value (integers, bools)."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf, dtype)
    if dtype == np.bool_:
        return np.array(False)
    return np.array(jnp.iinfo(dtype).min, dtype)


UNROLLED_MAX_OFFSETS = 64  # MaxPool2D's forward loops over at most this many window offsets


def _offset_dtype(count: int):
    """The smallest integer dtype that holds the window offsets ``0 … count − 1``."""
    return next(np.dtype(t) for t in (np.int8, np.int16, np.int32)
                if count - 1 <= np.iinfo(t).max)


@dataclasses.dataclass(frozen=True, repr=False)
class _Pool(Layer):
    """Shared fields, validation and geometry of the pooling layers."""

    window: tuple[int, int]
    stride: tuple[int, int] | None = None
    padding: str | tuple = 0

    def __post_init__(self):
        name = type(self).__name__
        window = as_pair(name, "window", self.window)
        stride = window if self.stride is None else as_pair(name, "stride", self.stride)
        padding = as_padding(name, self.padding)
        if not isinstance(padding, str):
            for dim, pads, size in zip(("height", "width"), padding, window, strict=True):
                if max(pads) > size - 1:
                    raise ValueError(
                        f"{name}: padding must be at most window − 1 = {size - 1} on each side "
                        f"so every window holds an input element; got {dim} padding {pads} "
                        f"for window {window}"
                    )
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "padding", padding)

    def _geometry(self, spatial):
        return window_geometry(self.name, spatial, self.window, self.stride, self.padding)

    def _pad_config(self, pads):
        """``lax.reduce_window`` padding for NHWC: none on batch and channels."""
        return ((0, 0), *pads, (0, 0))

    def init(self, key, input_shape, dtype=None):
        del key, dtype
        h, w, c = check_image_shape(self.name, input_shape)
        _, (h_out, w_out) = self._geometry((h, w))
        return {}, {}, (h_out, w_out, c)

    def check(self, params, state, x, ctx):
        super().check(params, state, x, ctx)
        check_rank(self.name, "input x", x, 4, "(batch, height, width, channels) NHWC")
        self._geometry(x.shape[1:3])

    def _windows(self):
        return (1, *self.window, 1), (1, *self.stride, 1)

    def _tiles(self, pads) -> bool:
        """Whether the windows tile the image: stride = window and no padding."""
        return self.stride == self.window and not any(map(any, pads))

    def _untile(self, blocks, shape):
        """``(batch, H_out, kh, W_out, kw, C)`` window blocks back to an image of ``shape``.

        Window (p, q)'s offset (m, k) is pixel ``(kh·p + m, kw·q + k)`` when the windows
        tile; the ``r`` end rows no window reads get zeros."""
        n, h_out, kh, w_out, kw, c = blocks.shape
        image = blocks.reshape(n, h_out * kh, w_out * kw, c)
        return jnp.pad(image, ((0, 0), (0, shape[1] - h_out * kh), (0, shape[2] - w_out * kw),
                               (0, 0)))


@dataclasses.dataclass(frozen=True, repr=False)
class MaxPool2D(_Pool):
    """``y[n, p, q, c] = max_{m < kh, k < kw} x̃[n, S_h·p + m, S_w·q + k, c]`` (x̃: x padded by −∞).

    Shapes: x (batch, H, W, C), y (batch, H_out, W_out, C).

    Args:
      window: ``kh = kw`` as an int, or ``(kh, kw)``.
      stride: an int or ``(S_h, S_w)``; defaults to the window (no overlap).
      padding: ``"SAME"``, ``"VALID"``, an int, ``(P_h, P_w)`` or
        ``((top, bottom), (left, right))``, at most ``window − 1`` per side.

    Example (a 4×4 map, 2×2 windows):
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1., 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])
      >>> from jaxbp.layers import Context
      >>> y, _, _ = MaxPool2D(2).forward({}, {}, x[None, :, :, None], Context())
      >>> y[0, :, :, 0].tolist()
      [[6.0, 8.0], [3.0, 4.0]]
    """

    def forward(self, params, state, x, ctx):
        """One pass over the ``kh·kw`` window offsets (m, k) in row-major order: the
        offset's entries ``x̃[S·p + m, S·q + k]`` form a strided slice the shape of y; where
        one is greater than the running maximum it becomes the maximum and its offset
        ``m·kw + k`` the window's arg-max (a NaN always takes over, so it propagates as in
        ``max``). The strict ``>`` keeps the first of equal maxima. The arg-max, not x, is
        what backward needs: it routes dy by the same comparisons that chose y, so the two
        agree however XLA fuses or recomputes x (a recomputed x compared again with y can
        differ in the last bit and drop the gradient).

        Windows of more than ``UNROLLED_MAX_OFFSETS`` (64) entries that tile the image
        (global pooling, say) are reshaped to rows instead and reduced by ``max`` and
        ``argmax`` (the same first maximum): one operation each, where the loop's program
        would grow with the window (a 28×28 window: 16 s to compile), though on small
        windows the loop is faster (the bench's 2×2: 1.17× the step with argmax)."""
        pads, (h_out, w_out) = self._geometry(x.shape[1:3])
        (kh, kw), (sh, sw) = self.window, self.stride
        index = _offset_dtype(kh * kw)
        if self._tiles(pads) and kh * kw > UNROLLED_MAX_OFFSETS:
            # A window per row of (batch, H_out, W_out, C, kh·kw): one max and one argmax
            # (the first maximum, or the first NaN), however large the window.
            n, _, _, c = x.shape
            blocks = x[:, :h_out * kh, :w_out * kw, :].reshape(n, h_out, kh, w_out, kw, c)
            windows = blocks.transpose(0, 1, 3, 5, 2, 4).reshape(n, h_out, w_out, c, kh * kw)
            first = jnp.argmax(windows, axis=-1).astype(index)
            return jnp.max(windows, axis=-1), state, MaxPoolResiduals(x=x, first=first)
        xp = lax.pad(x, _lowest(x.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
        y = first = None
        for m in range(kh):
            for k in range(kw):
                end = (xp.shape[0], m + sh * (h_out - 1) + 1, k + sw * (w_out - 1) + 1,
                       xp.shape[3])
                patch = lax.slice(xp, (0, m, k, 0), end, (1, sh, sw, 1))
                if y is None:
                    y, first = patch, jnp.zeros(patch.shape, index)
                    continue
                wins = (patch > y) | (patch != patch)
                y = jnp.where(wins, patch, y)
                first = jnp.where(wins, np.array(m * kw + k, index), first)
        return y, state, MaxPoolResiduals(x=x, first=first)

    def backward(self, params, residuals, dy):
        """dy goes to each window's arg-max; overlapping windows accumulate.

        Shapes: x, dx (batch, H, W, C); first, dy (batch, H_out, W_out, C).

          dx̃[n, h, w, c] = Σ_{p,q: window (p, q) picks (h, w)} dy[n, p, q, c],   dx = dx̃ cropped

        ``first`` holds the pick, the offset ``m·kw + k`` of the window's first maximal
        entry in row-major window order ((m, k) before (m, k + 1) before (m + 1, 0)):
        the rule of XLA's ``SelectAndScatter`` with the ``≥`` comparison that ``jax.grad``
        of ``lax.reduce_window(max)`` uses, so the two agree even on constant inputs.
        −∞ padding loses to every input entry above −∞.

        The sum runs over the offsets (m, k): where the window picked (m, k), dy is placed
        back at ``x̃[S·p + m, S·q + k]`` by a strided pad. When the windows tile the image
        (stride = window, no padding) each entry is in one window at most, the sum has
        one term, and the placing is a reshape of the ``(batch, H_out, kh, W_out, kw, C)``
        blocks ``dy[n, p, q, c]·[first[n, p, q, c] = m·kw + k]``.
        """
        x, first = residuals
        pads, (h_out, w_out) = self._geometry(x.shape[1:3])
        (kh, kw), (sh, sw), zero = self.window, self.stride, np.zeros((), dy.dtype)
        if self._tiles(pads):
            offsets = np.arange(kh * kw, dtype=first.dtype).reshape(1, 1, kh, 1, kw, 1)
            picked = first[:, :, None, :, None, :] == offsets
            return {}, self._untile(jnp.where(picked, dy[:, :, None, :, None, :], zero), x.shape)
        hp, wp = x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
        dxp = jnp.zeros((x.shape[0], hp, wp, x.shape[3]), dy.dtype)
        for m in range(kh):
            for k in range(kw):
                end_h, end_w = m + sh * (h_out - 1) + 1, k + sw * (w_out - 1) + 1
                dxp = dxp + lax.pad(jnp.where(first == m * kw + k, dy, zero), zero, [
                    (0, 0, 0), (m, hp - end_h, sh - 1), (k, wp - end_w, sw - 1), (0, 0, 0)])
        (top, _), (left, _) = pads
        return {}, dxp[:, top:top + x.shape[1], left:left + x.shape[2], :]


@dataclasses.dataclass(frozen=True, repr=False)
class AvgPool2D(_Pool):
    """``y[n, p, q, c] = 1/(kh·kw) Σ_{m < kh, k < kw} x̃[n, S_h·p + m, S_w·q + k, c]``.

    x̃ is x zero-padded; the padded zeros count in the divisor ``kh·kw``.
    Shapes: x (batch, H, W, C), y (batch, H_out, W_out, C). Arguments as
    :class:`MaxPool2D`.

    Example (the same 4×4 map):
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1., 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])
      >>> from jaxbp.layers import Context
      >>> y, _, _ = AvgPool2D(2).forward({}, {}, x[None, :, :, None], Context())
      >>> y[0, :, :, 0].tolist()
      [[3.25, 5.25], [2.0, 2.0]]
    """

    def forward(self, params, state, x, ctx):
        pads, _ = self._geometry(x.shape[1:3])
        dims, strides = self._windows()
        total = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, strides,
                                  self._pad_config(pads))
        return total / (self.window[0] * self.window[1]), state, AvgPoolResiduals(x=x)

    def backward(self, params, residuals, dy):
        """Each input entry receives dy / (kh·kw) from every window that covers it.

        Shapes: dy (batch, H_out, W_out, C), dx (batch, H, W, C). With ``ď`` dy
        dilated by S (``ď[S·p] = dy[p]``, zeros between):

          dx̃[h] = 1/(kh·kw) Σ_{p,m: S·p+m = h} dy[p] = 1/(kh·kw) Σ_{m<kh} ď[h − m]

        a full box-filter sum over ď: ď padded by ``(kh − 1 − P_lo, kh − 1 − P_hi + r)``
        (which also crops x̃'s padding; ``r`` end rows are read by no window) and summed
        over sliding ``kh × kw`` windows at stride 1. When the windows tile the image
        (stride = window, no padding) the sum has one term, ``dy[⌊h/kh⌋]/(kh·kw)`` (zero
        on the ``r`` end rows), and dx is dy broadcast over each window and reshaped.
        """
        shape = residuals.x.shape
        pads, out = self._geometry(shape[1:3])
        kernel, stride = self.window, self.stride
        if self._tiles(pads):
            n, h_out, w_out, c = dy.shape
            blocks = jnp.broadcast_to(dy[:, :, None, :, None, :] / (kernel[0] * kernel[1]),
                                      (n, h_out, kernel[0], w_out, kernel[1], c))
            return {}, self._untile(blocks, shape)
        config = [(0, 0, 0), (0, 0, 0)]
        for d in range(2):
            r = unread_rows(shape[1 + d], kernel[d], stride[d], pads[d], out[d])
            config.insert(1 + d, (kernel[d] - 1 - pads[d][0], kernel[d] - 1 - pads[d][1] + r,
                                  stride[d] - 1))
        zero = np.zeros((), dy.dtype)
        dilated = lax.pad(dy, zero, config)
        dims = (1, *kernel, 1)
        dx = lax.reduce_window(dilated, zero, lax.add, dims, (1, 1, 1, 1), "VALID")
        return {}, dx / (kernel[0] * kernel[1])
