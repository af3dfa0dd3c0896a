"""MultiHeadAttention: the hand-written backward, standard and lean, against autodiff and PyTorch.

Per layer, ``backward`` against ``jax.vjp`` of ``forward`` in float64 within 1e-10 relative
per leaf (params N(0, 0.5²), so the softmax is far from uniform), for ``backward="standard"``
and ``"lean"`` with block sizes 1, 3 (which does not divide T = 7), T and more than T, causal
and not, with and without a padding mask; float32 with a looser bound; lean = standard within
1e-12; rows that see no valid key (output ``bo``, finite zero gradients); the causal mask
exact to the bit; the lean residuals and backward hold no (T, T) array; PyTorch's
``scaled_dot_product_attention`` for values and every gradient (skipped without torch);
pinned errors; random shapes; whole models against ``jax.grad`` and ``gradcheck``.

Inputs are drawn by NumPy; each check is one jitted program, shared by the cases of one shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import Sequential, gradcheck, layers, losses
from jaxbp.layers.base import call
from tests.helpers import RUN_ONCE, max_tree_rel_error, random_params, rel_error

CTX = layers.Context()  # eval mode, no key: attention is deterministic and stateless
BOUND = 1e-10  # float64, relative per leaf
# float32: both sides round at ε ≈ 6e-8 per operation; exp(S − m) amplifies S's rounding by
# |S| (scores of order 5 here), and the two sides round differently (seen, standard and lean
# at T = 7 over 8 seeds: ≤ 6e-7 relative). 1e-4 relative is the documented bound, as for the
# recurrent layers.
BOUND32 = 1e-4
TWINS = 1e-12  # lean against standard: the same sums in another order
# Models compile at LLVM level 1, as in test_nested.py and test_recurrent.py (at level 0
# XLA:CPU may compute the last Dense's x @ W + b differently in two fusions).
MODEL_OPTIONS = {"xla_backend_optimization_level": 1}
BATCH, TIME, C, HEADS = 2, 7, 8, 2
MODES = [("standard", 64), ("lean", 1), ("lean", 3), ("lean", TIME), ("lean", TIME + 3)]


def attention(mode, block, causal=True, heads=HEADS):
    return layers.MultiHeadAttention(heads, causal=causal, backward=mode, block_size=block)


def mode_id(mode_block):
    mode, block = mode_block
    return mode if mode == "standard" else f"lean-{block}"


# ------------------------------------------------------------------------ one layer
def forward(layer, params, x):
    """``(y, residuals)`` through ``check`` then ``forward``, as a container runs a layer."""
    y, state, residuals = call(layer, "layer", params, {}, x, CTX)
    assert state == {}, state
    return y, residuals


def standard_twin(layer):
    """The same attention with ``backward="standard"``."""
    return layers.MultiHeadAttention(layer.num_heads, causal=layer.causal)


@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def manual_and_vjp(layer, params, x, valid, dy):
    """For the input ``x`` ("plain") and ``(x, valid)`` ("masked"), in one program: ``y``, the
    residuals, the manual ``(dparams, dx)`` (dx is ``(dx, None)`` for the masked input) and
    ``jax.vjp``'s of the layer's own forward, with respect to params and x (the mask is bool).
    """
    out = {}
    for name, wrap in [("plain", lambda a: a), ("masked", lambda a: (a, valid))]:
        y, residuals = forward(layer, params, wrap(x))
        _, pullback = jax.vjp(lambda p, a, wrap=wrap: forward(layer, p, wrap(a))[0], params, x)
        out[name] = {"y": y, "residuals": residuals,
                     "manual": layer.backward(params, residuals, dy), "auto": pullback(dy)}
    return out


def draw_case(rng, batch=BATCH, time=TIME, width=C, dtype=np.float64):
    """``(params, x, dy)``: every param N(0, 0.5²) (biases too), x and dy N(0, 1), by NumPy."""
    shapes = {"Wqkv": (width, 3 * width), "bqkv": (3 * width,), "Wo": (width, width),
              "bo": (width,)}
    params = {k: (0.5 * rng.normal(size=s)).astype(dtype) for k, s in shapes.items()}
    x = rng.normal(size=(batch, time, width)).astype(dtype)
    return params, x, rng.normal(size=(batch, time, width)).astype(dtype)


# Padding: batch 0's first two keys and batch 1's last two. With causal=True, batch 0's
# queries 0 and 1 see no valid key at all.
VALID = np.ones((BATCH, TIME), bool)
VALID[0, :2] = False
VALID[1, -2:] = False


def unmasked(result):
    """The manual ``(dparams, dx)`` of a masked input, whose dx is ``(dx, None)``, as autodiff's."""
    dparams, (dx, no_grad) = result
    assert no_grad is None
    return dparams, dx


