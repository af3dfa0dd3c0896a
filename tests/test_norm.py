"""LayerNorm and RMSNorm: hand-written backward against ``jax.vjp`` per layer and ``jax.grad``
in networks, independent NumPy values, weight decay leaving their scales alone, pinned errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, gradcheck, layers, losses
from jaxbp.layers.base import call
from tests.helpers import RUN_ONCE, max_tree_rel_error, random_params

NORMS = [layers.LayerNorm(), layers.LayerNorm(eps=0.5), layers.RMSNorm(), layers.RMSNorm(eps=0.5)]
CTX = layers.Context()  # eval mode: LayerNorm and RMSNorm are stateless, the same in both


def forward(layer, params, x):
    """``(y, residuals)`` through ``check`` then ``forward``, as a container runs a layer."""
    y, state, residuals = call(layer, "layer", params, {}, x, CTX)
    assert state == {}, state
    return y, residuals


def random_case(layer, shape, seed, dtype=np.float64):
    """NumPy params (scale and offset away from their init), x and dy of shape ``shape``."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=v.shape).astype(dtype)
              for k, v in layer.init(None, shape[1:], dtype)[0].items()}
    x = (3.0 * rng.normal(size=shape) + 1.0).astype(dtype)  # rows far from mean 0, var 1
    dy = rng.normal(size=shape).astype(dtype)
    return params, x, dy


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _both(layer, params, x, dy):
    """(manual, autodiff) cotangents of one layer, compiled as one program."""
    y, residuals = forward(layer, params, x)
    manual = layer.backward(params, residuals, dy)
    _, pullback = jax.vjp(lambda p, a: forward(layer, p, a)[0], params, x)
    return manual, pullback(dy)


@pytest.mark.parametrize("layer", NORMS, ids=repr)
@pytest.mark.parametrize("shape", [(1, 5), (7, 6), (2, 3, 4), (2, 2, 3, 5)], ids=str)
def test_backward_matches_vjp_float64(layer, shape):
    manual, auto = _both(layer, *random_case(layer, shape, seed=len(shape)))
    assert max_tree_rel_error(manual, auto) <= 1e-10


@pytest.mark.parametrize("layer", NORMS, ids=repr)
def test_backward_matches_vjp_float32(layer):
    """float32: both sides round differently; 1e-5 relative is the documented bound."""
    manual, auto = _both(layer, *random_case(layer, (8, 3, 6), seed=3, dtype=np.float32))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(manual))
    assert max_tree_rel_error(manual, auto) <= 1e-5


