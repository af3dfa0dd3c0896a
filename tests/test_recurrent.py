"""RNN, LSTM, GRU and Embedding: hand-written BPTT against autodiff, and PyTorch as an oracle.

Per layer, ``backward`` against ``jax.vjp`` of ``forward`` in float64 within 1e-10 relative
per leaf (params N(0, 0.5²), away from the init, so that no gate is saturated or trivial),
with the zero initial state and a given one (its gradient included), for T = 1, 5 and 64 (at
T = 64 the gradient must reach t = 0); the same in float32 with a looser bound; the public
one-step functions against ``jax.vjp`` of ``step``; the embedding's scatter-add; whole
character models against ``jax.grad`` (weight decay, ignored label positions); PyTorch's
``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` for values and every gradient (skipped without torch);
pinned errors; and that the program's size does not grow with the sequence length.

Inputs are drawn by NumPy; each check is one jitted program, shared by the cases of one shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, gradcheck, layers, losses, models
from jaxbp.layers.base import call
from jaxbp.layers.torch_weights import from_torch, to_torch
from tests.helpers import RUN_ONCE, max_tree_rel_error, random_params, rel_error

CELLS = {"rnn": layers.RNN, "lstm": layers.LSTM, "gru": layers.GRU}
CTX = layers.Context()  # eval mode, no key: these layers are deterministic and stateless
BOUND = 1e-10  # float64, relative per leaf
# float32: both sides round at ε ≈ 6e-8 per operation and the errors add up over the steps
# (seen: ≤ 3e-7 relative at T = 8, ≤ 3e-6 at T = 64); 1e-4 relative is the documented bound.
BOUND32 = 1e-4
# Models compile at LLVM level 1, as in test_nested.py: at level 0 XLA:CPU may compute the
# last Dense's x @ W + b differently in two fusions, and autodiff of the loss's max(z) breaks.
MODEL_OPTIONS = {"xla_backend_optimization_level": 1}
BATCH, TIME, FEATURES, HIDDEN = 3, 5, 4, 3
VOCAB = 7


# ------------------------------------------------------------------------ one layer
def forward(layer, params, x):
    """``(y, residuals)`` through ``check`` then ``forward``, as a container runs a layer."""
    y, state, residuals = call(layer, "layer", params, {}, x, CTX)
    assert state == {}, state
    return y, residuals


def _floating(x) -> bool:
    return all(jnp.issubdtype(v.dtype, jnp.floating) for v in jax.tree.leaves(x))


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def manual_and_vjp(layer, params, x, dy):
    """``(y, manual, autodiff)``: the output and both ``(dparams, dx)``, in one program.

    Integer inputs (token ids) have no gradient: autodiff's ``dx`` is then ``None``, as the
    manual one is.
    """
    y, residuals = forward(layer, params, x)
    manual = layer.backward(params, residuals, dy)
    if _floating(x):
        _, pullback = jax.vjp(lambda p, a: forward(layer, p, a)[0], params, x)
        auto = pullback(dy)
    else:
        _, pullback = jax.vjp(lambda p: forward(layer, p, x)[0], params)
        auto = (pullback(dy)[0], None)
    return y, manual, auto


def initial_state(layer, batch, rng, dtype=np.float64):
    """A random initial state: h0, or (h0, c0) for the LSTM, each (batch, hidden)."""
    def draw():
        return rng.normal(size=(batch, layer.hidden)).astype(dtype)

    return (draw(), draw()) if isinstance(layer, layers.LSTM) else draw()


def draw_case(layer, batch, time, features, rng, *, given_state=False, dtype=np.float64):
    """``(params, x, dy)``: params N(0, 0.5²) (biases too), x and dy N(0, 1), by NumPy.

    ``given_state``: x is ``(x, h0)`` or ``(x, (h0, c0))``.
    """
    shapes = jax.eval_shape(lambda k: layer.init(k, (time, features), dtype)[0],
                            jax.random.key(0))
    params = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(dtype), shapes)
    x = rng.normal(size=(batch, time, features)).astype(dtype)
    if given_state:
        x = (x, initial_state(layer, batch, rng, dtype))
    out = (batch, time, layer.hidden) if layer.return_sequences else (batch, layer.hidden)
    return params, x, rng.normal(size=out).astype(dtype)


LAYERS = [cls(HIDDEN, return_sequences=seq) for cls in CELLS.values() for seq in (True, False)]


@pytest.mark.parametrize("given_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("layer", LAYERS, ids=repr)
def test_backward_matches_vjp_float64(layer, given_state):
    rng = np.random.default_rng([len(repr(layer)), int(given_state)])
    params, x, dy = draw_case(layer, BATCH, TIME, FEATURES, rng, given_state=given_state)
    _, manual, auto = manual_and_vjp(layer, params, x, dy)
    assert max_tree_rel_error(manual, auto) <= BOUND
    if given_state:  # the initial state's gradient, (dh0,) or (dh0, dc0), is compared too
        dx, dcarry0 = manual[1]
        assert dx.shape == x[0].shape
        assert all(np.abs(d).max() > 1e-3 for d in jax.tree.leaves(dcarry0))


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_one_step_sequence_matches_vjp(kind):
    """T = 1: the reverse scan runs once; with a given initial state dh0 = da Whᵀ (+ …)."""
    layer = CELLS[kind](HIDDEN)
    params, x, dy = draw_case(layer, BATCH, 1, FEATURES, np.random.default_rng(1),
                              given_state=True)
    y, manual, auto = manual_and_vjp(layer, params, x, dy)
    assert y.shape == (BATCH, 1, HIDDEN)
    assert max_tree_rel_error(manual, auto) <= BOUND


def long_memory(layer, params, rng):
    """Params whose gradient survives 64 steps back (not saturated, not vanishing).

    LSTM: forget-gate bias + 3 (f ≈ 0.95); GRU: update-gate bias + 3 (z ≈ 0.95 keeps h_{t−1});
    RNN: Wh orthogonal and a weak input (Wx, b scaled by 0.2), so tanh' stays near 1. With the
    plain N(0, 0.5²) draw the RNN's ∂L/∂x_0 from the last output is ~1e-50.
    """
    p = {k: np.array(v) for k, v in params.items()}
    H = layer.hidden
    if isinstance(layer, (layers.LSTM, layers.GRU)):
        p["b"][H:2 * H] += 3.0  # the second gate block: f for the LSTM, z for the GRU
    else:
        p["Wh"] = np.linalg.qr(rng.normal(size=(H, H)))[0]
        p["Wx"], p["b"] = 0.2 * p["Wx"], 0.2 * p["b"]
    return p


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_long_sequence_gradient_reaches_the_first_step(kind):
    """T = 64, only the last output reaches the loss: ∂L/∂x_0 flows back through 63 steps.

    It must be nonzero and match autodiff on its own (not only relative to the largest
    entry of dx, which sits near the end of the sequence).
    """
    layer = CELLS[kind](HIDDEN, return_sequences=False)
    rng = np.random.default_rng(64)
    params, x, dy = draw_case(layer, BATCH, 64, FEATURES, rng, given_state=True)
    _, manual, auto = manual_and_vjp(layer, long_memory(layer, params, rng), x, dy)
    assert max_tree_rel_error(manual, auto) <= BOUND
    dx, auto_dx = manual[1][0], auto[1][0]
    assert np.abs(dx[:, 0]).max() > 1e-6 * np.abs(dx).max()
    assert rel_error(dx[:, 0], auto_dx[:, 0]) <= BOUND
    assert all(np.abs(d).max() > 1e-8 for d in jax.tree.leaves(manual[1][1]))  # dh0 (, dc0)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_backward_matches_vjp_float32(kind):
    layer = CELLS[kind](HIDDEN)
    params, x, dy = draw_case(layer, BATCH, 8, FEATURES, np.random.default_rng(32),
                              given_state=True, dtype=np.float32)
    y, manual, auto = manual_and_vjp(layer, params, x, dy)
    assert y.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(manual))
    assert max_tree_rel_error(manual, auto) <= BOUND32


@settings(max_examples=6, deadline=None)
@given(
    kind=st.sampled_from(sorted(CELLS)),
    batch=st.integers(1, 3),
    time=st.integers(1, 6),
    features=st.integers(1, 4),
    hidden=st.integers(1, 4),
    return_sequences=st.booleans(),
    given_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_vjp(kind, batch, time, features, hidden, return_sequences,
                                 given_state, seed):
    layer = CELLS[kind](hidden, return_sequences=return_sequences)
    params, x, dy = draw_case(layer, batch, time, features, np.random.default_rng(seed),
                              given_state=given_state)
    _, manual, auto = manual_and_vjp(layer, params, x, dy)
    assert max_tree_rel_error(manual, auto) <= BOUND


# ------------------------------------------------------------------ the step functions
@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def step_manual_and_vjp(layer, params, carry, xw, dcarry):
    """One step: ``step_backward``'s gradients and ``jax.vjp`` of ``step``'s new carry."""
    _, step = layer.step(params, carry, xw)
    dcarry_prev, da = layer.step_backward(params, step, dcarry)
    _, pullback = jax.vjp(lambda p, c, a: layer.step(p, c, a)[0], params, carry, xw)
    return step, dcarry_prev, da, pullback(dcarry)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_step_backward_matches_vjp_of_step(kind):
    """``step_backward`` returns ∂L/∂carry_{t−1} and the gate gradient ``da`` = ∂L/∂xw_t.

    The step's weight gradient follows from ``da``: ``dWh = h_{t−1}ᵀ da`` (for the GRU, with
    the n block replaced by ``dhn``, and ``dbhn = Σ dhn``); ``Wx`` and ``b`` enter only
    through ``xw_t``, so autodiff gives them 0.
    """
    layer = CELLS[kind](HIDDEN)
    rng = np.random.default_rng(2)
    params, _, _ = draw_case(layer, BATCH, 1, FEATURES, rng)
    carry, dcarry = initial_state(layer, BATCH, rng), initial_state(layer, BATCH, rng)
    xw = rng.normal(size=(BATCH, layer.gates * HIDDEN))
    step, dcarry_prev, da, (dparams, auto_dcarry, auto_dxw) = step_manual_and_vjp(
        layer, params, carry, xw, dcarry)
    assert max_tree_rel_error(dcarry_prev, auto_dcarry) <= BOUND
    if kind == "gru":
        dxw, dhn = da
        dWh = step.h_prev.T @ np.concatenate([dxw[:, :2 * HIDDEN], dhn], axis=1)
        assert rel_error(dhn.sum(axis=0), dparams["bhn"]) <= BOUND
    else:
        dxw, dWh = da, step.h_prev.T @ da
    assert rel_error(dxw, auto_dxw) <= BOUND
    assert rel_error(dWh, dparams["Wh"]) <= BOUND
    assert not np.any(dparams["Wx"]) and not np.any(dparams["b"])


# -------------------------------------------------------------------------- Embedding
@pytest.mark.parametrize("shape", [(12,), (3, 5), (2, 3, 2)], ids=str)
def test_embedding_backward_accumulates_repeated_ids(shape):
    """dW = one_hot(ids)ᵀ dy (NumPy) = autodiff's, with ids repeating; dx is None."""
    layer = layers.Embedding(VOCAB, 4)
    rng = np.random.default_rng(len(shape))
    ids = rng.integers(0, VOCAB, size=shape)
    assert len(np.unique(ids)) < ids.size  # some ids repeat
    params = {"W": rng.normal(size=(VOCAB, 4))}
    dy = rng.normal(size=(*shape, 4))
    y, (dparams, dx), (auto, _) = manual_and_vjp(layer, params, ids, dy)
    np.testing.assert_array_equal(y, params["W"][ids])
    assert dx is None
    one_hot = np.eye(VOCAB)[ids.reshape(-1)]  # (positions, vocab)
    assert rel_error(dparams["W"], one_hot.T @ dy.reshape(-1, 4)) <= 1e-14
    assert rel_error(dparams["W"], auto["W"]) <= 1e-14


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_embedding_refuses_out_of_range_ids(bad):
    layer = layers.Embedding(VOCAB, 4)
    params = {"W": np.zeros((VOCAB, 4))}
    ids = np.array([[0, 3, bad]])
    lo, hi = min(0, bad), max(3, bad)
    with pytest.raises(ValueError, match=rf"^Embedding: input ids must lie in \[0, 7\) for "
                                         rf"vocab_size 7; got values in \[{lo}, {hi}\]$"):
        layer.check(params, {}, ids, CTX)
    with pytest.raises(ValueError, match=r"^layer Embedding: input ids must lie in \[0, 7\)"):
        forward(layer, params, ids)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_embedding_out_of_range_id_inside_jit_gives_nan_row(bad):
    """Inside jit the ids cannot be checked: the row of an id outside [0, vocab) is NaN (never
    another token's row, e.g. W[-1] by wrap-around), and it adds to no row of dW."""
    layer = layers.Embedding(VOCAB, 4)
    rng = np.random.default_rng(5)
    params = {"W": rng.normal(size=(VOCAB, 4))}
    ids = np.array([[1, bad, 6]])
    y, (dparams, _), _ = manual_and_vjp(layer, params, ids, np.ones((1, 3, 4)))
    np.testing.assert_array_equal(y[0, [0, 2]], params["W"][[1, 6]])
    assert np.all(np.isnan(y[0, 1])), y[0, 1]
    np.testing.assert_array_equal(dparams["W"], np.eye(VOCAB)[[1, 6]].T @ np.ones((2, 4)))