def finite_part(case):
    """What must be finite: y and both gradients (not the residual lse, +inf for a row that
    sees no valid key)."""
    return case["y"], case["manual"], case["auto"]


def key_bias(dparams, width=C):
    """The gradient of the keys' bias, the middle third of ``bqkv``'s."""
    return np.asarray(dparams["bqkv"])[width:2 * width]


CASES = [(mb, causal) for mb in MODES for causal in (True, False)]


@pytest.mark.parametrize("mode_block, causal", CASES,
                         ids=[f"{mode_id(mb)}-{'causal' if c else 'full'}" for mb, c in CASES])
def test_backward_matches_vjp_float64(mode_block, causal):
    layer = attention(*mode_block, causal=causal)
    params, x, dy = draw_case(np.random.default_rng(0))
    out = manual_and_vjp(layer, params, x, VALID, dy)
    plain, masked = out["plain"], out["masked"]
    assert max_tree_rel_error(plain["manual"], plain["auto"]) <= BOUND
    assert max_tree_rel_error(unmasked(masked["manual"]), masked["auto"]) <= BOUND
    for case in (plain, masked):
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(finite_part(case)))
        # A bias added to every key adds a constant to each row of S: softmax ignores it, so
        # the key bias's true gradient is 0 (rounding noise only), masked or not.
        dparams = case["manual"][0]
        assert np.abs(key_bias(dparams)).max() <= 1e-12 * np.abs(dparams["bqkv"]).max()
    if mode_block[0] == "standard":
        # The softmax is far from uniform: query T−1 sees all T keys (unmasked), and in every
        # head and sample its largest probability is more than 3 times its smallest.
        last = np.asarray(plain["residuals"].P)[..., -1, :]
        assert np.all(last.max(axis=-1) > 3 * last.min(axis=-1)), last


@pytest.mark.parametrize("mode_block, causal", [c for c in CASES if c[0][0] == "lean"],
                         ids=[f"{mode_id(mb)}-{'causal' if c else 'full'}"
                              for mb, c in CASES if mb[0] == "lean"])
def test_lean_equals_standard(mode_block, causal):
    """The same outputs (O by the online softmax, block by block), and gradients within 1e-12
    (P recomputed blockwise from lse); lse is log Σ exp(S) over the allowed keys, by NumPy
    (+inf for a row that sees no valid key).

    (The programs of test_backward_matches_vjp_float64, for the same inputs.)
    """
    layer = attention(*mode_block, causal=causal)
    params, x, dy = draw_case(np.random.default_rng(0))
    lean, standard = (manual_and_vjp(a, params, x, VALID, dy)
                      for a in (layer, standard_twin(layer)))
    for name in ("plain", "masked"):
        assert rel_error(lean[name]["y"], standard[name]["y"]) <= TWINS
        assert rel_error(lean[name]["residuals"].O, standard[name]["residuals"].O) <= TWINS
        assert max_tree_rel_error(lean[name]["manual"], standard[name]["manual"]) <= TWINS
    r = lean["masked"]["residuals"]
    S = np.asarray(r.q) @ np.swapaxes(np.asarray(r.k), -1, -2) / np.sqrt(C // HEADS)
    allowed = np.broadcast_to(VALID[:, None, None, :], S.shape)
    if causal:
        allowed = allowed & np.tril(np.ones((TIME, TIME), bool))
    seen = allowed.any(axis=-1)
    with np.errstate(divide="ignore"):
        want = np.log(np.where(allowed, np.exp(S), 0).sum(axis=-1))
    lse = np.asarray(r.lse)
    assert rel_error(lse[seen], want[seen]) <= TWINS
    assert np.all(lse[~seen] == np.inf) and (np.any(~seen) == causal)


@pytest.mark.parametrize("mode_block", [("standard", 64), ("lean", 3)], ids=mode_id)
def test_backward_matches_vjp_float32(mode_block):
    layer = attention(*mode_block)
    params, x, dy = draw_case(np.random.default_rng(32), dtype=np.float32)
    out = manual_and_vjp(layer, params, x, VALID, dy)
    for name, case in out.items():
        assert case["y"].dtype == jnp.float32
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(case["manual"]))
        mine = case["manual"] if name == "plain" else unmasked(case["manual"])
        assert max_tree_rel_error(mine, case["auto"]) <= BOUND32


