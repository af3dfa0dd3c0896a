"""Nested networks: Sequential inside Sequential, Residual blocks, normalisation, dropout.

Random nested architectures on (batch, features) and (batch, time, features)
inputs must give ``net.manual_backward == jax.grad(net.loss)`` in float64 within
1e-10 relative per leaf, in train mode (batch statistics, dropout masks drawn
from the key) and eval mode (running statistics), with the same new state from
every method. Each hypothesis example checks its networks in both modes inside
one jitted program; params, state and data are drawn by NumPy. The focused
tests below pin the structure of the gradients, weight decay over nested
weights, the residual rule dx = dy + body dx, nested error paths, state and
keys.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, layers, losses
from jaxbp.layers.base import Context
from tests.helpers import max_tree_rel_error, random_params, rel_error

ACTIVATIONS = [layers.Tanh(), layers.Sigmoid(), layers.GELU(), layers.Softplus(),
               layers.ELU(0.7), layers.LeakyReLU(0.1), layers.Identity()]
CLASSES = 3
BOUND = 1e-10  # float64, relative per leaf
# A leaf whose true gradient is 0 in exact arithmetic (the bias of a Dense whose every path
# to the loss runs through train-mode BatchNorm, which removes any per-channel constant)
# holds rounding noise in both gradients: there a relative error means nothing, and the
# leaf is compared to the largest gradient entry of the network instead.
NEGLIGIBLE = 1e-8
# Compiler options for these run-once programs: LLVM's level 1, not helpers.RUN_ONCE's 0. At
# level 0 XLA:CPU computes a fused x @ W + b differently in two fusions, so autodiff of the
# softmax loss's max(z) (which compares z with max(z)) finds no maximum and returns ±inf for
# (batch, time, features) inputs (jax 0.10.2).
RUN_ONCE = {"xla_backend_optimization_level": 1}


# --------------------------------------------------------------------- architectures
def _leaf(draw, width):
    """A leaf layer for inputs with ``width`` features, and its output width."""
    kind = draw(st.sampled_from(["dense", "dense", "activation", "norm", "batchnorm", "dropout"]))
    if kind == "dense":
        units = draw(st.integers(1, 4))
        return layers.Dense(units, use_bias=draw(st.booleans())), units
    if kind == "activation":
        return draw(st.sampled_from(ACTIVATIONS)), width
    if kind == "dropout":
        return layers.Dropout(draw(st.sampled_from([0.25, 0.5]))), width
    # Centring and scaling 2 values (a LayerNorm row of 2 features, a BatchNorm channel of 2
    # samples), or scaling 1 (RMSNorm of one feature), leaves ±√(σ²/(σ² + ε)): a function of
    # x only through ε, whose exact gradient is a difference of nearly equal terms (relative
    # rounding ~ ε_mach·σ²/ε, up to 1e-9). LayerNorm of one feature is even constant. So
    # LayerNorm rows have ≥ 3 features, RMSNorm rows ≥ 2, BatchNorm channels ≥ 3 values
    # (batch ≥ 3).
    norms = [layers.BatchNorm(momentum=0.3)] * (kind == "batchnorm" or width == 1)
    if kind == "norm" and width >= 2:
        norms += [layers.RMSNorm()] + [layers.LayerNorm()] * (width >= 3)
    return draw(st.sampled_from(norms)), width


@st.composite
def blocks(draw, width, depth):
    """``(layer, out_width)``: a leaf, or (depth > 0) a Sequential or Residual of blocks."""
    kind = draw(st.sampled_from(["leaf", "sequential", "residual"] if depth else ["leaf"]))
    if kind == "leaf":
        return _leaf(draw, width)
    children, w = [], width
    for _ in range(draw(st.integers(1, 3))):
        child, w = draw(blocks(w, depth - 1))
        children.append(child)
    if kind == "sequential":
        return layers.Sequential(children), w
    if w != width:  # the body must map x to its own shape
        children.append(layers.Dense(width))
    body = children[0] if len(children) == 1 else layers.Sequential(children)
    return layers.Residual(body), width


@st.composite
def nested_cases(draw):
    """``(net, input_shape, batch, seed)``: 1–3 blocks of depth ≤ 2, then Dense(classes)."""
    input_shape = draw(st.sampled_from([(3,), (2, 3), (3, 2)]))  # (features,) or (time, features)
    stack, w = [], input_shape[-1]
    for _ in range(draw(st.integers(1, 3))):
        block, w = draw(blocks(w, 2))
        stack.append(block)
    stack.append(layers.Dense(CLASSES))
    loss = draw(st.sampled_from([losses.SoftmaxCrossEntropy(), losses.HalfSquaredError()]))
    net = Sequential(stack, loss=loss, weight_decay=draw(st.sampled_from([0.0, 0.1])))
    return net, input_shape, draw(st.integers(3, 4)), draw(st.integers(0, 2**16))


# ---------------------------------------------------------------------------- data
def random_state(net, input_shape, rng):
    """The net's state with running means ~ N(0, 0.3²) and variances in [0.5, 2]."""
    shapes = jax.eval_shape(lambda k: net.init_state(k, input_shape, jnp.float64),
                            jax.random.key(0))

    def draw(path, s):
        if path[-1].key == "mean":
            return 0.3 * rng.normal(size=s.shape)
        return rng.uniform(0.5, 2.0, size=s.shape)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def draw_case(net, input_shape, batch, seed):
    """``(params, state, x, y, key)``: NumPy params, state and data, a PRNG key."""
    rng = np.random.default_rng(seed)
    params = random_params(net, input_shape, rng)
    state = random_state(net, input_shape, rng)
    x = rng.normal(size=(batch, *input_shape))
    lead = (batch, *input_shape[:-1])
    if isinstance(net.loss_fn, losses.SoftmaxCrossEntropy):
        y = rng.integers(0, CLASSES, size=lead)
    else:
        y = rng.normal(size=(*lead, CLASSES))
    return params, state, x, y, jax.random.key(seed)


