"""BatchNorm: hand-written backward against ``jax.vjp`` in train and eval modes, independent
NumPy values and running statistics, PyTorch's BatchNorm1d/2d step by step, pinned errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp.layers.base import Context, LayerError, call
from jaxbp.layers.batchnorm import BatchNorm, BatchNormEvalResiduals, BatchNormResiduals
from tests.helpers import RUN_ONCE, max_tree_rel_error, rel_error

LAYERS = [BatchNorm(), BatchNorm(momentum=0.3, eps=0.5)]
SHAPES = [(2, 5), (7, 6), (3, 4, 5), (2, 3, 3, 4)]  # dense, (N, L, C), NHWC


def random_case(shape, seed, dtype=np.float64):
    """NumPy params and state away from their init, x and dy of shape ``shape``."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    params = {"scale": rng.normal(size=c).astype(dtype), "offset": rng.normal(size=c).astype(dtype)}
    state = {"mean": rng.normal(size=c).astype(dtype),
             "var": rng.uniform(0.5, 2.0, size=c).astype(dtype)}
    x = (3.0 * rng.normal(size=shape) + 1.0).astype(dtype)  # channels far from mean 0, var 1
    dy = rng.normal(size=shape).astype(dtype)
    return params, state, x, dy


def run(layer, params, state, x, train):
    """``check`` then ``forward``, as a container runs a layer."""
    ctx = Context(train=train)
    layer.check(params, state, x, ctx)
    return layer.forward(params, state, x, ctx)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE)
def _both(layer, train, params, state, x, dy):
    """(manual, autodiff) cotangents of one layer, compiled as one program."""
    _, _, residuals = run(layer, params, state, x, train)
    manual = layer.backward(params, residuals, dy)
    ctx = Context(train=train)
    _, pullback = jax.vjp(lambda p, a: layer.forward(p, state, a, ctx)[0], params, x)
    return manual, pullback(dy)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", LAYERS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_vjp_float64(layer, train, shape):
    manual, auto = _both(layer, train, *random_case(shape, seed=len(shape)))
    assert max_tree_rel_error(manual, auto) <= 1e-10


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_matches_vjp_float32(train):
    """float32: both sides round differently; 1e-5 relative is the documented bound
    (observed ≈ 2e-7 in both modes)."""
    manual, auto = _both(BatchNorm(), train, *random_case((4, 3, 3, 6), seed=3, dtype=np.float32))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(manual))
    assert max_tree_rel_error(manual, auto) <= 1e-5


@settings(max_examples=10)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    train=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_vjp(shape, train, eps, seed):
    if train:
        shape[0] = max(shape[0], 2)  # train mode needs M >= 2 values per channel
    manual, auto = _both(BatchNorm(eps=eps), train, *random_case(tuple(shape), seed))
    assert max_tree_rel_error(manual, auto) <= 1e-10


def test_residual_types_say_the_mode():
    params, state, x, _ = random_case((3, 2), seed=0)
    train_res = run(BatchNorm(), params, state, x, True)[2]
    eval_res = run(BatchNorm(), params, state, x, False)[2]
    assert type(train_res) is BatchNormResiduals and type(eval_res) is BatchNormEvalResiduals
    assert train_res._fields == eval_res._fields == ("x", "mean", "rstd")
    np.testing.assert_array_equal(eval_res.mean, state["mean"])  # running, not batch, stats
    np.testing.assert_allclose(train_res.mean, x.mean(0), rtol=1e-14)