@pytest.mark.parametrize("mode_block", [("standard", 64), ("lean", 3)], ids=mode_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rows_without_a_valid_key_give_bo_and_finite_gradients(mode_block, causal):
    """A query that sees no valid key has P = 0: its output is ``bo`` exactly, and nothing is
    NaN, in the manual backward or in autodiff of the forward.

    causal: batch 0's keys 0 and 1 are padding, so its queries 0 and 1 see none; those
    positions are invalid keys and queries that see nothing, so their dx is exactly 0.
    Not causal: all of sample 1 is padding, so every one of its queries sees nothing.
    """
    layer = attention(*mode_block, causal=causal)
    params, x, dy = draw_case(np.random.default_rng(0))
    valid = VALID.copy()
    if not causal:
        valid[1] = False
    out = manual_and_vjp(layer, params, x, valid, dy)["masked"]
    y, (dparams, (dx, _)) = np.asarray(out["y"]), out["manual"]
    empty = (0, slice(0, 2)) if causal else (1, slice(None))
    np.testing.assert_array_equal(y[empty], np.broadcast_to(params["bo"], y[empty].shape))
    np.testing.assert_array_equal(np.asarray(dx)[empty], 0)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(finite_part(out)))
    assert max_tree_rel_error((dparams, dx), out["auto"]) <= BOUND
    assert np.abs(np.asarray(dx)).max() > 0.1