# ---------------------------------------------------------------------------- networks
@functools.partial(jax.jit, static_argnums=0, compiler_options=MODEL_OPTIONS)
def model_manual_and_grad(net, params, x, y):
    """``(J, manual grads, autodiff J, autodiff grads, logits)``, compiled as one program."""
    J, manual = net.manual_value_and_grad(params, x, y)
    J_auto, auto = jax.value_and_grad(net.loss)(params, x, y)
    return J, manual, J_auto, auto, net.forward(params, x)


def language_model(cell, num_layers=1, weight_decay=0.1):
    """``models.char_rnn`` with softmax cross-entropy ignoring the label −1 (padding)."""
    net = models.char_rnn(VOCAB, cell=cell, hidden=4, embed=3, num_layers=num_layers)
    return Sequential(net.layers, loss=losses.SoftmaxCrossEntropy(ignore_label=-1),
                      weight_decay=weight_decay)


def lm_data(net, seed, batch=BATCH, time=TIME):
    """NumPy params (helpers.random_params), ids and labels (batch, time), a third ignored."""
    rng = np.random.default_rng(seed)
    params = random_params(net, (time,), rng)
    ids = rng.integers(0, VOCAB, size=(batch, time))
    labels = rng.integers(0, VOCAB, size=(batch, time))
    labels[rng.random(size=labels.shape) < 1 / 3] = -1
    labels[0, 0] = 2  # (at least one counted position)
    return params, ids, labels


