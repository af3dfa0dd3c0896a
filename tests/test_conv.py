"""Conv2D: tutorial numbers, a NumPy oracle, backward vs ``jax.vjp``, output sizes vs XLA, errors.

Gradient grid: the full product of kernel 1–5 × stride 1–3 × padding (0, 1, 2,
SAME, VALID) (75 geometries), each with input channels, filters, height, width
(odd and even) drawn from a generator seeded by the configuration's index, and
batch 1, 3, 12 or 7 (with 4 input channels, the last two compute dW in chunks of 4
and of 1 image); a second test crosses all channel × filter counts. Every
configuration runs in one jitted function per test, so the grid costs one compile.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxbp import Sequential, conv_output_size, layers, losses, models
from jaxbp.layers.base import call
from jaxbp.layers.conv import PATCHES_MAX_C_IN
from tests.helpers import RUN_ONCE, max_tree_rel_error, random_params

KEY = jax.random.key(0)
IMAGE = np.array(
    [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], float
)  # tutorial 004's 5×5 binary image
FILTER = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], float)
PADDINGS = [0, 1, 2, "SAME", "VALID"]
CTX = layers.Context()  # eval mode, no key: these layers are deterministic and stateless


# ------------------------------------------------------------------ helpers
def forward(layer, params, x):
    """``(y, residuals)`` of a stateless layer, through ``check`` then ``forward``.

    ``call`` is how a container runs a child: valid inputs here must pass the layer's
    checks too, and the state the layer returns must stay ``{}``.
    """
    y, state, residuals = call(layer, "layer", params, {}, x, CTX)
    assert state == {}, state
    return y, residuals


def random_case(layer, input_shape, batch, seed, dtype=np.float64):
    """``(params, x, dy)`` drawn by NumPy: params (non-zero biases too), input, cotangent.

    Only shapes come from JAX (``jax.eval_shape`` traces without compiling), so a
    grid of configurations costs no per-configuration compiles here.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: layer.init(k, input_shape, dtype)[0], KEY)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(dtype), shapes)
    x = rng.normal(size=(batch, *input_shape)).astype(dtype)
    y = jax.eval_shape(lambda p, a: forward(layer, p, a)[0], params, x)
    return params, x, rng.normal(size=y.shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _manual_and_vjp(layers_, cases):
    out = []
    for layer, (params, x, dy) in zip(layers_, cases, strict=True):
        _, residuals = forward(layer, params, x)
        _, pullback = jax.vjp(lambda p, a, layer=layer: forward(layer, p, a)[0], params, x)
        out.append((layer.backward(params, residuals, dy), pullback(dy)))
    return out


def manual_and_vjp(layer_cases):
    """For ``[(layer, (params, x, dy)), …]``: ``[(manual, vjp), …]`` from one compile."""
    return _manual_and_vjp(tuple(layer for layer, _ in layer_cases),
                           [case for _, case in layer_cases])


def assert_backward_matches_vjp(layer_cases, bound=1e-10):
    for (layer, (_, x, _)), (manual, auto) in zip(layer_cases, manual_and_vjp(layer_cases),
                                                  strict=True):
        assert jax.tree.structure(manual) == jax.tree.structure(auto), layer
        err = max_tree_rel_error(manual, auto)
        assert err <= bound, (layer, x.shape, err)


def naive_conv(x, W, b, stride, pads):
    """Tutorial 004's sum ``y_ij = Σ_d Σ_m Σ_n w_dmn x_{d, S·i+m, S·j+n} + w_b`` in loops."""
    x = np.pad(np.asarray(x), ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw, _, f = W.shape
    h_out = (x.shape[1] - kh) // stride[0] + 1
    w_out = (x.shape[2] - kw) // stride[1] + 1
    y = np.zeros((x.shape[0], h_out, w_out, f))
    for i in range(h_out):
        for j in range(w_out):
            patch = x[:, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw, :]
            y[:, i, j, :] = np.einsum("nmkc,mkcf->nf", patch, np.asarray(W)) + np.asarray(b)
    return y


# ----------------------------------------------------------- tutorial numbers
def tutorial_params():
    return {"W": jnp.asarray(FILTER)[:, :, None, None], "b": jnp.zeros((1,))}


def test_tutorial_feature_map_stride_1():
    y, _ = forward(layers.Conv2D(1, 3), tutorial_params(), jnp.asarray(IMAGE)[None, :, :, None])
    assert y.shape == (1, 3, 3, 1)
    assert y[0, 0, 0, 0] == 4  # 1+0+1+0+1+0+0+0+1
    np.testing.assert_array_equal(y[0, :, :, 0], [[4, 3, 4], [2, 4, 3], [2, 3, 4]])


def test_tutorial_feature_map_stride_2():
    layer = layers.Conv2D(1, 3, stride=2)
    y, _ = forward(layer, tutorial_params(), jnp.asarray(IMAGE)[None, :, :, None])
    np.testing.assert_array_equal(y[0, :, :, 0], [[4, 4], [2, 4]])
    assert layer.init(KEY, (5, 5, 1))[1:] == ({}, (2, 2, 1))
    assert conv_output_size(5, 3, stride=2, padding=0) == 2


def test_numpy_ints_make_the_same_layers():
    i = np.int64
    assert repr(layers.Conv2D(i(2), (i(3), 2), stride=i(2), padding=(i(1), 0))) == repr(
        layers.Conv2D(2, (3, 2), stride=2, padding=(1, 0)))
    assert repr(layers.MaxPool2D(i(2), stride=np.int32(1))) == repr(layers.MaxPool2D(2, 1))
    assert conv_output_size(i(5), i(3), stride=i(2), padding=i(1)) == 3


def test_tutorial_depth_3_two_filters():
    """5×5×3, zero padding 1 (7×7×3), two 3×3×3 filters, stride 2 → 3×3×2, 56 parameters."""
    layer = layers.Conv2D(2, 3, stride=2, padding=1)
    params, x, _ = random_case(layer, (5, 5, 3), 1, seed=1)
    assert layer.init(KEY, (5, 5, 3))[1:] == ({}, (3, 3, 2))
    assert params["W"].shape == (3, 3, 3, 2)
    assert sum(p.size for p in params.values()) == (3 * 3 * 3 + 1) * 2 == 56
    y, _ = forward(layer, params, x)
    np.testing.assert_allclose(
        y, naive_conv(x, params["W"], params["b"], (2, 2), ((1, 1), (1, 1))), rtol=1e-12
    )


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [(3, 1, 0), ((2, 3), (1, 2), ((0, 2), (1, 0))), (4, 3, "SAME"), (1, 2, 2), (5, 1, "SAME")],
)
@pytest.mark.parametrize("c_in", [2, PATCHES_MAX_C_IN + 1])  # the patches GEMM and the conv
def test_forward_matches_naive_loops(kernel, stride, padding, c_in):
    layer = layers.Conv2D(3, kernel, stride, padding)
    params, x, _ = random_case(layer, (7, 6, c_in), 2, seed=2)
    pads, _ = layer._geometry((7, 6))
    y, _ = forward(layer, params, x)
    np.testing.assert_allclose(y, naive_conv(x, params["W"], params["b"], layer.stride, pads),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ backward vs vjp
def grid_cases():
    cases = []
    for i, (k, s, p) in enumerate(itertools.product(range(1, 6), range(1, 4), PADDINGS)):
        rng = np.random.default_rng(i)
        c_in, filters = (int(v) for v in rng.integers(1, 5, size=2))
        h, w = int(rng.integers(5, 7)), int(rng.integers(7, 9))  # odd and even sizes
        batch = (1, 3, 12, 7)[i % 4]  # 12, 7 and C_in 4: dW in chunks of 4 and of 1 image
        layer = layers.Conv2D(filters, k, s, p, use_bias=bool(i % 3))
        cases.append((layer, random_case(layer, (h, w, c_in), batch, seed=i)))
    return cases


def test_backward_matches_vjp_over_geometry_grid():
    cases = grid_cases()
    assert len(cases) == 75
    assert_backward_matches_vjp(cases)


def test_backward_matches_vjp_over_channels_and_filters():
    cases = []
    for c_in, filters, batch in itertools.product(range(1, 5), range(1, 5), (1, 2)):
        layer = layers.Conv2D(filters, (3, 2), stride=(2, 1), padding=((1, 0), (2, 1)))
        cases.append((layer, random_case(layer, (6, 5, c_in), batch, seed=c_in * filters)))
    assert_backward_matches_vjp(cases)


def test_backward_float32():
    """float32: both sides sum the same products in different orders; 1e-5 relative."""
    layer = layers.Conv2D(4, 3, stride=2, padding="SAME")
    case = random_case(layer, (9, 8, 3), 4, seed=5, dtype=np.float32)
    [((dparams, _), _)] = manual_and_vjp([(layer, case)])
    assert dparams["W"].dtype == jnp.float32
    assert_backward_matches_vjp([(layer, case)], bound=1e-5)


def test_backward_where_xla_lhs_dilation_aborts():
    """Kernel (4, 2), stride (5, 2), padding (2, 1) on 4×4: XLA:CPU aborts the process on
    the transpose convolution ``jax.vjp`` builds here (lhs_dilation), so the reference
    is forward-mode: the Jacobians of ``jax.jacfwd`` contracted with dy."""
    layer = layers.Conv2D(2, (4, 2), stride=(5, 2), padding=(2, 1))
    params, x, dy = random_case(layer, (4, 4, 3), 2, seed=7)
    dparams, dx = layer.backward(params, forward(layer, params, x)[1], dy)

    def reference(fn, arg):
        return jnp.tensordot(dy, jax.jacfwd(fn)(arg), axes=dy.ndim)

    dx_ref = reference(lambda x: forward(layer, params, x)[0], x)
    dW_ref = reference(lambda W: forward(layer, {**params, "W": W}, x)[0], params["W"])
    assert max_tree_rel_error([dx, dparams["W"]], [dx_ref, dW_ref]) <= 1e-12


def test_float32_backward_with_padding_beyond_the_kernel():
    """Padding larger than kernel − 1 (windows wholly in the padding): in float32, XLA:CPU's
    transpose convolution (what jax.vjp runs) returned dx off by up to 1e21 here; the
    hand-written backward stays within float32 rounding of the float64 one."""
    for kernel, padding, hw in [((2, 3), ((2, 0), (4, 3)), (1, 1)),
                                ((4, 4), ((5, 4), (5, 1)), (9, 3))]:
        layer = layers.Conv2D(2, kernel, padding=padding)
        params, x, dy = random_case(layer, (*hw, 3), 2, seed=11)
        grads = {}
        for dtype in (np.float32, np.float64):
            p, a, d = jax.tree.map(lambda v, t=dtype: np.asarray(v, t), (params, x, dy))
            dparams, dx = layer.backward(p, forward(layer, p, a)[1], d)
            grads[dtype] = [dx, dparams["W"]]
        assert grads[np.float32][0].dtype == np.float32
        assert max_tree_rel_error(grads[np.float32], grads[np.float64]) <= 1e-5
        # and the float64 one is autodiff's (XLA:CPU is right there)
        p, a, d = jax.tree.map(lambda v: np.asarray(v, np.float64), (params, x, dy))
        _, vjp = jax.vjp(lambda W, a, p=p, layer=layer: forward(layer, {**p, "W": W}, a)[0],
                         p["W"], a)
        dW_ref, dx_ref = vjp(d)
        assert max_tree_rel_error(grads[np.float64], [dx_ref, dW_ref]) <= 1e-10


@st.composite
def conv_configs(draw):
    """Random valid configurations, including inputs smaller than the kernel when padded."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    pads = ((0, 0), (0, 0))
    if padding == "explicit":
        padding = pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in "hw")
    lo = [1 if padding == "SAME" else max(1, k - sum(p))
          for k, p in zip((kh, kw), pads, strict=True)]
    h, w = draw(st.integers(lo[0], 9)), draw(st.integers(lo[1], 9))
    c_in, filters, batch = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    return layers.Conv2D(filters, (kh, kw), stride, padding), (h, w, c_in), batch


@settings(max_examples=20)
@given(config=conv_configs(), seed=st.integers(0, 2**16))
def test_property_backward_matches_vjp(config, seed):
    layer, input_shape, batch = config
    assert_backward_matches_vjp([(layer, random_case(layer, input_shape, batch, seed))])


# ------------------------------------------------------------- whole CNNs
CNN_CASES = [  # (model, input shape, dtype, bound)
    (models.cnn((28, 28, 1), classes=10, weight_decay=1e-3), (28, 28, 1), np.float64, 1e-10),
    (models.cnn((8, 8, 1), classes=10, weight_decay=1e-3), (8, 8, 1), np.float64, 1e-10),
    (models.cnn((28, 28, 1), classes=10, weight_decay=1e-3), (28, 28, 1), np.float32, 1e-4),
    (models.cnn((9, 11, 2), classes=10, weight_decay=1e-3), (9, 11, 2), np.float32, 1e-4),
    (models.cifar_cnn((8, 8, 3), classes=10, filters=(4, 6), weight_decay=1e-3), (8, 8, 3),
     np.float64, 1e-10),
    (models.cifar_cnn((12, 10, 3), classes=10, filters=(3, 5)), (12, 10, 3), np.float32, 1e-4),
]


def test_cnn_models_manual_backward_matches_grad():
    """The LeNet-style and the CIFAR-style models against ``jax.grad``, in one program.

    float32 bound 1e-4: the two backward passes round in different orders.
    """
    rng = np.random.default_rng(3)
    cases = []
    for net, shape, dtype, _ in CNN_CASES:
        params = jax.tree.map(jnp.asarray, random_params(net, shape, rng, dtype))
        x = jnp.asarray(rng.normal(size=(6, *shape)), dtype)  # dW in two chunks of 3
        cases.append((params, x, jnp.asarray(rng.integers(0, 10, size=6))))
    nets = [net for net, *_ in CNN_CASES]

    @functools.partial(jax.jit, compiler_options=RUN_ONCE)
    def both(cases):
        return [(net.manual_backward(p, x, y), jax.grad(net.loss)(p, x, y))
                for net, (p, x, y) in zip(nets, cases, strict=True)]

    for (_, shape, dtype, bound), (manual, auto) in zip(CNN_CASES, both(cases), strict=True):
        assert manual[0]["W"].dtype == dtype
        assert max_tree_rel_error(manual, auto) <= bound, (shape, dtype)


def test_cnn_shapes():
    net = models.cnn((8, 8, 1), classes=10, filters=(4, 6))
    params = net.init(KEY, (8, 8, 1))
    assert [p["W"].shape for p in params if p] == [(3, 3, 1, 4), (3, 3, 4, 6), (24, 10)]
    assert models.cnn().output_shape((28, 28, 1)) == (10,)
    msg = "cnn: input_shape must be at least 4×4 for two 2×2 poolings; got (3, 8, 1)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        models.cnn((3, 8, 1))


def test_cifar_cnn_shapes_and_errors():
    net = models.cifar_cnn()
    params = jax.eval_shape(lambda k: net.init(k, (32, 32, 3)), KEY)
    assert [p["W"].shape for p in params if p] == [
        (3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64), (8 * 8 * 64, 10)]
    assert [layer.name for layer in net.layers[:5]] == [
        "Conv2D", "ReLU", "Conv2D", "ReLU", "MaxPool2D"]
    for args, msg in [
        (((3, 8, 3),), "cifar_cnn: input_shape must be at least 4×4 for 2 stages of 2×2 "
                       "pooling; got (3, 8, 3)"),
        (((8, 8),), "cifar_cnn: input_shape must be (height, width, channels); got (8, 8)"),
        (((8, 8, 3), 10, ()), "cifar_cnn: filters must be a non-empty sequence of channel "
                              "counts, one per stage, e.g. (32, 64); got ()"),
        (((8, 8, 3), 10, (4, 0)), "cifar_cnn: filters entry must be"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            models.cifar_cnn(*args)


# ------------------------------------------------------- output size vs XLA
@pytest.mark.parametrize("padding", [0, 1, 2, (0, 2), (3, 1), "SAME", "VALID"])
def test_output_size_agrees_with_xla(padding):
    """``conv_output_size`` equals the shapes XLA's convolution and reduce_window produce."""
    for size, kernel, stride in itertools.product(range(1, 10), range(1, 6), range(1, 4)):
        if isinstance(padding, str):
            pads = padding
        else:
            pads = [padding if isinstance(padding, tuple) else (padding, padding)]
        x = jax.ShapeDtypeStruct((1, size, 1), jnp.float32)
        w = jax.ShapeDtypeStruct((kernel, 1, 1), jnp.float32)
        conv = functools.partial(lax.conv_general_dilated, window_strides=(stride,),
                                 padding=pads, dimension_numbers=("NWC", "WIO", "NWC"))
        pool = functools.partial(
            lax.reduce_window, init_value=0.0, computation=lax.add,
            window_dimensions=(1, kernel, 1), window_strides=(1, stride, 1),
            padding=pads if isinstance(pads, str) else [(0, 0), *pads, (0, 0)])
        want = jax.eval_shape(conv, x, w).shape[1]  # 0 where no window fits
        assert jax.eval_shape(pool, x).shape[1] == want
        if want >= 1:
            assert conv_output_size(size, kernel, stride, padding) == want, (size, kernel, stride)
        else:
            with pytest.raises(ValueError, match="is smaller than 1"):
                conv_output_size(size, kernel, stride, padding)


# ----------------------------------------------------------------- bad input
def test_channel_mismatch():
    layer = layers.Conv2D(4, 3)
    params, state, _ = layer.init(KEY, (8, 8, 3))
    msg = ("Conv2D: input x has 1 channels but W expects 3 (W shape (3, 3, 3, 4)); "
           "got x shape (2, 8, 8, 1), expected (batch, height, width, 3)")
    with pytest.raises(ValueError, match=re.escape(msg) + "$"):
        layer.check(params, state, jnp.ones((2, 8, 8, 1)), CTX)


def test_nchw_input_is_named():
    net = Sequential([layers.Conv2D(4, 3), layers.Flatten(), layers.Dense(2)],
                     loss=losses.SoftmaxCrossEntropy())
    params = net.init(KEY, (8, 8, 3))
    msg = ("layers[0] Conv2D: input x has 8 channels but W expects 3 (W shape (3, 3, 3, 4)); "
           "got x shape (2, 3, 8, 8), expected (batch, height, width, 3); x looks like NCHW "
           "(axis 1 has 3): jaxbp images are NHWC, use x.transpose(0, 2, 3, 1)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.forward(params, jnp.ones((2, 3, 8, 8)))


def test_wrong_rank():
    layer = layers.Conv2D(4, 3)
    params, state, _ = layer.init(KEY, (8, 8, 1))
    msg = ("Conv2D: input x must have rank 4 (batch, height, width, channels) NHWC; "
           "got shape (8, 8, 1) (rank 3)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.check(params, state, jnp.ones((8, 8, 1)), CTX)
    msg = ("Conv2D: input_shape must be (height, width, channels) (batch axis excluded, NHWC); "
           "got (784,)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.init(KEY, (784,))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"filters": 0, "kernel_size": 3}, "Conv2D: filters must be a positive int; got 0"),
        ({"filters": 2, "kernel_size": (3, 0)},
         "Conv2D: kernel_size must be a positive int or a pair of positive ints; got (3, 0)"),
        ({"filters": 2, "kernel_size": 3, "stride": 0},
         "Conv2D: stride must be a positive int or a pair of positive ints; got 0"),
        ({"filters": 2, "kernel_size": 3, "stride": -1},
         "Conv2D: stride must be a positive int or a pair of positive ints; got -1"),
        ({"filters": 2, "kernel_size": 3, "padding": -1},
         'Conv2D: padding must be "SAME", "VALID", an int >= 0, a pair (ph, pw) or '
         "((top, bottom), (left, right)) of ints >= 0; got -1"),
        ({"filters": 2, "kernel_size": 3, "padding": ((0, -1), (0, 0))},
         "of ints >= 0; got ((0, -1), (0, 0))"),
        ({"filters": 2, "kernel_size": 3, "padding": "FULL"}, "of ints >= 0; got 'FULL'"),
    ],
)
def test_bad_hyperparameters(kwargs, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        layers.Conv2D(**kwargs)


def test_output_smaller_than_one_names_the_formula():
    net = Sequential([layers.Conv2D(2, (2, 5), stride=(1, 2), padding=((0, 0), (1, 0))),
                      layers.Flatten(), layers.Dense(2)], loss=losses.SoftmaxCrossEntropy())
    msg = ("layers[0] Conv2D: output width ⌊(W − F + P_lo + P_hi)/S⌋ + 1 = "
           "⌊(3 − 5 + 1 + 0)/2⌋ + 1 = 0 is smaller than 1 (input width W=3, kernel F=5, "
           "stride S=2, padding (1, 0))")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.init(KEY, (4, 3, 1))
    params = models.cnn((4, 4, 1)).init(KEY, (4, 4, 1))  # forward checks too
    with pytest.raises(ValueError, match=re.escape("layers[2] MaxPool2D: output height")):
        models.cnn((4, 4, 1)).forward(params, jnp.ones((1, 1, 4, 1)))


def test_conv_output_size_errors():
    msg = ("conv_output_size: output size ⌊(W − F + P_lo + P_hi)/S⌋ + 1 = "
           "⌊(2 − 5 + 1 + 1)/1⌋ + 1 = 0 is smaller than 1 (input size W=2, kernel F=5, "
           "stride S=1, padding (1, 1))")
    with pytest.raises(ValueError, match=re.escape(msg)):
        conv_output_size(2, 5, 1, 1)
    with pytest.raises(ValueError, match=re.escape("conv_output_size: stride must be a "
                                                   "positive int; got 0")):
        conv_output_size(5, 3, 0)
    with pytest.raises(ValueError, match=re.escape("conv_output_size: padding must be")):
        conv_output_size(5, 3, 1, -1)