@pytest.mark.parametrize("mode_block", [("standard", 64), ("lean", 3)], ids=mode_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_causal_mask_is_exact(mode_block, causal):
    """Perturbing token t changes no output before t, to the bit, when causal (lean: through
    the online softmax's rescaling too); it changes every output from t on, and (not causal)
    every output before t too."""
    layer = attention(*mode_block, causal=causal)
    params, x, dy = draw_case(np.random.default_rng(0))
    t = 3
    moved = x.copy()
    moved[:, t] += np.random.default_rng(1).normal(size=(BATCH, C))
    y0, y1 = (np.asarray(manual_and_vjp(layer, params, a, VALID, dy)["plain"]["y"])
              for a in (x, moved))
    changed = np.any(y0 != y1, axis=-1)  # (batch, time)
    assert np.all(changed[:, t:])
    if causal:
        np.testing.assert_array_equal(y1[:, :t], y0[:, :t])
    else:
        assert np.all(changed[:, :t])


# ---------------------------------------------------------------------------- memory
def _time_by_time(shapes, time):
    return [s for s in shapes if len(s) >= 2 and s[-2:] == (time, time)]


def _jaxpr_shapes(jaxpr):
    """The shape of every variable of ``jaxpr`` and of the jaxprs inside it (scan's body)."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(var.aval.shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _jaxpr_shapes(inner)


def test_lean_holds_no_time_by_time_array():
    """T = 16: the standard residuals hold P (batch, heads, T, T); no lean residual has two
    trailing axes T, and nor does any array of its forward or backward with block_size 4
    (tracing only).
    """
    time = 16
    params, x, dy = draw_case(np.random.default_rng(0), time=time)
    valid = np.ones((BATCH, time), bool)
    shapes = {}
    for mode in ("standard", "lean"):
        layer = attention(mode, 4)
        residuals = jax.eval_shape(functools.partial(forward, layer), params, (x, valid))[1]
        jaxpr = jax.make_jaxpr(functools.partial(forward, layer))(params, (x, valid)).jaxpr
        shapes[mode, "forward"] = list(_jaxpr_shapes(jaxpr))
        shapes[mode] = {f: tuple(s.shape) for f, s in residuals._asdict().items()}
        jaxpr = jax.make_jaxpr(layer.backward)(params, residuals, dy).jaxpr
        shapes[mode, "backward"] = list(_jaxpr_shapes(jaxpr))
    assert shapes["standard"]["P"] == (BATCH, HEADS, time, time)
    assert _time_by_time(shapes["standard", "forward"], time)  # (the check can see one)
    assert _time_by_time(shapes["standard", "backward"], time)
    assert shapes["lean"]["lse"] == (BATCH, HEADS, time)
    assert not _time_by_time(shapes["lean"].values(), time), shapes["lean"]
    assert not _time_by_time(shapes["lean", "forward"], time)
    assert not _time_by_time(shapes["lean", "backward"], time)


# ----------------------------------------------------------------------------- PyTorch
@pytest.mark.parametrize("mode_block", [("standard", 64), ("lean", 3)], ids=mode_id)
def test_matches_pytorch(mode_block):
    """Outputs and every gradient equal PyTorch's for the same weights and input.

    q, k, v = split(x Wqkv + bqkv), each (B, T, H, d) → (B, H, T, d); PyTorch's
    ``scaled_dot_product_attention(q, k, v, is_causal=True)``; heads merged back; · Wo + bo.
    The loss is a random linear functional of the output, Σ G ⊙ y.
    """
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    params, x, G = draw_case(np.random.default_rng(0))
    out = manual_and_vjp(attention(*mode_block), params, x, VALID, G)["plain"]

    t = {k: torch.tensor(v, requires_grad=True) for k, v in {**params, "x": x}.items()}
    q, k, v = (t["x"] @ t["Wqkv"] + t["bqkv"]).split(C, dim=-1)

    def heads(a):
        return a.reshape(BATCH, TIME, HEADS, C // HEADS).transpose(1, 2)

    O = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    y = O.transpose(1, 2).reshape(BATCH, TIME, C) @ t["Wo"] + t["bo"]
    (y * torch.tensor(G)).sum().backward()

    assert rel_error(out["y"], y.detach().numpy()) <= 1e-12
    dparams, dx = out["manual"]
    assert rel_error(dx, t["x"].grad.numpy()) <= 1e-12
    assert sorted(dparams) == sorted(params)
    assert max_tree_rel_error(dparams, {k: t[k].grad.numpy() for k in params}) <= 1e-12


# ------------------------------------------------------------------------------ errors
_PARAMS = {k: np.zeros(s) for k, s in {"Wqkv": (8, 24), "bqkv": (24,), "Wo": (8, 8),
                                       "bo": (8,)}.items()}
_X = np.zeros((2, 5, 8))
_INPUT = r"input x must be floating-point \(batch, time, C\) with C a multiple of num_heads 2; "
_MASK = r"the padding mask must be a bool array \(2, 5\) \(True: a valid key\); got "
ERRORS = [
    ("C not a multiple", np.zeros((2, 5, 7)),
     rf"^MultiHeadAttention: {_INPUT}got shape \(2, 5, 7\) of float64$"),
    ("rank 2", np.zeros((2, 8)), rf"^MultiHeadAttention: {_INPUT}got shape \(2, 8\) of float64$"),
    ("integer x", np.zeros((2, 5, 8), np.int32),
     rf"^MultiHeadAttention: {_INPUT}got shape \(2, 5, 8\) of int32$"),
    ("mask shape", (_X, np.ones((2, 4), bool)), rf"^MultiHeadAttention: {_MASK}bool \(2, 4\)$"),
    ("mask not bool", (_X, np.ones((2, 5), np.int32)),
     rf"^MultiHeadAttention: {_MASK}int32 \(2, 5\)$"),
    ("mask per query", (_X, np.ones((2, 5, 5), bool)),
     rf"^MultiHeadAttention: {_MASK}bool \(2, 5, 5\)$"),
]


@pytest.mark.parametrize("x, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_is_a_clear_error(x, match):
    with pytest.raises(ValueError, match=match):
        layers.MultiHeadAttention(2).check(_PARAMS, {}, x, CTX)


def test_bad_params_are_a_clear_error():
    params = {**_PARAMS, "Wqkv": np.zeros((8, 16))}
    with pytest.raises(ValueError, match=r"^MultiHeadAttention: params\['Wqkv'\] must have shape "
                                         r"\(C, 3C\) = \(8, 24\); got \(8, 16\)$"):
        layers.MultiHeadAttention(2).check(params, {}, _X, CTX)


@pytest.mark.parametrize("make, match", [
    (lambda: layers.MultiHeadAttention(0),
     r"^MultiHeadAttention: num_heads must be a positive int; got 0$"),
    (lambda: layers.MultiHeadAttention(2, backward="flash"),
     r"^MultiHeadAttention: backward must be one of \('standard', 'lean'\); got 'flash'$"),
    (lambda: layers.MultiHeadAttention(2, backward="lean", block_size=0),
     r"^MultiHeadAttention: block_size must be a positive int; got 0$"),
    (lambda: layers.MultiHeadAttention(2, block_size=2.5),
     r"^MultiHeadAttention: block_size must be a positive int; got 2.5$"),
    (lambda: layers.MultiHeadAttention(2).init(jax.random.key(0), (5, 7)),
     r"^MultiHeadAttention: input_shape must be \(time, C\) with C a multiple of num_heads 2; "
     r"got \(5, 7\)$"),
    (lambda: layers.MultiHeadAttention(2).init(jax.random.key(0), (8,)),
     r"^MultiHeadAttention: input_shape must be \(time, C\) with C a multiple of num_heads 2; "
     r"got \(8,\)$"),
], ids=["heads-0", "backward-flash", "block-0", "block-float", "init-C-7", "init-rank-1"])
def test_bad_constructor_arguments_and_shapes(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_errors_in_a_model_name_the_layer():
    net = Sequential([layers.Dense(8), layers.MultiHeadAttention(2), layers.Dense(3)],
                     loss=losses.SoftmaxCrossEntropy())
    params = random_params(net, (5, 4), np.random.default_rng(0))
    # (batch, features) passes the Dense, not the attention.
    with pytest.raises(ValueError, match=rf"^layers\[1\] MultiHeadAttention: {_INPUT}got shape "
                                         r"\(2, 8\) of float64"):
        net.forward(params, np.zeros((2, 4)))
    odd = Sequential([layers.Dense(7), layers.MultiHeadAttention(2), layers.Dense(3)],
                     loss=losses.SoftmaxCrossEntropy())
    with pytest.raises(ValueError, match=r"^layers\[1\] MultiHeadAttention: input_shape must be "
                                         r"\(time, C\) with C a multiple of num_heads 2; got "
                                         r"\(5, 7\)"):
        jax.eval_shape(lambda k: odd.init(k, (5, 4)), jax.random.key(0))


# ------------------------------------------------------------------------ random shapes
@functools.partial(jax.jit, static_argnums=0, compiler_options=RUN_ONCE)
def masked_manual_and_vjp(layer, params, x, valid, dy):
    """``(manual (dparams, dx), autodiff (dparams, dx))`` for the input ``(x, valid)``, in one
    program (one per random shape: smaller than ``manual`` and ``autodiff`` together)."""
    _, residuals = forward(layer, params, (x, valid))
    _, pullback = jax.vjp(lambda p, a: forward(layer, p, (a, valid))[0], params, x)
    return unmasked(layer.backward(params, residuals, dy)), pullback(dy)


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 3),
    time=st.integers(1, 7),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    causal=st.booleans(),
    mode=st.sampled_from(["standard", "lean"]),
    block_size=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_vjp(batch, time, heads, head_dim, causal, mode, block_size, seed):
    """With a random padding mask (all valid, or rows that see no valid key, at times)."""
    layer = attention(mode, block_size, causal=causal, heads=heads)
    rng = np.random.default_rng(seed)
    params, x, dy = draw_case(rng, batch, time, heads * head_dim)
    valid = rng.random(size=(batch, time)) < 0.7
    mine, auto = masked_manual_and_vjp(layer, params, x, valid, dy)
    assert max_tree_rel_error(mine, auto) <= BOUND


# ---------------------------------------------------------------------------- networks
@functools.partial(jax.jit, static_argnums=0, compiler_options=MODEL_OPTIONS)
def model_manual_and_grad(net, params, x, y):
    """``(J, manual grads, autodiff J, autodiff grads)``, compiled as one program."""
    J, manual = net.manual_value_and_grad(params, x, y)
    J_auto, auto = jax.value_and_grad(net.loss)(params, x, y)
    return J, manual, J_auto, auto


def attention_model(mode, block):
    """Dense(8) → MultiHeadAttention(2) → Dense(5), softmax cross-entropy on (batch, T) labels."""
    return Sequential([layers.Dense(C), attention(mode, block), layers.Dense(5)],
                      loss=losses.SoftmaxCrossEntropy())


def model_data(net, seed, features=3):
    """NumPy params (helpers.random_params), x (batch, T, features), labels (batch, T)."""
    rng = np.random.default_rng(seed)
    params = random_params(net, (TIME, features), rng)
    x = rng.normal(size=(BATCH, TIME, features))
    return params, x, rng.integers(0, 5, size=(BATCH, TIME))


@pytest.mark.parametrize("mode_block", [("standard", 64), ("lean", 3)], ids=mode_id)
def test_model_manual_backward_matches_jax_grad(mode_block):
    net = attention_model(*mode_block)
    params, x, labels = model_data(net, seed=1)
    J, mine, J_auto, auto = model_manual_and_grad(net, params, x, labels)
    assert max_tree_rel_error(mine, auto) <= BOUND
    assert abs(J - J_auto) <= 1e-13 * abs(J_auto)


def test_gradcheck_passes_on_an_attention_model():
    """The lean backward (the standard one is gradchecked by test_mutations' unmutated cases)."""
    net = attention_model("lean", 3)
    params, x, labels = model_data(net, seed=2)
    report = gradcheck(net, params, x, labels)
    assert report.ok, str(report)
    assert {r.path for r in report.params} == {
        "layers[0].W", "layers[0].b", "layers[1].Wqkv", "layers[1].bqkv", "layers[1].Wo",
        "layers[1].bo", "layers[2].W", "layers[2].b"}
    assert [r.path for r in report.signals] == ["loss.dy_hat", "layers[2].dx", "layers[1].dx",
                                                "layers[0].dx"]


@pytest.mark.parametrize("tied, backward", [(False, "lean"), (True, "standard")])
def test_gpt_manual_backward_equals_jax_grad(tied, backward):
    from jaxbp import models

    net = models.gpt(9, context=8, d_model=8, num_heads=2, num_layers=2, tied=tied,
                     backward=backward, weight_decay=1e-3)
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda p: p + 0.2 * rng.standard_normal(p.shape),
                          net.init(jax.random.key(0), (6,), jnp.float64))
    x, y = (jnp.asarray(rng.integers(0, 9, (3, 6))) for _ in range(2))
    manual = net.manual_backward(params, x, y)
    assert max_tree_rel_error(manual, jax.grad(net.loss)(params, x, y)) < 1e-10
    if tied:  # the table's gradient sums the lookup's and the head's
        assert manual[0]["W"].shape == (9, 8) and sorted(manual[0]) == ["W", "body"]
