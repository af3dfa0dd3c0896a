"""2-D convolution over NHWC images with HWIO kernels, and its output-size arithmetic.

Per spatial dimension, a window of size F slides with stride S over an input of
size W zero-padded by ``P_lo`` before and ``P_hi`` after; it fits

    W_out = ⌊(W − F + P_lo + P_hi) / S⌋ + 1        (⌊(W − F + 2P)/S⌋ + 1 when symmetric)

times. ``"VALID"`` means no padding; ``"SAME"`` pads ``max((⌈W/S⌉ − 1)·S + F − W, 0)``
in total, the smaller half before (XLA's and TensorFlow's rule), so ``W_out = ⌈W/S⌉``.
The last ``r = W + P_lo + P_hi − F − S·(W_out − 1)`` padded rows (``0 ≤ r < S``) are
read by no window.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .base import Layer, check_int, check_params, check_rank, default_float_dtype, is_int
from .dense import INITIALIZERS, check_init

NHWC = ("NHWC", "HWIO", "NHWC")
DW_BATCH_CHUNK = 4  # images per correlation in Conv2D's dW (see Conv2D.backward)
PATCHES_MAX_C_IN = 3  # Conv2D's forward is one GEMM on patches up to this many input channels
_DIMS = ("height", "width")
_PADDING_FORMS = (
    '"SAME", "VALID", an int >= 0, a pair (ph, pw) or ((top, bottom), (left, right)) '
    "of ints >= 0"
)


def as_pair(layer: str, arg: str, value) -> tuple[int, int]:
    """``value`` (an int or a pair of positive ints) as ``(height, width)``."""
    pair = (value, value) if is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(is_int(v) and v >= 1 for v in pair)):
        raise ValueError(
            f"{layer}: {arg} must be a positive int or a pair of positive ints; got {value!r}"
        )
    return tuple(int(v) for v in pair)  # numpy ints too, stored as plain ints


def as_padding(layer: str, value):
    """``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``."""
    if isinstance(value, str) and value.upper() in ("SAME", "VALID"):
        return value.upper()
    pads = value
    if is_int(pads):
        pads = (pads, pads)
    if isinstance(pads, (tuple, list)) and len(pads) == 2 and all(is_int(p) for p in pads):
        pads = ((pads[0], pads[0]), (pads[1], pads[1]))
    ok = (isinstance(pads, (tuple, list)) and len(pads) == 2 and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(v) and v >= 0 for v in p)
        for p in pads))
    if not ok:
        raise ValueError(f"{layer}: padding must be {_PADDING_FORMS}; got {value!r}")
    return tuple(tuple(int(v) for v in p) for p in pads)


def resolve_pads(padding, size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(P_lo, P_hi)`` for one dimension; ``padding`` is "SAME", "VALID" or that dimension's
    ``(P_lo, P_hi)`` from ``as_padding`` (where a pair of ints means ``(P_h, P_w)``)."""
    if padding == "VALID":
        return (0, 0)
    if padding == "SAME":
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        return (total // 2, total - total // 2)
    return tuple(padding)


def output_size(layer: str, dim: str, size: int, kernel: int, stride: int, pads) -> int:
    """``⌊(W − F + P_lo + P_hi)/S⌋ + 1``; a ValueError names the numbers when it is < 1."""
    lo, hi = pads
    out = (size - kernel + lo + hi) // stride + 1
    if out < 1:
        raise ValueError(
            f"{layer}: output {dim} ⌊(W − F + P_lo + P_hi)/S⌋ + 1 = "
            f"⌊({size} − {kernel} + {lo} + {hi})/{stride}⌋ + 1 = {out} is smaller than 1 "
            f"(input {dim} W={size}, kernel F={kernel}, stride S={stride}, padding ({lo}, {hi}))"
        )
    return out


def conv_output_size(size: int, kernel: int, stride: int = 1, padding=0) -> int:
    """Output length of a convolution or pooling along one dimension.

    ``⌊(W − F + 2P)/S⌋ + 1`` for padding ``P`` (an int), ``⌊(W − F + P_lo + P_hi)/S⌋ + 1``
    for a pair ``(P_lo, P_hi)``, ``⌈W/S⌉`` for ``"SAME"`` and ``⌊(W − F)/S⌋ + 1`` for
    ``"VALID"``. Raises ValueError when the result would be smaller than 1.

    Example (tutorial 004: a 5-wide input and a 3-wide filter):
      >>> conv_output_size(5, 3, stride=1), conv_output_size(5, 3, stride=2)
      (3, 2)
      >>> conv_output_size(5, 3, stride=2, padding=1), conv_output_size(28, 3, 1, "SAME")
      (3, 28)
    """
    name = "conv_output_size"
    for arg, value in (("size", size), ("kernel", kernel), ("stride", stride)):
        check_int(name, arg, value)
    if isinstance(padding, str):
        spec = as_padding(name, padding)
    else:
        spec = (padding, padding) if is_int(padding) else padding
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2
                and all(is_int(p) and p >= 0 for p in spec)):
            raise ValueError(f'{name}: padding must be "SAME", "VALID", an int >= 0 or a pair '
                             f"(lo, hi) of ints >= 0; got {padding!r}")
    pads = resolve_pads(spec, size, kernel, stride)
    return output_size(name, "size", size, kernel, stride, pads)