def numpy_cross_entropy(logits, labels, ignore=-1):
    """The mean of −log softmax(z)[label] over the positions whose label is not ``ignore``."""
    z = np.asarray(logits).reshape(-1, logits.shape[-1])
    lab = np.asarray(labels).reshape(-1)
    counted = lab != ignore
    shifted = z - z.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.mean(log_softmax[counted, lab[counted]])


MODELS = {"rnn": ("rnn", 1), "lstm": ("lstm", 1), "gru": ("gru", 1), "lstm-2-layers": ("lstm", 2)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_char_rnn_manual_backward_matches_jax_grad(name):
    """Embedding → cell(s) → Dense on labels (batch, T) with ignored positions and decay."""
    net = language_model(*MODELS[name])
    params, ids, labels = lm_data(net, seed=len(name))
    J, manual, J_auto, auto, logits = model_manual_and_grad(net, params, ids, labels)
    assert logits.shape == (BATCH, TIME, VOCAB)
    assert max_tree_rel_error(manual, auto) <= BOUND
    assert abs(J - J_auto) <= 1e-13 * abs(J_auto)
    penalty = net.weight_penalty(params)
    assert penalty > 0
    assert abs(J - penalty - numpy_cross_entropy(logits, labels)) <= 1e-12

    # Every position ignored: the data loss is 0 and so is its gradient; what remains is the
    # weight decay, λW on the decayed leaves (the same compiled program).
    ignored = np.full_like(labels, -1)
    L, dy = net.loss_fn.value_and_grad(logits, ignored)
    assert float(L) == 0.0 and not np.any(dy)
    J, manual, J_auto, auto, _ = model_manual_and_grad(net, params, ids, ignored)
    assert abs(J - penalty) <= 1e-14 and abs(J_auto - penalty) <= 1e-14
    assert max_tree_rel_error(manual, auto) <= BOUND
    for g, p in zip(jax.tree.leaves(manual), jax.tree.leaves(params)):
        assert not np.any(g) or np.allclose(g, net.weight_decay * p, rtol=1e-15, atol=0)


def test_gradcheck_passes_on_a_char_rnn():
    """Integer ids have no gradient: gradcheck reports no signal row for the Embedding."""
    net = language_model("gru")
    params, ids, labels = lm_data(net, seed=9)
    report = gradcheck(net, params, ids, labels)
    assert report.ok, str(report)
    assert [r.path for r in report.signals] == ["loss.dy_hat", "layers[2].dx", "layers[1].dx"]
    assert {r.path for r in report.params} == {
        "layers[0].W", "layers[1].Wx", "layers[1].Wh", "layers[1].b", "layers[1].bhn",
        "layers[2].W", "layers[2].b"}


# ----------------------------------------------------------------------------- PyTorch
TORCH_NAMES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_matches_pytorch(kind):
    """Outputs and every gradient equal PyTorch's for the same weights, input and h0 (c0).

    The loss is a random linear functional of the output, Σ G ⊙ y. PyTorch's two biases are
    summed into jaxbp's ``b`` before the nonlinearity, so each receives db: bias_ih.grad =
    bias_hh.grad = db (PyTorch's gate order) — but for the GRU's n block, where bias_hh's is
    ``bhn``'s gradient. Converting PyTorch's gradients with ``from_torch`` (bias_hh zero but
    for that block) must then give jaxbp's dparams.
    """
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = getattr(torch.nn, TORCH_NAMES[kind])(FEATURES, HIDDEN, batch_first=True).double()
    layer = CELLS[kind](HIDDEN)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, TIME, FEATURES))
    carry = initial_state(layer, BATCH, rng)
    G = rng.normal(size=(BATCH, TIME, HIDDEN))

    xt = torch.tensor(x, requires_grad=True)
    carry_t = jax.tree.map(lambda c: torch.tensor(c[None], requires_grad=True), carry)
    out, _ = module(xt, carry_t)
    (out * torch.tensor(G)).sum().backward()

    params = from_torch(layer, module.state_dict())
    y, (dparams, (dx, dcarry0)), _ = manual_and_vjp(layer, params, (x, carry), G)
    assert rel_error(y, out.detach().numpy()) <= 1e-12
    assert rel_error(dx, xt.grad.numpy()) <= 1e-12
    assert max_tree_rel_error(dcarry0, jax.tree.map(lambda c: c.grad.numpy()[0], carry_t)) <= 1e-12

    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    shared = slice(0, 2 * HIDDEN) if kind == "gru" else slice(None)  # the blocks summed into b
    assert rel_error(grads["bias_hh_l0"][shared], grads["bias_ih_l0"][shared]) <= 1e-12
    bias_hh = np.zeros_like(grads["bias_hh_l0"])
    if kind == "gru":
        bias_hh[2 * HIDDEN:] = grads["bias_hh_l0"][2 * HIDDEN:]  # b_hn's gradient: bhn's
    want = from_torch(layer, {**grads, "bias_hh_l0": bias_hh})
    assert sorted(want) == sorted(dparams)
    assert max_tree_rel_error(dparams, want) <= 1e-12

    # to_torch the other way: jaxbp's params loaded into PyTorch give jaxbp's output.
    other, _, _ = draw_case(layer, BATCH, TIME, FEATURES, rng)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch(layer, other).items()})
    y_other, _, _ = manual_and_vjp(layer, other, (x, carry), G)
    with torch.no_grad():
        out_other, _ = module(xt, carry_t)
    assert rel_error(y_other, out_other.numpy()) <= 1e-12


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_torch_weights_round_trip_is_exact(kind):
    layer = CELLS[kind](HIDDEN)
    params, _, _ = draw_case(layer, BATCH, TIME, FEATURES, np.random.default_rng(4))
    back = from_torch(layer, to_torch(layer, params))
    assert sorted(back) == sorted(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])


