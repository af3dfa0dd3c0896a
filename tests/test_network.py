"""Whole networks: ``manual_backward`` against ``jax.grad(net.loss)``.

Every activation × every loss × weight decay on/off × depth 1 and 3 × batch 1 and 5,
in float64 (≤ 1e-10 relative per leaf), and two of those eight in float32 (≤ 1e-5),
which between them take both decays, depths and batches. Depth 1 puts the activation
straight before the loss; depth 3 chains two hidden activations through Dense layers
(``test_random_architectures`` draws other depths). The ten cases of one (activation,
loss) cell are checked inside one jitted program to keep compilation time down;
parameters and data come from NumPy, so building them compiles nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, layers, losses
from tests.helpers import RUN_ONCE, max_tree_rel_error, random_params
from tests.test_layers import ACTIVATIONS

LOSSES = [
    losses.HalfSquaredError(),
    losses.MeanSquaredError(),
    losses.SoftmaxCrossEntropy(),
    losses.SigmoidBinaryCrossEntropy(),
    losses.Hinge(),
]
CLASSES = 3


def make_targets(loss, rng, batch, dtype):
    """Targets of the kind each loss takes (labels, probabilities or reals), drawn by NumPy."""
    if isinstance(loss, (losses.Hinge, losses.SoftmaxCrossEntropy)):
        return jnp.asarray(rng.integers(0, CLASSES, size=batch))
    if isinstance(loss, losses.SigmoidBinaryCrossEntropy):
        return jnp.asarray(rng.uniform(size=(batch, CLASSES)), dtype)
    return jnp.asarray(rng.normal(size=(batch, CLASSES)), dtype)


def make_net(activation, loss, weight_decay, depth, width=4):
    stack = []
    for i in range(depth):
        last = i == depth - 1
        stack += [layers.Dense(CLASSES if last else width), activation]
    return Sequential(stack, loss=loss, weight_decay=weight_decay)


def make_case(net, seed, batch, features, dtype):
    """``(params, x, y)`` drawn by NumPy: eager ``jax.random`` calls would compile kernels."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(jnp.asarray, random_params(net, (features,), rng, dtype))
    x = jnp.asarray(rng.normal(size=(batch, features)), dtype)
    return params, x, make_targets(net.loss_fn, rng, batch, dtype)


def manual_and_autodiff(nets_and_cases):
    @functools.partial(jax.jit, compiler_options=RUN_ONCE)
    def both(cases):
        return [
            (net.manual_backward(p, x, y), jax.grad(net.loss)(p, x, y))
            for net, (p, x, y) in zip(nets, cases)
        ]

    nets = [net for net, _ in nets_and_cases]
    return both([case for _, case in nets_and_cases])