def leaf_errors(manual, auto):
    """Per leaf, max|manual − autodiff| relative to the leaf's largest autodiff entry, or to
    the network's largest where the leaf's is negligible (see ``NEGLIGIBLE``)."""
    assert jax.tree.structure(manual) == jax.tree.structure(auto)
    leaves = [(np.asarray(m), np.asarray(a)) for m, a in
              zip(jax.tree.leaves(manual), jax.tree.leaves(auto))]
    top = max((np.max(np.abs(a)) for _, a in leaves if a.size), default=0.0)
    errors = []
    for m, a in leaves:
        if a.size and np.max(np.abs(a)) <= NEGLIGIBLE * top:
            errors.append(float(np.max(np.abs(m - a)) / max(top, 1e-300)))
        else:
            errors.append(rel_error(m, a))
    return errors


MODES = (True, False)  # train, eval


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _every_method(nets, cases):
    """For each net, in train then eval mode: manual_step, jax.grad(loss), loss_and_state,
    forward_with_state."""
    out = []
    for net, (p, s, x, y, k) in zip(nets, cases):
        for train in MODES:
            mode = {"state": s, "key": k, "train": train}
            J, grads, new_state = net.manual_step(p, x, y, **mode)
            auto = jax.grad(net.loss)(p, x, y, **mode)
            J_auto, loss_state = net.loss_and_state(p, x, y, **mode)
            _, forward_state = net.forward_with_state(p, x, **mode)
            out.append((J, grads, new_state, auto, J_auto, loss_state, forward_state))
    return out


OBSERVED = {"max_rel_err": 0.0, "max_state_err": 0.0}  # what the checks saw (for reporting)


def check_nested(cases):
    nets = tuple(net for net, *_ in cases)
    drawn = [draw_case(*case) for case in cases]
    results = jax.device_get(_every_method(nets, drawn))
    for i, (net, (params, state, x, *_)) in enumerate(zip(nets, drawn)):
        for j, train in enumerate(MODES):
            J, grads, new_state, auto, J_auto, loss_state, forward_state = results[2 * i + j]
            where = (net.layers, x.shape, "train" if train else "eval")
            assert jax.tree.structure(grads) == jax.tree.structure(params), where
            errors = leaf_errors(grads, auto)
            OBSERVED["max_rel_err"] = max(OBSERVED["max_rel_err"], *errors)
            assert max(errors) <= BOUND, (where, errors)
            assert float(J) == pytest.approx(float(J_auto), rel=1e-12, abs=1e-300), where
            assert jax.tree.structure(new_state) == jax.tree.structure(state), where
            for other in (loss_state, forward_state):
                err = max_tree_rel_error(new_state, other)
                OBSERVED["max_state_err"] = max(OBSERVED["max_state_err"], err)
                assert err <= 1e-14, where
            moved = [not np.array_equal(a, b) for a, b in
                     zip(jax.tree.leaves(new_state), jax.tree.leaves(state))]
            # train mode moves every running statistic; eval mode only reads them
            assert moved == [train] * len(moved), where


@settings(max_examples=8)
@given(cases=st.lists(nested_cases(), min_size=3, max_size=3))
def test_random_nested_networks_manual_equals_autodiff(cases):
    check_nested(cases)


