"""Property: every correct random architecture passes ``gradcheck`` in float64.

Random dense networks (depth 1–5, every activation, every loss, weight decay,
batch 1–16), random convolutional ones (1–4 Conv2D / MaxPool2D / AvgPool2D
blocks of every geometry, then Flatten and Dense) and random nested ones
(Sequential and Residual blocks with LayerNorm, RMSNorm, BatchNorm and Dropout
on (batch, features) and (batch, time, features) inputs, checked in train mode
with state and key and in eval mode) must give ``report.ok``.

Each example draws several networks and checks them from one compiled program:
gradcheck's own computation (manual and autodiff gradients and backpropagated
signals) and its finite differences (3 coordinates per leaf, every ±h point of
a network evaluated by one ``vmap``), compared with gradcheck's tolerances. A
network that does not pass that way is handed to ``gradcheck`` itself, whose
report decides (it tells a kink from a bug) and is the failure message. The
default "repeatable" profile is derandomized.
"""

import functools

import jax
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, gradcheck, layers, losses
from jaxbp.gradcheck import TOLERANCES, _network_compute, fd_coordinates
from tests.helpers import RUN_ONCE, random_params
from tests.test_layers import ACTIVATIONS
from tests.test_nested import RUN_ONCE as RUN_ONCE_LEVEL_1
from tests.test_nested import draw_case as draw_nested_case
from tests.test_nested import nested_cases

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


TOL = TOLERANCES["float64"]
FD_COORDS = 3


def draw_case(net, input_shape, kind, batch, seed):
    """``(params, x, y)`` drawn by NumPy."""
    rng = np.random.default_rng(seed)
    params = random_params(net, input_shape, rng)
    x = rng.normal(size=(batch, *input_shape))
    (classes,) = net.output_shape(input_shape)
    return params, x, targets(kind, rng, batch, classes)


def fd_points(params, seed):
    """gradcheck's finite-difference coordinates and the points ``θ ± h e_i`` at them.

    Returns ``(index, points, steps)``: ``index[leaf]`` the flat coordinates, ``points``
    the params stacked on a leading axis (``θ + h e_i`` then ``θ − h e_i`` for each
    coordinate in leaf order), ``steps`` the step each pair actually took.
    """
    leaves, treedef = jax.tree.flatten(params)
    index = fd_coordinates([np.size(v) for v in leaves], FD_COORDS, seed)
    points, steps = [], []
    for n, idx in enumerate(index):
        for i in idx:
            pair = []
            for sign in (1.0, -1.0):
                moved = np.array(leaves[n])
                moved.flat[i] += sign * TOL.fd_step
                pair.append(moved)
                points.append([*leaves[:n], moved, *leaves[n + 1:]])
            steps.append(float(pair[0].flat[i] - pair[1].flat[i]))
    stacked = treedef.unflatten([np.stack(column) for column in zip(*points)])
    return index, stacked, np.array(steps)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def compute_together(nets, cases, points):
    """For each network, gradcheck's computation (eval mode) and the loss at its ±h points."""
    return [
        (_network_compute(net, False, p, None, x, y, None),
         jax.vmap(net.loss, in_axes=(0, None, None))(pts, x, y))
        for net, (p, x, y), pts in zip(nets, cases, points)
    ]


def _agree(m, a, atol) -> bool:
    m, a = np.asarray(m), np.asarray(a)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    finite = np.all(np.isfinite(m)) and np.all(np.isfinite(a))
    return bool(m.shape == a.shape and finite and np.max(np.abs(m - a), initial=0.0)
                <= TOL.rtol * scale + atol)