def numpy_batchnorm(params, state, x, train, momentum, eps):
    """The textbook formulas in NumPy (not the code under test): y and the new state."""
    axes = tuple(range(x.ndim - 1))
    if train:
        m = x.size // x.shape[-1]
        mu, var = x.mean(axes), x.var(axes)  # biased, ddof=0
        new_state = {"mean": (1 - momentum) * state["mean"] + momentum * mu,
                     "var": (1 - momentum) * state["var"] + momentum * x.var(axes, ddof=1)}
        assert np.allclose(x.var(axes, ddof=1), var * m / (m - 1))
    else:
        mu, var, new_state = state["mean"], state["var"], state
    y = (x - mu) / np.sqrt(var + eps) * params["scale"] + params["offset"]
    return y, new_state


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (3, 4, 5, 2)], ids=str)
def test_values_match_numpy_formula(shape, train):
    layer = BatchNorm(momentum=0.25, eps=1e-3)
    params, state, x, _ = random_case(shape, seed=1)
    y, new_state, _ = run(layer, params, state, x, train)
    want_y, want_state = numpy_batchnorm(params, state, x, train, 0.25, 1e-3)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    for k in ("mean", "var"):
        np.testing.assert_allclose(new_state[k], want_state[k], rtol=1e-13, atol=1e-14)
    if train:  # the output is normalised per channel: mean β, biased std |γ|·√(σ²/(σ² + ε))
        axes = tuple(range(len(shape) - 1))
        np.testing.assert_allclose(np.mean(y, axes), params["offset"], atol=1e-12)


def test_running_statistics_update():
    """Hand-computed: channel 0 holds 1, 2, 3, 6 (mean 3, unbiased var 14/3), channel 1 all 5."""
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [6.0, 5.0]])
    params = {"scale": np.ones(2), "offset": np.zeros(2)}
    state = {"mean": np.array([1.0, -1.0]), "var": np.array([2.0, 3.0])}
    _, new, _ = run(BatchNorm(momentum=0.25), params, state, x, True)
    np.testing.assert_allclose(new["mean"], [0.75 * 1 + 0.25 * 3, 0.75 * -1 + 0.25 * 5], rtol=1e-15)
    np.testing.assert_allclose(new["var"], [0.75 * 2 + 0.25 * 14 / 3, 0.75 * 3], rtol=1e-15)
    # momentum 0 keeps the old value, momentum 1 takes the batch's (unbiased variance)
    np.testing.assert_array_equal(run(BatchNorm(momentum=0), params, state, x, True)[1]["var"],
                                  state["var"])
    np.testing.assert_allclose(run(BatchNorm(momentum=1), params, state, x, True)[1]["var"],
                               [14 / 3, 0.0], rtol=1e-15, atol=1e-15)
    # three steps of the recurrence
    layer, s = BatchNorm(momentum=0.1), {"mean": np.zeros(2), "var": np.ones(2)}
    want = dict(s)
    for step in range(3):
        xs = x * (step + 1.0)
        s = run(layer, params, s, xs, True)[1]
        want = {"mean": 0.9 * want["mean"] + 0.1 * xs.mean(0),
                "var": 0.9 * want["var"] + 0.1 * xs.var(0, ddof=1)}
    np.testing.assert_allclose(s["mean"], want["mean"], rtol=1e-14)
    np.testing.assert_allclose(s["var"], want["var"], rtol=1e-14)


def test_eval_leaves_state_alone_and_state_keeps_its_dtype():
    params, state, x, _ = random_case((4, 3), seed=2, dtype=np.float32)
    _, new_eval, _ = run(BatchNorm(), params, state, x, False)
    assert new_eval is state
    y, new_train, _ = run(BatchNorm(), params, state, x, True)
    assert y.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in new_train.values())


def test_no_gradient_flows_through_the_running_statistics():
    params, state, x, _ = random_case((4, 3), seed=4)
    layer = BatchNorm(momentum=0.5)
    grads = jax.grad(lambda p, a: sum(
        v.sum() for v in layer.forward(p, state, a, Context(train=True))[1].values()),
        argnums=(0, 1))(params, x)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))


TORCH_CASES = [
    ("BatchNorm1d", (6, 4), None),  # dense (N, C): the same layout
    ("BatchNorm1d", (5, 3, 4), (0, 2, 1)),  # ours (N, L, C), torch's (N, C, L)
    ("BatchNorm2d", (3, 4, 5, 2), (0, 3, 1, 2)),  # ours NHWC, torch's NCHW
]


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE)
def _step(layer, train, params, state, x, dy):
    y, new_state, residuals = run(layer, params, state, x, train)
    return y, new_state, layer.backward(params, residuals, dy)