# ------------------------------------------------------------------------ focused
def _block(width=4, norm=None):
    """A pre-norm residual block ``x + Dense(Tanh(Dense(norm(x))))``."""
    norm = [] if norm is None else [norm]
    return layers.Residual(layers.Sequential(
        [*norm, layers.Dense(width), layers.Tanh(), layers.Dense(width)]))


def _deep_net(weight_decay=0.0, loss=None):
    """Every kind of nesting, on (batch, time, 3) inputs; 6 Dense layers at 3 depths.

      layers[0]  Dense(4)
      layers[1]  Sequential([Residual(LayerNorm, Dense, Tanh, Dense),
                             Sequential([Dropout(0.5), Residual(BatchNorm, Dense, Tanh, Dense)])])
      layers[2]  RMSNorm
      layers[3]  Dense(3)
    """
    inner = layers.Sequential([layers.Dropout(0.5), _block(norm=layers.BatchNorm())])
    stack = [layers.Dense(4), layers.Sequential([_block(norm=layers.LayerNorm()), inner]),
             layers.RMSNorm(), layers.Dense(CLASSES)]
    return Sequential(stack, loss=loss or losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


INPUT = (2, 3)  # (time, features)


def _deep_case(net=None, seed=0, batch=3):
    net = net or _deep_net()
    return (net, *draw_case(net, INPUT, batch, seed))


def _as_tuples(tree):
    """Every list of ``tree`` (the params of each Sequential) as a tuple."""
    if isinstance(tree, (list, tuple)):
        return tuple(_as_tuples(t) for t in tree)
    return tree


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _steps_and_grads(net, variants, x, y, k):
    return [(net.manual_step(p, x, y, state=s, key=k, train=True),
             jax.grad(net.loss)(p, x, y, state=s, key=k, train=True)) for p, s in variants]


def test_gradients_and_state_come_back_in_the_structure_of_params_and_state():
    net, params, state, x, y, key = _deep_case()
    mixed = [params[0], _as_tuples(params[1]), params[2], params[3]]  # tuples inside a list
    variants = [(params, state), (_as_tuples(params), _as_tuples(state)), (mixed, state)]
    results = _steps_and_grads(net, variants, x, y, key)
    for (p, s), ((_, grads, new_state), auto) in zip(variants, results):
        assert jax.tree.structure(grads) == jax.tree.structure(p) == jax.tree.structure(auto)
        assert jax.tree.structure(new_state) == jax.tree.structure(s)
        assert type(grads) is type(p) and type(grads[1]) is type(p[1])
        assert type(grads[1][1][1]) is type(p[1][1][1])  # the Residual's body, 3 levels down
        assert max_tree_rel_error(grads, auto) <= BOUND
    assert [type(p[1][1][1]) for p, _ in variants] == [list, tuple, tuple]


def _decayed_paths(net, params):
    flags = jax.tree.leaves(net.body.decayed(params))
    paths = jax.tree.leaves(net.body.param_paths(params, ""))
    return {path for path, flag in zip(paths, flags) if flag}


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE)
def _with_and_without_decay(net0, net1, p, s, x, y, k):
    mode = {"state": s, "key": k, "train": True}
    return (net0.loss(p, x, y, **mode), net1.loss(p, x, y, **mode),
            net0.manual_backward(p, x, y, **mode), net1.manual_backward(p, x, y, **mode),
            jax.grad(net1.loss)(p, x, y, **mode))


def test_weight_decay_applies_to_every_nested_weight_and_nothing_else():
    lam = 0.3
    net0, net1 = _deep_net(), _deep_net(weight_decay=lam)
    _, params, state, x, y, key = _deep_case(net0, seed=1)
    paths = jax.tree.leaves(net0.body.param_paths(params, ""))
    weights = [p for p in paths if p.endswith(".W")]
    assert len(weights) == 6 and _decayed_paths(net1, params) == set(weights)
    assert "layers[1].layers[1].layers[1].body.layers[1].W" in weights  # the deepest Dense
    J0, J1, g0, g1, auto = _with_and_without_decay(net0, net1, params, state, x, y, key)
    leaves = dict(zip(paths, jax.tree.leaves(params)))
    penalty = 0.5 * lam * sum(np.sum(np.square(leaves[p])) for p in weights)
    assert float(J1 - J0) == pytest.approx(penalty, rel=1e-12)
    assert float(net1.weight_penalty(params)) == pytest.approx(penalty, rel=1e-12)
    assert max_tree_rel_error(g1, auto) <= BOUND
    for path, a, b in zip(paths, jax.tree.leaves(g0), jax.tree.leaves(g1)):
        if path in weights:
            assert rel_error(b, a + lam * leaves[path]) <= 1e-12, path
        else:  # biases, LayerNorm / RMSNorm / BatchNorm scales and offsets
            np.testing.assert_array_equal(a, b, err_msg=path)
    scales = [p for p in paths if p.endswith((".scale", ".offset"))]
    assert len(scales) == 5 and all(not p.endswith(".W") for p in scales)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _residual_pieces(block, p, x, dy):
    ctx, s = Context(), block.empty_state()
    y, _, residuals = block.forward(p, s, x, ctx)
    body_y, _, body_residuals = block.body.forward(p, s, x, ctx)
    dparams, dx = block.backward(p, residuals, dy)
    body_dparams, body_dx = block.body.backward(p, body_residuals, dy)
    _, pullback = jax.vjp(lambda q, a: block.forward(q, s, a, ctx)[0], p, x)
    return y, body_y, dparams, dx, body_dparams, body_dx, pullback(dy)