@pytest.mark.parametrize("case", ["missing", "weight_hh", "bias"])
def test_from_torch_refuses_a_state_dict_of_other_shapes(case):
    layer = layers.LSTM(2)
    sd = {"weight_ih_l0": np.zeros((8, 3)), "weight_hh_l0": np.zeros((8, 2)),
          "bias_ih_l0": np.zeros(8), "bias_hh_l0": np.zeros(8)}
    if case == "missing":
        del sd["bias_hh_l0"]
        match = r"^from_torch: the state dict lacks bias_hh_l0"
    elif case == "weight_hh":
        sd["weight_hh_l0"] = np.zeros((8, 3))
        match = r"^from_torch: LSTM\(.*\) needs weight_hh_l0 of shape \(8, 2\)"
    else:  # both biases of the same wrong shape
        sd["bias_ih_l0"], sd["bias_hh_l0"] = np.zeros(6), np.zeros(6)
        match = r"^from_torch: "
    with pytest.raises(ValueError, match=match):
        from_torch(layer, sd)


# ------------------------------------------------------------------------------ errors
def _params(layer, features=FEATURES):
    shapes = jax.eval_shape(lambda k: layer.init(k, (TIME, features), jnp.float64)[0],
                            jax.random.key(0))
    return jax.tree.map(lambda s: np.zeros(s.shape), shapes)


