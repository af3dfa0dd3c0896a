"""Property: every correct random architecture passes ``gradcheck`` in float64.

Random dense networks (depth 1–5, every activation, every loss, weight decay,
batch 1–16) and random convolutional ones (1–4 Conv2D / MaxPool2D / AvgPool2D
blocks of every geometry, then Flatten and Dense) must give ``report.ok``.
Shapes are tiny and finite differences check 3 coordinates per leaf, so each
example costs about one small compile; the default "repeatable" profile is derandomized.
"""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, gradcheck, layers, losses
from tests.helpers import random_params
from tests.test_layers import ACTIVATIONS

LOSSES = [
    ("regression", losses.HalfSquaredError()),
    ("regression", losses.MeanSquaredError()),
    ("labels", losses.SoftmaxCrossEntropy()),
    ("probabilities", losses.SoftmaxCrossEntropy()),
    ("binary", losses.SigmoidBinaryCrossEntropy()),
    ("labels", losses.Hinge()),
    ("labels", losses.Hinge(margin=0.5)),
]


def targets(kind, rng, batch, classes):
    if kind == "regression":
        return rng.normal(size=(batch, classes))
    if kind == "labels":
        return rng.integers(0, classes, size=batch)
    if kind == "binary":
        return rng.uniform(size=(batch, classes))
    logits = rng.normal(size=(batch, classes))
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@st.composite
def dense_cases(draw):
    """(net, input_shape, target kind): ``depth`` Dense layers with activations between."""
    depth = draw(st.integers(1, 5))
    stack = []
    for _ in range(depth - 1):
        stack.append(layers.Dense(draw(st.integers(1, 4)), use_bias=draw(st.booleans())))
        stack.append(draw(st.sampled_from(ACTIVATIONS)))
    stack.append(layers.Dense(draw(st.integers(2, 4))))
    kind, loss = draw(st.sampled_from(LOSSES))
    if kind == "regression" and draw(st.booleans()):
        stack.append(draw(st.sampled_from(ACTIVATIONS)))  # an output activation
    weight_decay = draw(st.sampled_from([0.0, 1e-3, 0.1]))
    net = Sequential(stack, loss=loss, weight_decay=weight_decay)
    return net, (draw(st.integers(1, 4)),), kind


@st.composite
def conv_cases(draw):
    """(net, input_shape, target kind): 1–4 conv/pool blocks, Flatten, Dense(classes)."""
    input_shape = (draw(st.integers(3, 6)), draw(st.integers(3, 6)), draw(st.integers(1, 2)))
    stack = []
    for _ in range(draw(st.integers(1, 4))):
        window = draw(st.sampled_from([1, 2, 3, (1, 2), (3, 2)]))
        stride = draw(st.sampled_from([1, 2, (2, 1)]))
        kind = draw(st.sampled_from(["conv", "conv", "max", "avg"]))
        if kind == "conv":
            padding = draw(st.sampled_from(["SAME", "VALID", 0, 1, ((1, 0), (0, 2))]))
            stack.append(
                layers.Conv2D(
                    draw(st.integers(1, 3)), window, stride, padding, use_bias=draw(st.booleans())
                )
            )
            stack.append(draw(st.sampled_from(ACTIVATIONS)))
        else:
            pool = layers.MaxPool2D if kind == "max" else layers.AvgPool2D
            stack.append(pool(window, stride, draw(st.sampled_from(["SAME", "VALID", 0]))))
    stack += [layers.Flatten(), layers.Dense(draw(st.integers(2, 3)))]
    kind, loss = draw(st.sampled_from(LOSSES))
    net = Sequential(stack, loss=loss, weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])))
    try:
        net.output_shape(input_shape)
    except ValueError:  # a window larger than its (padded) input
        assume(False)
    return net, input_shape, kind


def check(net, input_shape, kind, batch, seed):
    rng = np.random.default_rng(seed)
    params = random_params(net, input_shape, rng)
    x = rng.normal(size=(batch, *input_shape))
    (classes,) = net.output_shape(input_shape)
    y = targets(kind, rng, batch, classes)
    report = gradcheck(net, params, x, y, fd_max_coords=3, seed=seed)
    assert report.ok, str(report)


@settings(max_examples=140)
@given(case=dense_cases(), batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_random_dense_networks_pass(case, batch, seed):
    check(*case, batch, seed)


@settings(max_examples=60)
@given(case=conv_cases(), batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_random_conv_networks_pass(case, batch, seed):
    check(*case, batch, seed)