def test_residual_dx_is_dy_plus_the_body_dx():
    block = _block(width=3, norm=layers.LayerNorm())
    rng = np.random.default_rng(2)
    p = jax.tree.map(lambda a: rng.normal(size=a.shape) / np.sqrt(a.shape[0]),
                     jax.eval_shape(lambda k: block.init(k, (2, 3))[0], jax.random.key(0)))
    x, dy = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))
    y, body_y, dparams, dx, body_dparams, body_dx, (auto_dp, auto_dx) = _residual_pieces(
        block, p, x, dy)
    np.testing.assert_allclose(y, x + body_y, rtol=0, atol=1e-15)
    np.testing.assert_allclose(dx, dy + body_dx, rtol=0, atol=1e-15)  # the skip path adds dy
    assert rel_error(body_dx, dy) > 0.1  # (the body's own dx is not negligible)
    assert jax.tree.structure(dparams) == jax.tree.structure(p)
    assert max_tree_rel_error(dparams, body_dparams) == 0  # the params are the body's
    assert max_tree_rel_error((dparams, dx), (auto_dp, auto_dx)) <= BOUND


@pytest.mark.parametrize("where, break_it, message", [
    ("layers[1].layers[1].layers[1].body.layers[1].W",
     lambda p: p[1][1][1][1].update(W=np.ones((4, 5))),
     r"^layers\[1\]\.layers\[1\]\.layers\[1\]\.body\.layers\[1\] Dense: params\['W'\] must "
     r"have shape \(in, units\) = \(\*, 4\); got \(4, 5\)"),
    ("layers[1].layers[0].body.layers[0].scale",
     lambda p: p[1][0][0].update(scale=np.ones(5)),
     r"^layers\[1\]\.layers\[0\]\.body\.layers\[0\] LayerNorm: "),
    ("layers[1].layers[1]", lambda p: p[1][1].pop(),
     r"^layers\[1\]\.layers\[1\] Sequential: params must be a list with one entry per layer "
     r"\(2\); got 1"),
])
def test_errors_in_nested_layers_name_the_nested_path(where, break_it, message):
    net, params, state, x, y, key = _deep_case()
    break_it(params)
    for method in (lambda: net.loss(params, x, y, state=state, key=key, train=True),
                   lambda: net.manual_backward(params, x, y, state=state, key=key, train=True),
                   lambda: net.forward(params, x, state=state)):
        with pytest.raises(ValueError, match=message):
            method()


def test_train_mode_batch_statistics_in_a_nested_block_name_the_path():
    net, params, state, x, y, key = _deep_case(batch=1)
    x = x[:, :1]  # one sample, one time step: one value per channel
    with pytest.raises(ValueError, match=r"^layers\[1\]\.layers\[1\]\.layers\[1\]\.body\."
                       r"layers\[0\] BatchNorm: train=True needs at least 2 values per channel"):
        net.manual_backward(params, x, y[:, :1], state=state, key=key, train=True)
    net.manual_backward(params, x, y[:, :1], state=state, key=key)  # eval mode: fine


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=RUN_ONCE)
def _states(net, train, p, s, x, y, k):
    mode = {"state": s, "key": k, "train": train}
    return (net.manual_step(p, x, y, **mode)[2], net.loss_and_state(p, x, y, **mode)[1],
            net.forward_with_state(p, x, **mode)[1],
            net.manual_step(p, x, y, **mode, remat_every=2)[2])