def _passes(computed, J_pm, index, steps) -> bool:
    """gradcheck's rows, all at once: manual = autodiff and finite differences = autodiff."""
    J, manual, m_sig, auto, a_sig = computed
    manual, auto = jax.tree.leaves(manual), jax.tree.leaves(auto)
    if len(manual) != len(auto):
        return False
    atol = 100 * TOL.eps * max(float(np.max(np.abs(a), initial=0.0)) for a in auto)
    if not all(_agree(m, a, atol) for m, a in zip(manual, auto)):
        return False
    # signals: {nested path or "loss": ∂J/∂(that input)}, for every nested layer
    if set(m_sig) != set(a_sig):
        return False
    sig_atol = 100 * TOL.eps * max(float(np.max(np.abs(a), initial=0.0))
                                   for a in jax.tree.leaves(a_sig))
    if not all(_agree(m, a, sig_atol) for p in a_sig
               for m, a in zip(jax.tree.leaves(m_sig[p]), jax.tree.leaves(a_sig[p]))):
        return False
    J_pm = np.asarray(J_pm)
    fd = (J_pm[0::2] - J_pm[1::2]) / steps
    fd_tol_abs = 100 * TOL.eps * (abs(float(J)) + 1) / TOL.fd_step
    start = 0
    for a, idx in zip(auto, index):
        values, start = fd[start:start + len(idx)], start + len(idx)
        a = np.asarray(a)
        gap = np.abs(a.ravel()[idx] - values)
        if np.any(gap > TOL.fd_rtol * float(np.max(np.abs(a))) + fd_tol_abs):
            return False
    return True


def check_together(cases):
    """Every ``(net, input_shape, kind, batch, seed)`` of ``cases`` passes gradcheck."""
    nets = tuple(net for net, *_ in cases)
    drawn = [draw_case(*case) for case in cases]
    fd = [fd_points(params, seed) for (params, _, _), (*_, seed) in zip(drawn, cases)]
    with jax.default_matmul_precision("highest"):
        results = jax.device_get(compute_together(nets, drawn, [pts for _, pts, _ in fd]))
    for net, (params, x, y), (*_, seed), (index, _, steps), (computed, J_pm) in zip(
            nets, drawn, cases, fd, results):
        if not _passes(computed, J_pm, index, steps):
            report = gradcheck(net, params, x, y, fd_max_coords=FD_COORDS, seed=seed)
            assert report.ok, str(report)


def _with_batch_and_seed(cases):
    return st.tuples(cases, st.integers(1, 16), st.integers(0, 2**16)).map(
        lambda c: (*c[0], c[1], c[2]))


@settings(max_examples=12)
@given(cases=st.lists(_with_batch_and_seed(dense_cases()), min_size=4, max_size=4))
def test_random_dense_networks_pass(cases):
    check_together(cases)


@settings(max_examples=12)
@given(cases=st.lists(_with_batch_and_seed(conv_cases()), min_size=3, max_size=3))
def test_random_conv_networks_pass(cases):
    check_together(cases)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE_LEVEL_1)
def compute_modes_together(nets, modes, cases, points):
    """``compute_together`` with each network's state, key and mode (train: a Python bool)."""
    out = []
    for net, train, (p, s, x, y, k), pts in zip(nets, modes, cases, points):
        def loss(q, net=net, s=s, x=x, y=y, k=k, train=train):
            return net.loss(q, x, y, state=s, key=k, train=train)

        out.append((_network_compute(net, train, p, s, x, y, k), jax.vmap(loss)(pts)))
    return out


def check_modes_together(cases):
    """Every nested ``(net, input_shape, batch, seed)`` passes gradcheck in train and eval mode."""
    nets = tuple(net for net, *_ in cases for _ in (True, False))
    modes = tuple(train for _ in cases for train in (True, False))
    drawn = [draw_nested_case(*case) for case in cases for _ in (True, False)]
    seeds = [seed for *_, seed in cases for _ in (True, False)]
    fd = [fd_points(params, seed) for (params, *_), seed in zip(drawn, seeds)]
    with jax.default_matmul_precision("highest"):
        results = jax.device_get(compute_modes_together(nets, modes, drawn,
                                                        [pts for _, pts, _ in fd]))
    for net, train, (params, state, x, y, key), seed, (index, _, steps), (computed, J_pm) in zip(
            nets, modes, drawn, seeds, fd, results):
        if not _passes(computed, J_pm, index, steps):
            report = gradcheck(net, params, x, y, state=state, key=key, train=train,
                               fd_max_coords=FD_COORDS, seed=seed)
            assert report.ok, str(report)


@settings(max_examples=6)
@given(cases=st.lists(nested_cases(), min_size=2, max_size=2))
def test_random_nested_networks_pass_in_train_and_eval_mode(cases):
    check_modes_together(cases)