_X = np.zeros((2, TIME, FEATURES))
_SHAPE = r"input x must have shape \(batch, time, 4\) with time >= 1 to match Wx of shape "
ERRORS = [
    ("features", layers.RNN(3), np.zeros((2, TIME, 3)),
     rf"^RNN: {_SHAPE}\(4, 3\); got x shape \(2, 5, 3\)$"),
    ("rank 2", layers.GRU(3), np.zeros((2, FEATURES)),
     rf"^GRU: {_SHAPE}\(4, 9\); got x shape \(2, 4\)$"),
    ("time 0", layers.LSTM(3), np.zeros((2, 0, FEATURES)),
     rf"^LSTM: {_SHAPE}\(4, 12\); got x shape \(2, 0, 4\)$"),
    ("integer x", layers.RNN(3), np.zeros((2, TIME, FEATURES), np.int32),
     r"^RNN: input x must be floating-point; got dtype int32 \(integer token ids go through "
     r"layers.Embedding first\)$"),
    ("h0 shape", layers.GRU(3), (_X, np.zeros((2, 5))),
     r"^GRU: the initial state must be floating-point with shape \(2, 3\) for x of shape "
     r"\(2, 5, 4\); got \(2, 5\)$"),
    ("integer h0", layers.RNN(3), (_X, np.zeros((2, 3), np.int32)),
     r"^RNN: the initial state must be floating-point with shape \(2, 3\)"),
    ("LSTM without c0", layers.LSTM(3), (_X, np.zeros((2, 3))),
     r"^LSTM: the initial state must be floating-point with shape \(\(2, 3\), \(2, 3\)\) for "
     r"x of shape \(2, 5, 4\); got \(2, 3\)$"),
    ("embedding float ids", layers.Embedding(VOCAB, 3), np.zeros((2, TIME)),
     r"^Embedding: input ids must be an integer array \(batch, …\); got dtype float64 with "
     r"shape \(2, 5\)$"),
]