def test_manual_step_loss_and_state_and_forward_give_the_same_new_state():
    """Train mode: BatchNorm's running statistics move, the same way in every method.

    Its input (the pre-norm block's x) is computed here from the same params, so the
    update (1 − m)·old + m·batch statistic (unbiased variance) is checked by hand.
    """
    net, params, state, x, y, key = _deep_case(seed=3)
    stepped, from_loss, from_forward, remat = jax.device_get(
        _states(net, True, params, state, x, y, key))
    for other in (from_loss, from_forward, remat):
        assert jax.tree.structure(other) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)
    # BatchNorm's input is the output of the Dropout at layers[1].layers[1].layers[0]: the
    # net cut there, with the same nested paths, so that Dropout draws the same mask
    head = Sequential([net.layers[0], layers.Sequential([
        net.layers[1].layers[0], layers.Sequential([net.layers[1].layers[1].layers[0]])])],
        loss=net.loss_fn)
    cut = lambda tree: [tree[0], [tree[1][0], [tree[1][1][0]]]]  # noqa: E731
    h = np.asarray(head.forward(cut(params), x, state=cut(state), key=key, train=True))
    h = h.reshape(-1, h.shape[-1])  # M = batch·time values per channel
    old, new = state[1][1][1][0], stepped[1][1][1][0]
    assert not np.allclose(new["mean"], old["mean"])
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * h.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * h.var(0, ddof=1), rtol=1e-12)


def test_eval_mode_leaves_the_state_unchanged():
    net, params, state, x, y, key = _deep_case(seed=4)
    for new in jax.device_get(_states(net, False, params, state, x, y, key)):
        assert jax.tree.structure(new) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, b)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _losses_for_keys(net, p, s, x, y, keys):
    return [[net.loss(p, x, y, state=s, key=k, train=train) for k in keys]
            for train in (True, False)]


def test_same_key_same_loss_other_key_other_loss():
    net, params, state, x, y, _ = _deep_case(seed=5)
    keys = [jax.random.key(1), jax.random.key(1), jax.random.key(2)]
    (a, b, c), (ea, eb, ec) = jax.device_get(_losses_for_keys(net, params, state, x, y, keys))
    assert a == b  # the same masks from the same key
    assert abs(c - a) > 1e-6 * abs(a)  # other masks from another key
    assert ea == eb == ec  # eval mode: no dropout, the key is not used
    assert ea != a


def test_missing_state_or_key_raise_clear_errors():
    net, params, state, x, y, key = _deep_case()
    with pytest.raises(ValueError, match=r"^Sequential: this network has state \(running "
                       r"statistics\); pass state=net.init_state\(key, input_shape\)"):
        net.loss(params, x, y, key=key, train=True)
    for method in (net.manual_backward, net.manual_step, net.manual_value_and_grad):
        with pytest.raises(ValueError, match=r"this network has state"):
            method(params, x, y, key=key, train=True)
    with pytest.raises(ValueError, match=r"this network has state"):
        net.forward(params, x)
    with pytest.raises(ValueError, match=r"^layers\[1\]\.layers\[1\]\.layers\[0\] Dropout: "
                       r"train=True needs a PRNG key for the dropout mask \(pass key=\.\.\.\); "
                       r"got key=None"):
        net.manual_backward(params, x, y, state=state, train=True)
    with pytest.raises(ValueError, match=r"Dropout: train=True needs a PRNG key"):
        net.loss(params, x, y, state=state, train=True)
    with pytest.raises(ValueError, match=r"^Sequential: key must be a PRNG key, e.g. "
                       r"jax.random.key\(0\); got int"):
        net.loss(params, x, y, state=state, key=3, train=True)
    net.loss(params, x, y, state=state)  # eval mode needs no key


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def _signals_and_remat(net, p, s, x, y, k):
    mode = {"state": s, "key": k, "train": True}
    grads, signals = net.manual_backward_with_signals(p, x, y, **mode)
    remat = [net.manual_backward(p, x, y, **mode, remat_every=r) for r in (1, 3)]
    auto, auto_dx = jax.grad(net.loss, argnums=(0, 1))(p, x, y, **mode)
    return grads, signals, remat, auto, auto_dx


def test_signals_and_remat_through_nested_blocks_with_dropout_and_batchnorm():
    """Signals are per top-level layer; remat recomputes the same masks from the same key."""
    net, params, state, x, y, key = _deep_case(seed=6)
    grads, signals, remat, auto, auto_dx = jax.device_get(
        _signals_and_remat(net, params, state, x, y, key))
    assert len(signals) == len(net.layers)
    assert rel_error(signals[0], auto_dx) <= BOUND
    for g in (grads, *remat):
        assert max(leaf_errors(g, auto)) <= BOUND