@pytest.mark.parametrize("module, shape, to_torch", TORCH_CASES, ids=lambda v: str(v))
def test_matches_torch_over_three_steps_and_in_eval(module, shape, to_torch):
    torch = pytest.importorskip("torch")
    momentum, eps = 0.2, 1e-3
    layer = BatchNorm(momentum=momentum, eps=eps)
    params, _, _, _ = random_case(shape, seed=6)
    state = {"mean": np.zeros(shape[-1]), "var": np.ones(shape[-1])}  # torch's initial stats
    ref = getattr(torch.nn, module)(shape[-1], eps=eps, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(params["scale"]))
        ref.bias.copy_(torch.from_numpy(params["offset"]))
    perm = to_torch or tuple(range(len(shape)))
    back = tuple(np.argsort(perm))
    rng = np.random.default_rng(7)
    errors = []
    for step in range(4):
        train = step < 3
        x, dy = 2.0 * rng.normal(size=shape) + step, rng.normal(size=shape)
        ref.train(train)
        ref.zero_grad()
        xt = torch.from_numpy(x.transpose(perm).copy()).requires_grad_()
        out = ref(xt)
        out.backward(torch.from_numpy(dy.transpose(perm).copy()))
        y, state, (dparams, dx) = _step(layer, train, params, state, x, dy)
        errors += [
            rel_error(y, out.detach().numpy().transpose(back)),
            rel_error(dx, xt.grad.numpy().transpose(back)),
            rel_error(dparams["scale"], ref.weight.grad.numpy()),
            rel_error(dparams["offset"], ref.bias.grad.numpy()),
            rel_error(state["mean"], ref.running_mean.numpy()),
            rel_error(state["var"], ref.running_var.numpy()),
        ]
    assert max(errors) <= 1e-10, errors


def test_layer_attributes_and_init():
    layer = BatchNorm()
    assert layer.stateful and not layer.stochastic and layer.decay_keys == ()
    assert repr(layer) == "BatchNorm(momentum=0.1, eps=1e-05)"
    assert hash(layer) == hash(BatchNorm(momentum=0.1, eps=1e-5)) and layer == BatchNorm()
    params, state, out_shape = layer.init(None, (4, 4, 3), jnp.float32)
    assert out_shape == (4, 4, 3)
    assert layer.decayed(params) == {"scale": False, "offset": False}
    for tree, want in ((params, {"scale": 1.0, "offset": 0.0}), (state, {"mean": 0.0, "var": 1.0})):
        assert set(tree) == set(want)
        for k, v in want.items():
            assert tree[k].shape == (3,) and tree[k].dtype == jnp.float32
            np.testing.assert_array_equal(tree[k], np.full(3, v))
    assert layer.init(None, (5,))[0]["scale"].dtype == jnp.float64  # the default float dtype


def _good(c=3):
    return {"scale": np.ones(c), "offset": np.zeros(c)}, {"mean": np.zeros(c), "var": np.ones(c)}


P, S = _good()


