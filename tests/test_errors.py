"""Bad input raises a ValueError naming the layer, the argument and both shapes."""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxbp import Sequential, layers, losses, models
from jaxbp.layers.base import call
from tests.helpers import max_tree_rel_error

CTX = layers.Context()  # eval mode, no key


def mlp(loss=None):
    net = Sequential(
        [layers.Dense(4), layers.ReLU(), layers.Dense(3)],
        loss=loss or losses.SoftmaxCrossEntropy(),
    )
    return net, net.init(jax.random.key(0), (2,))


def test_wrong_feature_size_names_layer_and_shapes():
    net, params = mlp()
    msg = ("layers[0] Dense: input x must have shape (batch, …, 2) to match W of shape (2, 4); "
           "got x shape (7, 5)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.forward(params, jnp.ones((7, 5)))


def test_wrong_rank():
    """One sample without its batch axis: Dense takes (batch, …, in) of any rank >= 2."""
    net, params = mlp()
    msg = ("layers[0] Dense: input x must have shape (batch, …, 2) to match W of shape (2, 4); "
           "got x shape (2,)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.loss(params, jnp.ones((2,)), jnp.array([0]))


def test_hand_built_params_with_wrong_shape_name_the_later_layer():
    net, params = mlp()
    params[2]["W"] = jnp.ones((5, 3))
    with pytest.raises(ValueError, match=re.escape(
            "layers[2] Dense: input x must have shape (batch, …, 5) to match W of shape (5, 3); "
            "got x shape (1, 4)")):
        net.manual_backward(params, jnp.ones((1, 2)), jnp.array([0]))


def test_labels_of_the_wrong_shape():
    net, params = mlp()
    msg = ("loss SoftmaxCrossEntropy: y must be integer labels (4,) or probability targets "
           "(4, 3); got shape (4, 1) with dtype int64")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.loss(params, jnp.ones((4, 2)), jnp.zeros((4, 1), int))


@pytest.mark.parametrize("method", ["loss", "manual_backward", "manual_value_and_grad"])
def test_labels_out_of_range_when_concrete(method):
    net, params = mlp()
    msg = ("loss SoftmaxCrossEntropy: integer labels must lie in [0, 3) for 3 classes; "
           "got values in [0, 3]")
    with pytest.raises(ValueError, match=re.escape(msg)):
        getattr(net, method)(params, jnp.ones((2, 2)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match=re.escape("got values in [-1, 0]")):
        jax.grad(net.loss)(params, jnp.ones((2, 2)), jnp.array([0, -1]))


def test_targets_of_the_wrong_shape_for_regression():
    net, params = mlp(losses.HalfSquaredError())
    msg = ("loss HalfSquaredError: target y must have the shape of the network output (4, 3); "
           "got (4, 2)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.loss(params, jnp.ones((4, 2)), jnp.ones((4, 2)))


def test_unknown_loss_target_combinations():
    net, params = mlp(losses.Hinge())
    with pytest.raises(ValueError, match=re.escape(
            "loss Hinge: y must be integer labels of shape (4,); got dtype float")):
        net.loss(params, jnp.ones((4, 2)), jnp.ones((4, 3)))
    net, params = mlp()
    with pytest.raises(ValueError, match=re.escape(
            "loss SoftmaxCrossEntropy: y must be integer labels (4,) or probability targets "
            "(4, 3); got shape (4,) with dtype float")):
        net.loss(params, jnp.ones((4, 2)), jnp.ones((4,)))


def test_params_of_the_wrong_structure():
    net, params = mlp()
    with pytest.raises(ValueError, match=re.escape(
            "Sequential: params must be a list with one entry per layer (3); got 2")):
        net.forward(params[:2], jnp.ones((1, 2)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=re.escape("Dense: units must be a positive int; got 0")):
        layers.Dense(0)
    with pytest.raises(ValueError, match=re.escape("Dense: init must be one of")):
        layers.Dense(3, init="uniform")
    for bad in (-1, float("inf"), float("nan")):
        msg = f"Sequential: weight_decay must be a finite number >= 0; got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(msg)):
            Sequential([layers.Dense(1)], loss=losses.MeanSquaredError(), weight_decay=bad)
    msg = "Sequential: loss must be a jaxbp loss; got str"
    with pytest.raises(ValueError, match=re.escape(msg)):
        Sequential([layers.Dense(1)], loss="mse")
    with pytest.raises(ValueError, match=re.escape(
            "Sequential: layers[1] must be a jaxbp layer; got builtin_function_or_method")):
        Sequential([layers.Dense(1), max], loss=losses.MeanSquaredError())


def test_init_of_dense_needs_a_feature_axis():
    """Dense maps (…, in) to (…, units) at every position, so an image shape is a valid input
    shape; an input shape without a feature axis is not."""
    net = Sequential([layers.Dense(3)], loss=losses.MeanSquaredError())
    assert net.output_shape((8, 8, 1)) == (8, 8, 3)
    msg = "layers[0] Dense: input_shape must be (…, features) (batch axis excluded); got ()"
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.init(jax.random.key(0), ())


def test_params_of_another_network_are_rejected():
    # a 5-class net's parameters in a 3-class net: the last Dense layer names the mismatch
    net = Sequential([layers.Dense(4), layers.ReLU(), layers.Dense(3)],
                     loss=losses.SoftmaxCrossEntropy())
    other = Sequential([layers.Dense(4), layers.ReLU(), layers.Dense(5)],
                       loss=losses.SoftmaxCrossEntropy())
    params = other.init(jax.random.key(0), (2,))
    msg = "layers[2] Dense: params['W'] must have shape (in, units) = (*, 3); got (4, 5)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.forward(params, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match=re.escape(msg)):
        jax.jit(net.manual_backward)(params, jnp.ones((1, 2)), jnp.array([0]))


@pytest.mark.parametrize("layer, params, msg", [
    (layers.Dense(3), {"W": jnp.ones((2, 3))}, "Dense: params must have the keys ['W', 'b']; "
     "got ['W']"),
    (layers.Dense(3), {"W": jnp.ones((2, 3)), "b": jnp.ones(4)},
     "Dense: params['b'] must have shape (units,) = (3,); got (4,)"),
    (layers.Dense(3, use_bias=False), {"W": jnp.ones(3)},
     "Dense: params['W'] must have shape (in, units) = (*, 3); got (3,)"),
    (layers.Conv2D(2, 3), {"W": jnp.ones((3, 3, 1, 4)), "b": jnp.ones(2)},
     "Conv2D: params['W'] must have shape (kh, kw, C_in, filters) = (3, 3, *, 2); "
     "got (3, 3, 1, 4)"),
])
def test_layer_params_of_the_wrong_shape(layer, params, msg):
    x = jnp.ones((1, 4, 4, 1)) if isinstance(layer, layers.Conv2D) else jnp.ones((1, 2))
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.check(params, {}, x, CTX)


def test_init_with_empty_input_shapes():
    with pytest.raises(ValueError, match=re.escape(
            "Dense: input_shape[0] must be a positive int; got 0")):
        layers.Dense(3).init(jax.random.key(0), (0,))
    with pytest.raises(ValueError, match=re.escape(
            "Conv2D: input_shape width must be a positive int; got 0")):
        layers.Conv2D(2, 3).init(jax.random.key(0), (5, 0, 1))


def test_empty_batch():
    net, params = mlp()
    msg = ("loss SoftmaxCrossEntropy: the batch is empty (output shape (0, 3)); the loss "
           "averages over at least one sample")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.loss(params, jnp.ones((0, 2)), jnp.zeros((0,), int))


# ------------------------------------------------- inputs that are not what a layer takes

_DENSE = {"W": jnp.ones((2, 3)), "b": jnp.ones(3)}
_CONV = {"W": jnp.ones((1, 1, 1, 1)), "b": jnp.ones(1)}

BAD_INPUTS = [
    (lambda: layers.ReLU().check({"junk": jnp.ones(3)}, {}, jnp.ones(3), CTX),
     "ReLU: params must be {} (the layer has no parameters); got ['junk']"),
    (lambda: layers.Flatten().check(None, {}, jnp.ones((2, 3)), CTX),
     "Flatten: params must be {} (the layer has no parameters); got NoneType"),
    (lambda: layers.MaxPool2D(2).check({"W": 1}, {}, jnp.ones((1, 2, 2, 1)), CTX),
     "MaxPool2D: params must be {} (the layer has no parameters); got ['W']"),
    (lambda: layers.Sigmoid().check({}, {}, [1.0, 2.0], CTX),
     "Sigmoid: input x must be an array (jax.numpy or numpy); got list (convert it with "
     "jnp.asarray)"),
    (lambda: layers.Dense(3).check(_DENSE, {}, [[1.0, 2.0]], CTX),
     "Dense: input x must be an array (jax.numpy or numpy); got list"),
    (lambda: layers.Dense(3).check({"W": jnp.ones((2, 3)), "b": None}, {}, jnp.ones((1, 2)),
                                   CTX),
     "Dense: params['b'] must be an array (jax.numpy or numpy); got NoneType"),
    (lambda: layers.MaxPool2D(2, padding=1).check({}, {}, jnp.ones((1, 0, 4, 1)), CTX),
     "MaxPool2D: input height must be a positive int; got 0"),
    (lambda: layers.Conv2D(1, 1, padding=1).check(_CONV, {}, jnp.ones((1, 3, 0, 1)), CTX),
     "Conv2D: input width must be a positive int; got 0"),
    (lambda: layers.Flatten().init(None, (3, -2)),
     "Flatten: input_shape[1] must be a positive int; got -2"),
    (lambda: layers.LeakyReLU([0.1]),
     "LeakyReLU: negative_slope must be a finite number; got [0.1]"),
    (lambda: layers.ELU(float("nan")), "ELU: alpha must be a finite number; got nan"),
    (lambda: layers.GELU("no"),
     "GELU: approximate must be True (the tanh form) or False (erf); got 'no'"),
    (lambda: losses.Hinge(None), "Hinge: margin must be a finite number >= 0; got None"),
    (lambda: losses.SoftmaxCrossEntropy().value(jnp.ones((2, 3)), [0, 1]),
     "SoftmaxCrossEntropy: target y must be an array (jax.numpy or numpy); got list"),
    (lambda: losses.MeanSquaredError().value(jnp.ones((2, 0)), jnp.ones((2, 0))),
     "MeanSquaredError: the network output has no units (shape (2, 0)); a loss needs at "
     "least one output per sample"),
]


@pytest.mark.parametrize("call, message", BAD_INPUTS, ids=[m.split(":")[0] + f"-{i}"
                                                           for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_inputs_and_hyperparameters_raise_named_value_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_non_array_inputs_to_the_network_name_the_layer_or_the_loss():
    net, params = mlp()
    with pytest.raises(ValueError, match=re.escape(
            "layers[0] Dense: input x must be an array (jax.numpy or numpy); got list")):
        net.forward(params, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=re.escape(
            "loss SoftmaxCrossEntropy: target y must be an array (jax.numpy or numpy); got list")):
        net.loss(params, jnp.ones((2, 2)), [0, 1])


def test_params_on_a_parameterless_layer_are_refused_not_dropped():
    net, params = mlp()
    params[1] = {"junk": jnp.ones(3)}
    with pytest.raises(ValueError, match=re.escape("layers[1] ReLU: params must be {}")):
        net.manual_backward(params, jnp.ones((1, 2)), jnp.array([0]))


def test_tuple_params_give_tuple_gradients_like_jax_grad():
    net, params = mlp()
    params = tuple(params)
    x, y = jnp.ones((3, 2)), jnp.array([0, 1, 2])
    manual, auto = net.manual_backward(params, x, y), jax.grad(net.loss)(params, x, y)
    assert jax.tree.structure(manual) == jax.tree.structure(auto) == jax.tree.structure(params)
    assert max_tree_rel_error(manual, auto) <= 1e-12
    listed = net.manual_backward(list(params), x, y)
    assert all(jnp.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(manual), jax.tree.leaves(listed), strict=True))


def test_hyperparameters_are_stored_as_plain_numbers_and_shown():
    import numpy as np

    assert repr(losses.Hinge(np.float32(0.5))) == "Hinge(margin=0.5)"
    assert layers.LeakyReLU(np.float64(0.2)).negative_slope == 0.2
    assert hash(layers.ELU(2)) == hash(layers.ELU(2.0))


def test_flatten_keeps_an_empty_batch():
    y, state, _ = call(layers.Flatten(), "layers[0]", {}, {}, jnp.ones((0, 3, 3, 4)), CTX)
    assert state == {}
    assert y.shape == (0, 36)


@pytest.mark.parametrize("dtype, value", [(jnp.int32, 1), (jnp.bool_, False)])
def test_max_pooling_pads_integers_and_bools_with_their_least_value(dtype, value):
    x = jnp.full((1, 3, 3, 1), value, dtype)
    y, _, _ = call(layers.MaxPool2D(2, padding=1), "layers[0]", {}, {}, x, CTX)
    assert y.dtype == dtype and bool(jnp.all(y == value))


@pytest.mark.parametrize("call, message", [
    (lambda: models.cnn((8, 8)),
     "cnn: input_shape must be (height, width, channels); got (8, 8)"),
    (lambda: models.cnn(filters=(16,)),
     "cnn: filters must be a pair (first conv, second conv), e.g. (16, 32); got (16,)"),
    (lambda: models.mlp(hidden=5),
     "mlp: hidden must be a sequence of layer widths, e.g. (128,) or (1024, 1024); got 5"),
])
def test_model_presets_check_their_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_numpy_and_jax_scalars_count_as_numbers():
    import numpy as np

    from jaxbp import data, finite_differences, train

    assert layers.LeakyReLU(jnp.float32(0.25)).negative_slope == 0.25
    assert repr(losses.Hinge(jnp.asarray(2.0))) == "Hinge(margin=2.0)"
    assert layers.Dense(jnp.int32(3)).units == 3 and type(layers.Dense(np.int64(3)).units) is int
    assert data.xor(n=jnp.int32(10))[0].shape == (10, 2)
    assert data.spirals(n_per_class=3, seed=None)[0].shape == (9, 2)  # fresh entropy
    fd = finite_differences(lambda t: jnp.sum(t["w"] ** 2), {"w": np.ones(2)}, [[0]],
                            jnp.float64(1e-3))
    assert abs(fd[0][0] - 2.0) < 1e-9
    train.optimizer("adam", jnp.float32(1e-3))
    train.optimizer("sgd", __import__("optax").linear_schedule(1e-2, 1e-3, 100))
    with pytest.raises(ValueError, match="Dense: units must be a positive int; got True"):
        layers.Dense(True)
    with pytest.raises(ValueError, match="ELU: alpha must be a finite number"):
        layers.ELU(np.bool_(True))