def window_geometry(layer: str, spatial, kernel, stride, padding):
    """``(pads, out)`` for an input of spatial shape ``(H, W)``: per-dimension pairs and sizes."""
    for d in range(2):
        check_int(layer, f"input {_DIMS[d]}", spatial[d])  # an empty image has no windows
    pads = tuple(resolve_pads(padding if isinstance(padding, str) else padding[d],
                              spatial[d], kernel[d], stride[d]) for d in range(2))
    out = tuple(output_size(layer, _DIMS[d], spatial[d], kernel[d], stride[d], pads[d])
                for d in range(2))
    return pads, out


def check_image_shape(layer: str, input_shape) -> tuple[int, int, int]:
    """``input_shape`` (batch excluded) must be ``(height, width, channels)``."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"{layer}: input_shape must be (height, width, channels) (batch axis excluded, "
            f"NHWC); got {input_shape}"
        )
    for name, size in zip(("height", "width", "channels"), input_shape, strict=True):
        check_int(layer, f"input_shape {name}", size)
    return input_shape


def unread_rows(size: int, kernel: int, stride: int, pads, out: int) -> int:
    """``r``: padded rows at the end of one dimension that no window reads."""
    return size + pads[0] + pads[1] - kernel - stride * (out - 1)


class ConvResiduals(NamedTuple):
    x: jax.Array  # the layer's input, (batch, H, W, C_in)


@dataclasses.dataclass(frozen=True, repr=False)
class Conv2D(Layer):
    """``y = x ⋆ W + b``: cross-correlation of NHWC images with ``filters`` HWIO kernels.

    With ``x̃`` the zero-padded input (tutorial 004's formula, depth summed over)

        y[n, p, q, o] = Σ_{m, k, i} x̃[n, S_h·p + m, S_w·q + k, i] · W[m, k, i, o] + b[o]

    Shapes: x (batch, H, W, C_in), W (kh, kw, C_in, filters), b (filters,),
    y (batch, H_out, W_out, filters), ``H_out = ⌊(H − kh + P_top + P_bottom)/S_h⌋ + 1``.

    Args:
      filters: number of kernels (output channels).
      kernel_size: ``kh = kw`` as an int, or ``(kh, kw)``.
      stride: an int or ``(S_h, S_w)``.
      padding: ``"SAME"``, ``"VALID"``, an int P, ``(P_h, P_w)`` or
        ``((top, bottom), (left, right))``; zeros are padded.
      init: "lecun_normal" (default), "glorot_normal" or "he_normal" for ``W`` (fan-in
        ``kh·kw·C_in``); ``b`` starts at zero.
      use_bias: False drops ``b``.

    Example (tutorial 004: 5×5×3 input, padding 1, two 3×3×3 filters, stride 2):
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv2D(2, 3, stride=2, padding=1)
      >>> params, state, out_shape = layer.init(jax.random.key(0), (5, 5, 3))
      >>> out_shape, sum(p.size for p in params.values())
      ((3, 3, 2), 56)
    """

    filters: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: str | tuple = ((0, 0), (0, 0))
    init_scheme: str = dataclasses.field(default="lecun_normal", metadata={"argument": "init"})
    use_bias: bool = True

    decay_keys = ("W",)

    def __init__(self, filters: int, kernel_size, stride=1, padding=0,
                 init: str = "lecun_normal", use_bias: bool = True):
        check_int("Conv2D", "filters", filters)
        object.__setattr__(self, "filters", int(filters))
        object.__setattr__(self, "kernel_size", as_pair("Conv2D", "kernel_size", kernel_size))
        object.__setattr__(self, "stride", as_pair("Conv2D", "stride", stride))
        object.__setattr__(self, "padding", as_padding("Conv2D", padding))
        object.__setattr__(self, "init_scheme", check_init("Conv2D", init))
        object.__setattr__(self, "use_bias", bool(use_bias))

    def _geometry(self, spatial):
        return window_geometry("Conv2D", spatial, self.kernel_size, self.stride, self.padding)

    def init(self, key, input_shape, dtype=None):
        h, w, c = check_image_shape("Conv2D", input_shape)
        _, (h_out, w_out) = self._geometry((h, w))
        dtype = dtype or default_float_dtype()
        W = INITIALIZERS[self.init_scheme]()(key, (*self.kernel_size, c, self.filters), dtype)
        params = {"W": W}
        if self.use_bias:
            params["b"] = jnp.zeros((self.filters,), dtype)
        return params, {}, (h_out, w_out, self.filters)

    def check(self, params, state, x, ctx):
        check_params("Conv2D", params, self._expected())
        check_params("Conv2D", state, {}, "state")
        W = params["W"]
        check_rank("Conv2D", "input x", x, 4, "(batch, height, width, channels) NHWC")
        c_in = W.shape[2]
        if x.shape[3] != c_in:
            hint = ""
            if x.shape[1] == c_in:
                hint = (f"; x looks like NCHW (axis 1 has {c_in}): jaxbp images are NHWC, "
                        f"use x.transpose(0, 2, 3, 1)")
            raise ValueError(
                f"Conv2D: input x has {x.shape[3]} channels but W expects {c_in} "
                f"(W shape {tuple(W.shape)}); got x shape {tuple(x.shape)}, expected "
                f"(batch, height, width, {c_in}){hint}"
            )
        self._geometry(x.shape[1:3])

    def forward(self, params, state, x, ctx):
        """With at most ``PATCHES_MAX_C_IN`` (3) input channels, ``y`` is computed as one
        GEMM: the patches ``X̃[n, p, q, (m, k, i)] = x̃[n, S_h·p + m, S_w·q + k, i]`` (kh·kw
        strided slices of x̃, concatenated on the feature axis in W's (m, k, i) order) times
        W reshaped to (kh·kw·C_in, filters): the same sum as the equation above. XLA:CPU's
        convolution uses few of its vector lanes on an RGB or grey image's 1–3 channels; the
        GEMM on the 9–27 wide patches is 1.6–2.3× faster there (measured on the bench's
        first layers), and slower than the convolution on wider inputs."""
        W = params["W"]
        pads, out = self._geometry(x.shape[1:3])
        dtype = jnp.result_type(x, W)  # mixed dtypes promote, as in Dense's x @ W
        x_, W_ = x.astype(dtype), W.astype(dtype)
        if x.shape[3] <= PATCHES_MAX_C_IN:
            xp = lax.pad(x_, jnp.zeros((), dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0),
                                                    (0, 0, 0)])
            (sh, sw), (kh, kw) = self.stride, self.kernel_size
            taps = [xp[:, m:m + sh * (out[0] - 1) + 1:sh, k:k + sw * (out[1] - 1) + 1:sw, :]
                    for m in range(kh) for k in range(kw)]
            y = jnp.concatenate(taps, axis=-1) @ W_.reshape(-1, self.filters)
        else:
            y = lax.conv_general_dilated(x_, W_, self.stride, pads, dimension_numbers=NHWC)
        if self.use_bias:
            y = y + params["b"][None, None, None, :]
        return y, state, ConvResiduals(x=x)

    def _expected(self):
        """The params' keys and shapes (``check_params``); any number of input channels."""
        expected = {"W": ((*self.kernel_size, None, self.filters), "(kh, kw, C_in, filters)")}
        if self.use_bias:
            expected["b"] = ((self.filters,), "(filters,)")
        return expected

    def backward(self, params, residuals, dy):
        """Chain rule through the correlation, one dimension shown (the other is alike).

        Shapes: x (batch, H, W, C_in), W (kh, kw, C_in, C_out), dy (batch, H_out,
        W_out, C_out). Write ``x̃`` for x padded by ``(P_lo, P_hi)`` and ``ď`` for dy
        dilated by S (``S − 1`` zeros between neighbours, ``ď[S·p] = dy[p]``).
        From ``y[p, o] = Σ_{m,i} x̃[S·p + m, i] W[m, i, o] + b[o]``:

          db[o]       = Σ_{n,p,q} dy[n, p, q, o]                                  (C_out,)

          dW[m, i, o] = Σ_{n,p} x̃[n, S·p + m, i] · dy[n, p, o]         (kh, kw, C_in, C_out)
                      = correlation of x̃ with ď, contracting the batch axis: a
                        convolution of x with batch and channel axes swapped by the
                        kernel dy (batch as its input channels), ``rhs_dilation = S``,
                        padding ``(P_lo, P_hi − r)``

          dx̃[h, i]    = Σ_{p,m: S·p+m = h} Σ_o dy[p, o] · W[m, i, o]
                      = Σ_m Σ_o ď[h − m, o] · W[m, i, o]            (a full convolution)
                      = correlation of ď, padded by kh − 1 each side, with the
                        flipped kernel ``W[kh − 1 − m]``, in/out channels swapped
          dx[h]       = dx̃[h + P_lo]; cropping x̃'s padding leaves the padding
                        ``(kh − 1 − P_lo, kh − 1 − P_hi + r)`` on ď       (batch, H, W, C_in)

        where ``r`` padded rows at the end are read by no window (their gradient is
        zero). Both are ``lax.conv_general_dilated`` calls, forward ops of XLA; for dx,
        ``lax.pad`` first dilates ď by ``S − 1`` zeros and pads (or crops) it as above.

        With more than ``PATCHES_MAX_C_IN`` (3) input channels, dW's sum over n is split
        into chunks of the largest divisor of the batch up to ``DW_BATCH_CHUNK`` (4)
        images, one correlation per chunk added up by ``lax.scan``: the same sum, which
        XLA:CPU computes 2-3× faster on a few images than in one correlation whose
        "kernel" dy spans the whole batch (measured on the bench's CNNs). On 1–3 input
        channels the chunks' correlations contract only 4 images at a time and the whole
        batch in one correlation is faster (the bench's first layers: 5–10% of the step).
        """
        dtype = jnp.result_type(residuals.x, params["W"], dy)
        x, W, dy = residuals.x.astype(dtype), params["W"].astype(dtype), dy.astype(dtype)
        kernel, stride = self.kernel_size, self.stride
        pads, out = self._geometry(x.shape[1:3])
        r = [unread_rows(x.shape[1 + d], kernel[d], stride[d], pads[d], out[d]) for d in range(2)]
        # Both calls are NHWC/HWIO/NHWC convolutions of explicitly transposed operands:
        # XLA:CPU's fast convolution wants the batch axis first and features last, and
        # inside loops and conditionals (``lax.scan`` training, remat) it does not
        # re-layout other dimension numbers for us and falls back to a slow generic loop.
        # dW: x as (C_in, H, W, batch) "images", dy as a (H_out, W_out, batch, C_out) kernel.
        def kernel_gradient(x, dy):
            return lax.conv_general_dilated(
                x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), window_strides=(1, 1),
                padding=[(pads[d][0], pads[d][1] - r[d]) for d in range(2)],
                rhs_dilation=stride, dimension_numbers=NHWC,
            ).transpose(1, 2, 0, 3)

        # The sum over n, taken a few images at a time (see the docstring), accumulated in at
        # least float32.
        n = x.shape[0]
        chunk = n if x.shape[3] <= PATCHES_MAX_C_IN else max(
            c for c in range(1, min(n, DW_BATCH_CHUNK) + 1) if n % c == 0)
        if chunk == n:
            dW = kernel_gradient(x, dy)
        else:
            acc = jnp.promote_types(dtype, jnp.float32)
            pieces = (x.reshape(n // chunk, chunk, *x.shape[1:]),
                      dy.reshape(n // chunk, chunk, *dy.shape[1:]))
            dW, _ = lax.scan(lambda total, xy: (total + kernel_gradient(*xy).astype(acc), None),
                             jnp.zeros(W.shape, acc), pieces)
            dW = dW.astype(dtype)
        # dx: ď (dilated and padded by lax.pad, whose negative pads crop) correlated with
        # the flipped kernel, in/out channels swapped, (kh, kw, C_out, C_in). The same
        # padding given to the convolution as lhs_dilation trips an XLA:CPU check for
        # some legal geometries (e.g. kernel (4, 2), stride (5, 2), padding (2, 1)).
        zero = jnp.zeros((), dy.dtype)
        d_dilated = lax.pad(dy, zero, [
            (0, 0, 0),
            *[(kernel[d] - 1 - pads[d][0], kernel[d] - 1 - pads[d][1] + r[d], stride[d] - 1)
              for d in range(2)],
            (0, 0, 0)])
        dx = lax.conv_general_dilated(
            d_dilated, lax.rev(W, (0, 1)).transpose(0, 1, 3, 2), window_strides=(1, 1),
            padding="VALID", dimension_numbers=NHWC,
        )
        dparams = {"W": dW}
        if self.use_bias:
            dparams["b"] = jnp.sum(dy, axis=(0, 1, 2))
        return dparams, dx