@settings(max_examples=12)
@given(
    kind=st.sampled_from(["layer", "rms"]),
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    eps=st.sampled_from([1e-6, 1e-3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_vjp(kind, shape, eps, seed):
    layer = layers.LayerNorm(eps) if kind == "layer" else layers.RMSNorm(eps)
    manual, auto = _both(layer, *random_case(layer, tuple(shape), seed))
    assert max_tree_rel_error(manual, auto) <= 1e-10


def test_values_match_numpy_formula():
    """Forward values against the textbook formulas in NumPy (not the code under test)."""
    ln, rms = layers.LayerNorm(eps=1e-3), layers.RMSNorm(eps=1e-3)
    p_ln, x, _ = random_case(ln, (4, 3, 5), seed=0)
    p_rms, _, _ = random_case(rms, (4, 3, 5), seed=0)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    want_ln = (x - mu) / np.sqrt(var + 1e-3) * p_ln["scale"] + p_ln["offset"]
    want_rms = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-3) * p_rms["scale"]
    np.testing.assert_allclose(forward(ln, p_ln, x)[0], want_ln, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(forward(rms, p_rms, x)[0], want_rms, rtol=1e-13, atol=1e-13)


def test_layernorm_matches_torch():
    torch = pytest.importorskip("torch")
    layer = layers.LayerNorm(eps=1e-4)
    params, x, dy = random_case(layer, (3, 4, 6), seed=5)
    ref = torch.nn.LayerNorm(6, eps=1e-4, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(params["scale"]))
        ref.bias.copy_(torch.from_numpy(params["offset"]))
    xt = torch.from_numpy(x).requires_grad_()
    out = ref(xt)
    out.backward(torch.from_numpy(dy))
    y, residuals = forward(layer, params, x)
    dparams, dx = layer.backward(params, residuals, dy)
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dparams["scale"], ref.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dparams["offset"], ref.bias.grad.numpy(), rtol=1e-10)


def _norm_net(weight_decay=0.0):
    return Sequential(
        [layers.Dense(6), layers.LayerNorm(), layers.Tanh(), layers.Dense(4), layers.RMSNorm(),
         layers.ReLU(), layers.Dense(3)],
        loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay,
    )


def test_network_matches_autodiff_and_decay_skips_scales():
    net = _norm_net(weight_decay=0.3)
    rng = np.random.default_rng(0)
    params = random_params(net, (5,), rng)
    x, y = rng.normal(size=(9, 5)), rng.integers(0, 3, size=9)
    manual = net.manual_backward(params, x, y)
    auto = jax.grad(net.loss)(params, x, y)
    assert max_tree_rel_error(manual, auto) <= 1e-10
    decayed = sum(np.sum(np.asarray(params[i]["W"]) ** 2) for i in (0, 3, 6))
    assert float(net.weight_penalty(params)) == pytest.approx(0.15 * decayed, rel=1e-12)
    init = net.init(jax.random.key(0), (5,))[1]
    np.testing.assert_array_equal(init["scale"], np.ones(6))
    np.testing.assert_array_equal(init["offset"], np.zeros(6))


def test_gradcheck_passes_and_names_rows():
    net = _norm_net()
    rng = np.random.default_rng(1)
    params = random_params(net, (5,), rng)
    report = gradcheck(net, params, rng.normal(size=(6, 5)), rng.integers(0, 3, size=6))
    assert report.ok, str(report)
    assert {"layers[1].scale", "layers[1].offset", "layers[4].scale"} <= {
        r.path for r in report.rows}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: layers.LayerNorm(eps=0.0), "LayerNorm: eps must be a finite number > 0; got 0.0"),
        (lambda: layers.RMSNorm(eps=float("nan")), "RMSNorm: eps must be a finite number"),
        (lambda: layers.LayerNorm().init(None, ()),
         r"LayerNorm: input_shape must be \(…, features\) with positive sizes"),
        (lambda: layers.LayerNorm().check({"scale": jnp.ones(3), "offset": jnp.zeros(3)}, {},
                                          jnp.ones((2, 4)), CTX),
         r"LayerNorm: input x must have shape \(batch, …, 3\) to match scale of shape \(3,\); "
         r"got x shape \(2, 4\)"),
        (lambda: layers.RMSNorm().check({"scale": jnp.ones(3)}, {}, jnp.ones(3), CTX),
         r"RMSNorm: input x must have shape \(batch, …, 3\)"),
        (lambda: layers.RMSNorm().check({"scale": jnp.ones((3, 1))}, {}, jnp.ones((2, 3)), CTX),
         r"RMSNorm: params\['scale'\] must have shape \(features,\)"),
        (lambda: layers.LayerNorm().check({"scale": jnp.ones(3)}, {}, jnp.ones((2, 3)), CTX),
         r"LayerNorm: params must have the keys \['offset', 'scale'\]; got \['scale'\]"),
    ],
)
def test_errors_name_layer_and_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_error_in_network_names_layer_path():
    net = _norm_net()
    params = net.init(jax.random.key(0), (5,))
    params[1] = {"scale": jnp.ones(7), "offset": jnp.zeros(7)}
    with pytest.raises(ValueError, match=r"layers\[1\] LayerNorm: input x must have shape"):
        net.forward(params, jnp.ones((2, 5)))