FLOAT32_CELLS = {(0.3, 1, 5), (0.0, 3, 1)}  # (weight decay, depth, batch) also run in float32


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_manual_backward_matches_autodiff(activation, loss):
    """Without and with weight decay, depths 1 and 3, batches 1 and 5 in float64; two of
    those in float32 that between them take each decay, depth and batch: 10 networks, one
    compiled program."""
    cases = []
    for weight_decay in (0.0, 0.3):
        for depth in (1, 3):
            net = make_net(activation, loss, weight_decay, depth)
            for batch in (1, 5):
                dtypes = [jnp.float64]
                if (weight_decay, depth, batch) in FLOAT32_CELLS:
                    dtypes.append(jnp.float32)
                for dtype in dtypes:
                    cases.append((net, make_case(net, depth * 10 + batch, batch, 3, dtype)))
    results = manual_and_autodiff(cases)
    for (net, (_, x, _)), (manual, auto) in zip(cases, results):
        assert jax.tree.structure(manual) == jax.tree.structure(auto)
        bound = 1e-10 if x.dtype == jnp.float64 else 1e-5
        err = max_tree_rel_error(manual, auto)
        assert err <= bound, (len(net.layers) // 2, net.weight_decay, x.shape, x.dtype, err)


def test_value_and_grad_and_manual_backward_each_match_autodiff():
    net = make_net(layers.Tanh(), losses.SoftmaxCrossEntropy(), 0.1, depth=3)
    p, x, y = make_case(net, 0, 6, 5, jnp.float64)
    J_auto, auto = jax.value_and_grad(net.loss)(p, x, y)
    J, grads = net.manual_value_and_grad(p, x, y)
    assert float(J) == pytest.approx(float(J_auto), rel=1e-14)
    assert max_tree_rel_error(grads, auto) <= 1e-12
    assert max_tree_rel_error(net.manual_backward(p, x, y), auto) <= 1e-12


def test_weight_decay_adds_half_lambda_norm_of_weights_only():
    net0 = make_net(layers.Sigmoid(), losses.HalfSquaredError(), 0.0, depth=2)
    net1 = make_net(layers.Sigmoid(), losses.HalfSquaredError(), 0.5, depth=2)
    p, x, y = make_case(net0, 1, 4, 3, jnp.float64)
    p = jax.tree.map(lambda a: a + 0.1, p)  # non-zero biases must not be decayed
    penalty = 0.25 * sum(float(jnp.sum(q["W"] ** 2)) for q in p if q)
    assert float(net1.loss(p, x, y) - net0.loss(p, x, y)) == pytest.approx(penalty, rel=1e-12)
    g0, g1 = net0.manual_backward(p, x, y), net1.manual_backward(p, x, y)
    for q, a, b in zip(p, g0, g1):
        if q:
            assert max_tree_rel_error(b["W"], a["W"] + 0.5 * q["W"]) <= 1e-14
            assert max_tree_rel_error(b["b"], a["b"]) == 0


def test_jitted_methods_do_not_recompile():
    net = make_net(layers.ReLU(), losses.SoftmaxCrossEntropy(), 0.0, depth=2)
    p, x, y = make_case(net, 2, 4, 3, jnp.float64)
    twin = make_net(layers.ReLU(), losses.SoftmaxCrossEntropy(), 0.0, depth=2)
    assert twin == net and hash(twin) == hash(net)
    for method in ("loss", "manual_backward", "manual_value_and_grad", "forward"):
        fn = getattr(type(net), method)
        fn = getattr(fn, "jitted", fn)
        args = (p, x) if method == "forward" else (p, x, y)
        getattr(net, method)(*args)
        size = fn._cache_size()
        getattr(net, method)(*jax.tree.map(lambda a: a + 1 if a.dtype != jnp.int64 else a, args))
        getattr(twin, method)(*args)
        assert fn._cache_size() == size, method
    jitted = jax.jit(net.manual_backward)
    jitted(p, x, y)
    jitted(p, x + 1, y)
    assert jitted._cache_size() == 1


def test_forward_with_residuals_names_every_intermediate():
    net = make_net(layers.Sigmoid(), losses.HalfSquaredError(), 0.0, depth=2)
    p, x, _ = make_case(net, 3, 2, 3, jnp.float64)
    y_hat, trace = net.forward_with_residuals(p, x)
    assert len(trace) == len(net.layers)
    assert set(trace[0]) == {"x", "y"} and set(trace[1]) == {"x", "y"}
    z = x @ p[0]["W"] + p[0]["b"][None, :]
    assert max_tree_rel_error(trace[0]["y"], z) <= 1e-15
    assert max_tree_rel_error(trace[1]["y"], jax.nn.sigmoid(z)) <= 1e-15
    assert max_tree_rel_error(trace[-1]["y"], y_hat) == 0


def test_signals_are_input_gradients():
    """manual_backward_with_signals' dxs[i] is ∂J/∂(input of layer i)."""
    net = make_net(layers.Tanh(), losses.MeanSquaredError(), 0.0, depth=2)
    p, x, y = make_case(net, 4, 3, 3, jnp.float64)
    _, signals = net.manual_backward_with_signals(p, x, y)
    assert max_tree_rel_error(signals[0], jax.grad(net.loss, argnums=1)(p, x, y)) <= 1e-10


@pytest.mark.parametrize("k", [1, 2, 3, 5, 100, np.int64(2)])
def test_remat_gives_the_same_gradients(k):
    net = make_net(layers.GELU(), losses.SoftmaxCrossEntropy(), 0.1, depth=4)
    p, x, y = make_case(net, 5, 4, 3, jnp.float64)
    assert max_tree_rel_error(net.manual_backward(p, x, y, remat_every=k),
                              jax.grad(net.loss)(p, x, y)) <= 1e-10


_activations = st.sampled_from(ACTIVATIONS)


@settings(max_examples=15)
@given(
    widths=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    activations=st.lists(_activations, min_size=4, max_size=4),
    loss=st.sampled_from(LOSSES),
    weight_decay=st.sampled_from([0.0, 0.01, 1.0]),
    batch=st.integers(1, 8),
    features=st.integers(1, 6),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_architectures(widths, activations, loss, weight_decay, batch, features,
                              use_bias, seed):
    stack = []
    for width, act in zip([*widths, CLASSES], activations):
        stack += [layers.Dense(width, use_bias=use_bias), act]
    net = Sequential(stack, loss=loss, weight_decay=weight_decay)
    [(manual, auto)] = manual_and_autodiff([(net, make_case(net, seed, batch, features,
                                                           jnp.float64))])
    assert max_tree_rel_error(manual, auto) <= 1e-10


def test_manual_backward_never_calls_autodiff(monkeypatch):
    """With JAX's differentiation entry points booby-trapped, the manual path still traces.

    Tracing runs all of the manual path's Python (compiling runs none), so
    ``jax.eval_shape`` checks it without compiling anything.
    """
    from jaxbp import models

    def trap(*args, **kwargs):
        raise AssertionError("autodiff called on the manual path")

    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize"):
        monkeypatch.setattr(jax, name, trap)
    jax.clear_caches()  # force fresh traces
    stack = []
    for activation in ACTIVATIONS:
        stack += [layers.Dense(4), activation]
    nets = [
        (Sequential(stack + [layers.Dense(CLASSES)], loss=loss, weight_decay=0.1), (3,))
        for loss in LOSSES
    ]
    nets.append((models.cnn((8, 8, 1), classes=CLASSES, weight_decay=0.1), (8, 8, 1)))
    rng = np.random.default_rng(0)
    for net, input_shape in nets:
        p = random_params(net, input_shape, rng)
        x = rng.normal(size=(2, *input_shape))
        y = make_targets(net.loss_fn, rng, 2, x.dtype)
        for method in (net.manual_value_and_grad, net.manual_backward_with_signals,
                       functools.partial(net.manual_backward, remat_every=2)):
            jax.eval_shape(method, p, x, y)


@pytest.mark.parametrize("param_dtype, data_dtype, bound", [
    (jnp.bfloat16, jnp.float32, 1e-2),  # low-precision weights, float32 data: about 3 digits
    (jnp.float32, jnp.float64, 1e-5),   # float32 weights, float64 data and targets
], ids=["bf16-params", "f32-params-f64-data"])
def test_gradients_have_the_dtype_of_their_parameters(param_dtype, data_dtype, bound):
    """Mixed dtypes promote in the forward pass; like jax.grad, each gradient comes back in
    its parameter's dtype (an optax step inside lax.scan needs that to keep its carry type)."""
    mlp = Sequential([layers.Dense(4), layers.Tanh(), layers.Dense(3)],
                     loss=losses.HalfSquaredError())
    cnn = Sequential([layers.Conv2D(2, 3, padding="SAME"), layers.ReLU(), layers.Flatten(),
                      layers.Dense(3)], loss=losses.SoftmaxCrossEntropy())
    for net, input_shape, y in [(mlp, (5,), jnp.ones((2, 3), data_dtype)),
                                (cnn, (4, 4, 1), jnp.array([0, 2]))]:
        params = net.init(jax.random.key(0), input_shape, param_dtype)
        x = jax.random.normal(jax.random.key(1), (2, *input_shape), data_dtype)
        manual, auto = net.manual_backward(params, x, y), jax.grad(net.loss)(params, x, y)
        assert [g.dtype for g in jax.tree.leaves(manual)] == [param_dtype] * 4
        assert [g.dtype for g in jax.tree.leaves(auto)] == [param_dtype] * 4
        assert max_tree_rel_error(manual, auto) <= bound


def test_concrete_labels_closed_over_inside_jit():
    net = make_net(layers.ReLU(), losses.SoftmaxCrossEntropy(), 0.0, depth=2)
    params, x, y = make_case(net, 0, 5, 4, jnp.float64)
    J = jax.jit(lambda p: net.loss(p, x, y))(params)  # y is concrete inside the trace
    assert J == net.loss(params, x, y)
    with pytest.raises(ValueError, match=r"integer labels must lie in \[0, 3\)"):
        jax.jit(lambda p, bad=y + CLASSES: net.loss(p, x, bad))(params)


def test_integer_one_hot_targets_are_probability_targets():
    ce = losses.SoftmaxCrossEntropy()
    z = jax.random.normal(jax.random.key(0), (4, 5))
    labels = jnp.array([0, 4, 2, 1])
    for one_hot in (jax.nn.one_hot(labels, 5, dtype=jnp.int32), jax.nn.one_hot(labels, 5)):
        value, grad = ce.value_and_grad(z, one_hot)
        ref_value, ref_grad = ce.value_and_grad(z, labels)
        assert value == ref_value and jnp.array_equal(grad, ref_grad)


def test_weight_penalty_is_s_of_j_equals_l_plus_s():
    net = Sequential([layers.Dense(3), layers.ReLU(), layers.Dense(2)],
                     loss=losses.SoftmaxCrossEntropy(), weight_decay=0.3)
    params = net.init(jax.random.key(0), (4,))
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.array([0, 1, 0, 1, 1])
    s = net.weight_penalty(params)  # biases excluded
    expected = 0.15 * (jnp.sum(params[0]["W"] ** 2) + jnp.sum(params[2]["W"] ** 2))
    assert abs(float(s - expected)) < 1e-15
    no_decay = Sequential(net.layers, loss=net.loss_fn)
    assert abs(float(net.loss(params, x, y) - no_decay.loss(params, x, y) - s)) < 1e-14
    assert no_decay.weight_penalty(params) == 0.0
    with pytest.raises(ValueError, match="Sequential: params must be a list with one entry per "
                       r"layer \(3\); got 2"):
        net.weight_penalty(params[:2])
