"""Property: every correct random architecture passes ``gradcheck`` in float64.

Random dense networks (depth 1–5, every activation, every loss, weight decay,
batch 1–16) — and convolutional ones when the conv layers are available — must
give ``report.ok``. Shapes are tiny and finite differences check a few
coordinates per leaf, so each example costs about one small compile.
"""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, gradcheck, layers, losses

ACTIVATIONS = [
    layers.Identity(),
    layers.Sigmoid(),
    layers.Tanh(),
    layers.ReLU(),
    layers.LeakyReLU(0.1),
    layers.ELU(1.3),
    layers.GELU(approximate=True),
    layers.GELU(approximate=False),
    layers.Softplus(),
    layers.Softmax(),
]
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


def check(net, input_shape, kind, batch, seed):
    rng = np.random.default_rng(seed)
    params = net.init(jax.random.key(seed), input_shape)
    x = rng.normal(size=(batch, *input_shape))
    (classes,) = net.output_shape(input_shape)
    y = targets(kind, rng, batch, classes)
    report = gradcheck(net, params, x, y, fd_max_coords=3, seed=seed)
    assert report.ok, str(report)


@settings(max_examples=200)
@given(case=dense_cases(), batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_random_dense_networks_pass(case, batch, seed):
    check(*case, batch, seed)