@pytest.mark.parametrize(
    "call_, message",
    [
        (lambda: BatchNorm(momentum=-0.1),
         r"BatchNorm: momentum must be a finite number in \[0, 1\] \(the weight of the new batch, "
         r"PyTorch's convention; Flax's momentum=0.9 is 0.1 here\); got -0.1"),
        (lambda: BatchNorm(momentum=1.5), r"BatchNorm: momentum must be .*; got 1.5"),
        (lambda: BatchNorm(momentum=float("nan")), r"BatchNorm: momentum must be .*; got nan"),
        (lambda: BatchNorm(momentum=True), r"BatchNorm: momentum must be .*; got True"),
        (lambda: BatchNorm(eps=0.0), r"BatchNorm: eps must be a finite number > 0; got 0.0"),
        (lambda: BatchNorm(eps=float("inf")),
         r"BatchNorm: eps must be a finite number > 0; got inf"),
        (lambda: BatchNorm().init(None, ()),
         r"BatchNorm: input_shape must be \(…, channels\) with positive sizes"),
        (lambda: BatchNorm().check({"scale": np.ones(3)}, S, np.ones((2, 3)), Context()),
         r"BatchNorm: params must have the keys \['offset', 'scale'\]; got \['scale'\]"),
        (lambda: BatchNorm().check({"scale": np.ones(3), "offset": np.zeros(4)}, S,
                                   np.ones((2, 3)), Context()),
         r"BatchNorm: params\['offset'\] must have shape \(channels,\) = \(3,\); got \(4,\)"),
        (lambda: BatchNorm().check({"scale": np.ones((3, 1)), "offset": np.zeros(3)}, S,
                                   np.ones((2, 3)), Context()),
         r"BatchNorm: params\['scale'\] must have shape \(channels,\)"),
        (lambda: BatchNorm().check(P, {"mean": np.zeros(3)}, np.ones((2, 3)), Context()),
         r"BatchNorm: state must have the keys \['mean', 'var'\]; got \['mean'\]"),
        (lambda: BatchNorm().check(P, {}, np.ones((2, 3)), Context()),
         r"BatchNorm: state must have the keys \['mean', 'var'\]; got \[\]"),
        (lambda: BatchNorm().check(P, {"mean": np.zeros(3), "var": np.ones(2)},
                                   np.ones((2, 3)), Context()),
         r"BatchNorm: state\['var'\] must have shape \(channels,\) = \(3,\); got \(2,\)"),
        (lambda: BatchNorm().check(P, S, np.ones((2, 4)), Context()),
         r"BatchNorm: input x must have shape \(batch, …, 3\) to match scale of shape \(3,\); "
         r"got x shape \(2, 4\)"),
        (lambda: BatchNorm().check(P, S, np.ones(3), Context()),
         r"BatchNorm: input x must have shape \(batch, …, 3\)"),
        (lambda: BatchNorm().check(P, S, [[1.0, 2.0, 3.0]], Context()),
         r"BatchNorm: input x must be an array \(jax.numpy or numpy\); got list"),
        (lambda: BatchNorm().check(P, S, np.ones((2, 3)), Context(train=jnp.array(True))),
         r"BatchNorm: ctx.train must be a Python bool"),
        (lambda: BatchNorm().check(P, S, np.ones((2, 3)), {"train": True}),
         r"BatchNorm: ctx must be a jaxbp.layers.Context\(train, key\); got dict"),
        (lambda: BatchNorm().check(P, S, np.ones((1, 3)), Context(train=True)),
         r"BatchNorm: train=True needs at least 2 values per channel for batch statistics "
         r"\(PyTorch refuses 1 too\); got x shape \(1, 3\), 1 value\(s\) per channel"),
        (lambda: BatchNorm().check(P, S, np.ones((1, 1, 1, 3)), Context(train=True)),
         r"BatchNorm: train=True needs at least 2 values per channel .* got x shape "
         r"\(1, 1, 1, 3\), 1 value"),
        (lambda: BatchNorm().check(P, S, np.ones((0, 3)), Context(train=True)),
         r"BatchNorm: train=True needs at least 2 values per channel .* 0 value"),
    ],
)
def test_errors_name_layer_and_shapes(call_, message):
    with pytest.raises(ValueError, match=message):
        call_()


def test_one_value_per_channel_is_fine_in_eval_and_errors_carry_the_path():
    BatchNorm().check(P, S, np.ones((1, 3)), Context(train=False))
    BatchNorm().check(P, S, np.ones((2, 1, 1, 3)), Context(train=True))  # M = 2
    with pytest.raises(LayerError, match=r"^layers\[2\] BatchNorm: train=True needs at least 2"):
        call(BatchNorm(), "layers[2]", P, S, np.ones((1, 3)), Context(train=True))
