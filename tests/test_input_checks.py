"""Arguments a network, a loss or fit cannot use are refused with a ValueError that says where.

Integer params, out-of-range labels under ``jax.vmap``, probability and binary targets outside
their domain, classification data with one class or unseen test classes, and arguments of the
wrong type (``weight_decay="0.1"``, ``init(key, 5)``, object arrays).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import Sequential, data, layers, losses, train

KEY = jax.random.key(0)
CTX = layers.Context()  # eval mode, no key


def _net(loss=None, weight_decay=0.0):
    return Sequential([layers.Dense(3), layers.Tanh(), layers.Dense(3)],
                      loss=loss or losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


def _case(loss=None):
    net = _net(loss)
    rng = np.random.default_rng(0)
    params = [{"W": rng.normal(size=(2, 3)), "b": np.zeros(3)}, {},
              {"W": rng.normal(size=(3, 3)), "b": np.zeros(3)}]
    return net, params, rng.normal(size=(4, 2)), np.array([0, 1, 2, 1])


# ------------------------------------------------------------------ float params
@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_non_float_params_are_refused_naming_the_layer_and_param(dtype):
    net, params, x, y = _case()
    params[2] = {"W": params[2]["W"].astype(dtype), "b": params[2]["b"]}
    msg = (f"layers[2] Dense: params['W'] must be a floating-point array (gradients are taken "
           f"with respect to it); got dtype {np.dtype(dtype).name}")
    for call in (net.manual_backward, net.manual_value_and_grad, net.loss,
                 jax.jit(net.manual_backward)):
        with pytest.raises(ValueError, match=re.escape(msg)):
            call(params, x, y)
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.forward(params, x)


def test_init_refuses_a_non_float_dtype():
    msg = "Sequential.init: dtype must be a floating-point dtype (e.g. jnp.float32) or None; got"
    for dtype in (jnp.int32, "bool", "bogus"):
        with pytest.raises(ValueError, match=re.escape(msg)):
            _net().init(KEY, (2,), dtype)
    assert _net().init(KEY, (2,), "float32")[0]["W"].dtype == jnp.float32


# ------------------------------------------------------------ labels and targets
def test_out_of_range_labels_are_refused_under_vmap():
    net, params, x, y = _case()
    xs, ys = np.stack([x, x]), np.stack([y, y + 1])  # the second batch holds a label 3
    msg = ("loss SoftmaxCrossEntropy: integer labels must lie in [0, 3) for 3 classes; got "
           "values in [0, 3]")
    for fn in (net.loss, net.manual_backward, jax.grad(net.loss)):
        with pytest.raises(ValueError, match=re.escape(msg)):
            jax.vmap(fn, in_axes=(None, 0, 0))(params, xs, ys)
    with pytest.raises(ValueError, match=re.escape(msg)):  # the batch on another axis
        jax.vmap(net.loss, in_axes=(None, 0, 1))(params, xs, ys.T)
    hinge = losses.Hinge()
    with pytest.raises(ValueError, match=re.escape("Hinge: integer labels must lie in [0, 3)")):
        jax.vmap(hinge.value, in_axes=(None, 0))(jnp.zeros((4, 3)), jnp.asarray(ys))
    good = jax.vmap(net.loss, in_axes=(None, 0, 0))(params, xs, np.stack([y, y]))
    assert good.shape == (2,) and good[0] == good[1]


@pytest.mark.parametrize("t, message", [
    ([[0.5, 0.5, 0.0], [1.2, -0.2, 0.0]],
     "loss SoftmaxCrossEntropy: probability targets must be >= 0; got 1 negative value(s), the "
     "least -0.2"),
    ([[0.5, 0.5, 0.0], [0.3, 0.3, 0.3]],
     "loss SoftmaxCrossEntropy: each row of probability targets must sum to 1 (within 1.5e-08); "
     "got row sums in [0.9, 1]"),
    ([[0.5, 0.5, 0.0], [np.nan, 0.5, 0.5]],
     "loss SoftmaxCrossEntropy: probability targets hold 1 non-finite value(s) (NaN or ±inf)"),
    (np.array([[1, 1, 0], [0, 0, 1]]),
     "loss SoftmaxCrossEntropy: each row of probability targets must sum to 1 (within 0.0e+00); "
     "got row sums in [1, 2]"),
])
def test_probability_targets_must_be_probabilities(t, message):
    net, params, x, _ = _case()
    good = np.eye(3, dtype=np.asarray(t).dtype)[[0, 1]]
    t = np.concatenate([good, np.asarray(t)])  # (4, 3)
    for call in (net.loss, net.manual_backward,
                 lambda p, a, b: net.loss_fn.value(net.forward(p, a), b)):
        with pytest.raises(ValueError, match=re.escape(message.removeprefix("loss "))):
            call(params, x, t)
    with pytest.raises(ValueError, match=re.escape(message)):  # under vmap too
        jax.vmap(net.loss, in_axes=(None, None, 0))(params, x, np.stack([good[[0, 1, 0, 1]], t]))
    rows = np.full((4, 3), 1 / 3, np.float32)  # float32 rounding is within tolerance
    assert np.isfinite(float(net.loss(params, x, rows)))


@pytest.mark.parametrize("t, shown", [(1.5, "[0.0, 1.5]"), (-0.5, "[-0.5, 0.5]")])
def test_binary_targets_must_lie_in_the_unit_interval(t, shown):
    net, params, x, _ = _case(losses.SigmoidBinaryCrossEntropy())
    targets = np.full((4, 3), 0.5)
    targets[0, 0] = t
    if t > 1:
        targets[1, 1] = 0.0
    msg = (f"loss SigmoidBinaryCrossEntropy: targets must lie in [0, 1] (probabilities of class "
           f"1); got values in {shown}")
    for call in (net.loss, net.manual_value_and_grad):
        with pytest.raises(ValueError, match=re.escape(msg)):
            call(params, x, targets)
    with pytest.raises(ValueError, match=re.escape(msg.removeprefix("loss "))):
        net.loss_fn.value(jnp.zeros((4, 3)), targets)
    with pytest.raises(ValueError, match=re.escape("targets must lie in [0, 1]")):
        net.loss(params, x, (2 * targets).astype(np.int32))  # integer targets are 0/1 too


def test_inside_jit_targets_are_abstract_and_unchecked():
    """Documented: jit sees no values, so an out-of-range label selects no class."""
    net, params, x, y = _case()
    bad = jax.jit(net.loss)(params, x, y + 3)  # no error: the labels are abstract
    assert np.isfinite(float(bad))


# --------------------------------------------------------------- classes in fit
def _dataset(y_train, y_test):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(y_train) + len(y_test), 2)).astype(np.float32)
    return data.Dataset(x[:len(y_train)], np.asarray(y_train, np.int32), x[len(y_train):],
                        np.asarray(y_test, np.int32), 3, "toy")


@pytest.mark.parametrize("y_train, y_test, message", [
    ([1, 1, 1, 1], [1, 1], "fit: the training split holds a single class (1); a classifier "
                           "needs at least two"),
    ([0, 1, 0, 1], [0, 2], "fit: the test split holds class(es) [2] that the training split "
                           "lacks; no training sample teaches them"),
])
def test_fit_refuses_a_single_class_or_an_unseen_test_class(y_train, y_test, message):
    net = _net()
    opt = train.optimizer("sgd", 0.1)
    state = train.init_state(net, opt, KEY, (2,))
    ds = _dataset(y_train, y_test)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_fit_arguments(net, state, ds, epochs=1, batch_size=2)
    one_hot = ds._replace(y_train=np.eye(3)[ds.y_train], y_test=np.eye(3)[ds.y_test])
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_fit_arguments(net, state, one_hot, epochs=1, batch_size=2)
    gaps = _dataset([0, 2, 0, 2], [2, 0])  # a class no split uses is allowed in fit
    train.check_fit_arguments(net, state, gaps, epochs=1, batch_size=2)


# ------------------------------------------------------------ argument types
@pytest.mark.parametrize("bad", ["0.1", True, None, np.ones(3), [0.1]])
def test_weight_decay_must_be_a_real_number(bad):
    msg = f"Sequential: weight_decay must be a finite number >= 0; got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        _net(weight_decay=bad)
    for good in (np.float32(0.5), jnp.asarray(0.5), 1):
        assert _net(weight_decay=good).weight_decay == float(good)


@pytest.mark.parametrize("key, shape, message", [
    (KEY, 5, "Sequential.init: input_shape must be a tuple of ints (batch axis excluded), e.g. "
             "(64,) or (8, 8, 1); got 5"),
    (KEY, "2", "Sequential.init: input_shape must be a tuple of ints"),
    (KEY, (2.0,), "Sequential.init: input_shape must be a tuple of ints"),
    (5, (2,), "Sequential.init: key must be a PRNG key, e.g. jax.random.key(0); got int"),
    (np.zeros(2), (2,), "Sequential.init: key must be a PRNG key, e.g. jax.random.key(0); got "
                        "dtype float64"),
])
def test_init_checks_key_and_input_shape(key, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _net().init(key, shape)
    assert _net().init(jax.random.PRNGKey(0), np.array([2]))[2]["W"].shape == (3, 3)


def test_object_and_string_arrays_are_refused_before_jit():
    net, params, x, y = _case()
    for bad_x in (x.astype(object), np.array([["a", "b"]] * 4)):
        msg = (f"Sequential: input x must be an array of numbers (bool, int or float); got dtype "
               f"{bad_x.dtype}")
        for call in (lambda a: net.forward(params, a), lambda a: net.loss(params, a, y),
                     lambda a: net.manual_backward(params, a, y),
                     lambda a: net.forward_with_residuals(params, a)):
            with pytest.raises(ValueError, match=re.escape(msg)):
                call(bad_x)
    msg = "Sequential: target y must be an array of numbers (bool, int or float); got dtype object"
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.manual_value_and_grad(params, x, y.astype(object))
    with pytest.raises(ValueError, match=re.escape(
            "Sequential: params[0]['W'] must be an array of numbers (bool, int or float); got "
            "dtype object")):
        net.loss([{"W": params[0]["W"].astype(object), "b": params[0]["b"]}, *params[1:]], x, y)
    assert net.loss(params, x=x, y=y) == net.loss(params, x, y)  # keywords still work


def test_a_network_too_large_for_memory_is_refused_before_allocating():
    net = Sequential([layers.Dense(10**12)], loss=losses.SoftmaxCrossEntropy())
    msg = (r"Sequential.init: 257000000000000 parameters and state entries would need "
           r"9.57e\+05 GiB, more than the")
    with pytest.raises(ValueError, match=msg):
        net.init(KEY, (256,), "float32")
    with pytest.raises(ValueError, match=msg):  # inside jit too (init_state)
        train.init_state(net, train.optimizer("sgd", 0.1), KEY, (256,), "float32")


@pytest.mark.parametrize("call, message", [
    (lambda: losses.SigmoidBinaryCrossEntropy().value(jnp.zeros((2, 2)),
                                                      np.array([[0, 1], [1, None]], object)),
     "SigmoidBinaryCrossEntropy: target y must be an array of numbers (bool, int or float); got "
     "dtype object"),
    (lambda: losses.MeanSquaredError().value(np.ones((2, 2), object), np.zeros((2, 2))),
     "MeanSquaredError: network output y_hat must be an array of numbers"),
    (lambda: layers.ReLU().check({}, {}, np.array(["a"]), CTX),
     "ReLU: input x must be an array of numbers (bool, int or float); got dtype <U1"),
])
def test_layers_and_losses_called_directly_refuse_object_arrays(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