@pytest.mark.parametrize("layer, x, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_is_a_clear_error(layer, x, match):
    params = _params(layer) if not isinstance(layer, layers.Embedding) else {
        "W": np.zeros((VOCAB, 3))}
    with pytest.raises(ValueError, match=match):
        layer.check(params, {}, x, CTX)


@pytest.mark.parametrize("make, match", [
    (lambda: layers.RNN(0), r"^RNN: hidden must be a positive int; got 0$"),
    (lambda: layers.LSTM("4"), r"^LSTM: hidden must be a positive int; got '4'$"),
    (lambda: layers.GRU(2.5), r"^GRU: hidden must be a positive int; got 2.5$"),
    (lambda: layers.Embedding(0, 3), r"^Embedding: vocab_size must be a positive int; got 0$"),
    (lambda: layers.Embedding(VOCAB, "3"), r"^Embedding: dim must be a positive int; got '3'$"),
], ids=["rnn-0", "lstm-str", "gru-float", "embedding-0", "embedding-str"])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_errors_in_a_model_name_the_nested_layer():
    net = language_model("lstm")
    params, ids, labels = lm_data(net, seed=0)
    with pytest.raises(ValueError, match=r"^layers\[0\] Embedding: input ids must be an "
                                         r"integer array"):
        net.forward(params, ids.astype(np.float64))
    with pytest.raises(ValueError, match=r"^layers\[0\] Embedding: input ids must lie in "
                                         r"\[0, 7\) for vocab_size 7; got values in \[\d, 7\]$"):
        net.manual_backward(params, np.where(ids == ids[0, 0], VOCAB, ids), labels)

    # (batch, features) into a cell: a Dense before it accepts it, the LSTM does not.
    dense_first = Sequential([layers.Dense(4), layers.LSTM(3), layers.Dense(2)],
                             loss=losses.SoftmaxCrossEntropy())
    p = random_params(dense_first, (TIME, FEATURES), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^layers\[1\] LSTM: input x must have shape "
                                         r"\(batch, time, 4\) with time >= 1"):
        dense_first.forward(p, np.zeros((2, FEATURES)))

    # A nested stack of cells whose params were swapped: the path names the nested layer.
    nested = Sequential([layers.Embedding(VOCAB, 3),
                         layers.Sequential([layers.GRU(3), layers.LSTM(3)]), layers.Dense(VOCAB)],
                        loss=losses.SoftmaxCrossEntropy())
    p = random_params(nested, (TIME,), np.random.default_rng(0))
    p[1] = [p[1][0], p[1][0]]  # the GRU's params (with bhn) for the LSTM too
    with pytest.raises(ValueError, match=r"^layers\[1\]\.layers\[1\] LSTM: params must have the "
                                         r"keys \['Wh', 'Wx', 'b'\]; got \['Wh', 'Wx', 'b', "
                                         r"'bhn'\]"):
        nested.forward(p, ids)


# ----------------------------------------------------------------------- program size
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_program_does_not_grow_with_the_sequence_length(kind):
    """Forward and backward are ``lax.scan`` loops: T = 8 and T = 256 lower to HLO of about
    the same length (a Python loop over the steps would be 32 times longer). Lowering
    traces only; nothing is compiled or timed."""
    layer = CELLS[kind](HIDDEN)

    def forward_backward(params, x, dy):
        y, residuals = forward(layer, params, x)
        return y, layer.backward(params, residuals, dy)

    params = jax.eval_shape(lambda k: layer.init(k, (8, FEATURES), jnp.float64)[0],
                            jax.random.key(0))
    sizes = []
    for time in (8, 256):
        x = jax.ShapeDtypeStruct((BATCH, time, FEATURES), jnp.float64)
        dy = jax.ShapeDtypeStruct((BATCH, time, HIDDEN), jnp.float64)
        sizes.append(len(jax.jit(forward_backward).lower(params, x, dy).as_text()))
    assert sizes[1] / sizes[0] < 1.2, sizes
