"""check_vjp / check_custom_vjp: right backwards pass, planted bugs fail on exactly their rows."""

import functools
import html
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import check_custom_vjp, check_vjp, gradcheck, layers

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 3))
W = RNG.normal(size=(3, 3))  # square, so a missing transpose still has the right shape
PARAMS = {"W": RNG.normal(size=(3, 5)), "b": RNG.normal(size=5)}


def tanh_matmul(x, W):
    return jnp.tanh(x @ W)


def tanh_matmul_backward(dy, x, W, *, transpose=True, derivative=True, factor=1.0):
    """dz = dy ⊙ (1 − y²), dx = dz Wᵀ, dW = xᵀ dz; the keywords plant bugs."""
    dz = dy * (1 - tanh_matmul(x, W) ** 2) if derivative else dy
    return dz @ (W.T if transpose else W), factor * (x.T @ dz)


def dense_tanh(params, x):
    return {"h": jnp.tanh(x @ params["W"] + params["b"][None]), "s": jnp.sum(x**2)}


def dense_tanh_backward(dy, params, x):
    dz = dy["h"] * (1 - dense_tanh(params, x)["h"] ** 2)
    dx = dz @ params["W"].T + 2 * dy["s"] * x
    return {"W": x.T @ dz, "b": jnp.sum(dz, axis=0)}, dx


def failing(report):
    return [r.path for r in report.failures]


# ------------------------------------------------------------------ right and wrong
def test_correct_backward_passes_with_named_rows():
    report = check_vjp(tanh_matmul, tanh_matmul_backward, X, W)
    assert report.ok and report.first_divergence is None and report.dtype == "float64"
    assert [r.path for r in report.rows] == ["x", "W"] and report.signals == ()
    for r in report.rows:
        assert r.rel_err < 1e-12 and r.fd_coords == 9 + 3 * (r.path == "x")
    assert "check_vjp: f=tanh_matmul backward=tanh_matmul_backward" in str(report)


@pytest.mark.parametrize(
    "bug, wrong",
    [({"transpose": False}, ["x"]), ({"derivative": False}, ["x", "W"]),
     ({"factor": 2.0}, ["W"])],  # fmt: skip
)
def test_planted_bugs_fail_exactly_their_rows(bug, wrong):
    report = check_vjp(tanh_matmul, functools.partial(tanh_matmul_backward, **bug), X, W)
    assert not report.ok and failing(report) == wrong and report.first_divergence == "backward"
    assert "backward=partial(tanh_matmul_backward)" in report.title
    for path in wrong:
        assert "finite differences side with autodiff" in report.row(path).detail


def test_dict_arguments_and_dict_output():
    report = check_vjp(dense_tanh, dense_tanh_backward, PARAMS, X)
    assert report.ok and [r.path for r in report.rows] == ["params['W']", "params['b']", "x"]
    assert report.row("params['b']").shape == (5,)


def test_positional_names_without_a_signature():
    report = check_vjp(lambda *a: dense_tanh(*a), dense_tanh_backward, PARAMS, X)
    assert [r.path for r in report.rows] == ["args[0]['W']", "args[0]['b']", "args[1]"]


def test_given_dy_is_used():
    dy = {"h": np.ones((4, 5)), "s": np.array(0.0)}
    report = check_vjp(dense_tanh, dense_tanh_backward, PARAMS, X, dy=dy)
    assert report.ok
    assert report.loss == pytest.approx(float(jnp.sum(dense_tanh(PARAMS, X)["h"])), rel=1e-12)


# ------------------------------------------------------------------ refused before comparing
def test_wrong_number_of_cotangents():
    msg = ("check_vjp: backward must return a tuple of 2 cotangent(s), one per argument (x, W); "
           "got 1")
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_vjp(tanh_matmul, lambda dy, x, W: (x,), X, W)
    with pytest.raises(ValueError, match=r"must return a tuple of 1 cotangent\(s\), one per "
                       r"argument \(x\); got a "):
        check_vjp(lambda x: x * x, lambda dy, x: 2 * x * dy, jnp.ones(3))


def test_wrong_structure():
    def backward(dy, params, x):
        dparams, dx = dense_tanh_backward(dy, params, x)
        return {"W": dparams["W"]}, dx

    with pytest.raises(ValueError, match=r"backward returned a cotangent of structure .* for "
                       r"params of structure .*Dict key mismatch"):
        check_vjp(dense_tanh, backward, PARAMS, X)


def test_wrong_shape_names_the_leaf_and_both_shapes():
    def backward(dy, params, x):
        dparams, dx = dense_tanh_backward(dy, params, x)
        return {**dparams, "W": dparams["W"].T}, dx

    msg = ("check_vjp: backward returned a cotangent of shape (5, 3) for args[0]['W'] of shape "
           "(3, 5)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_vjp(lambda *a: dense_tanh(*a), backward, PARAMS, X)

    def unsummed(dy, params, x):
        dparams, dx = dense_tanh_backward(dy, params, x)
        return {**dparams, "b": dy["h"] * (1 - dense_tanh(params, x)["h"] ** 2)}, dx

    msg = "backward returned a cotangent of shape (4, 5) for params['b'] of shape (5,)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_vjp(dense_tanh, unsummed, PARAMS, X)


def test_none_for_a_float_argument():
    with pytest.raises(ValueError, match=r"backward returned NoneType for W of shape \(3, 3\)"):
        check_vjp(tanh_matmul, lambda dy, x, W: (tanh_matmul_backward(dy, x, W)[0], None), X, W)


def test_backward_that_raises_is_chained():
    def backward(dy, x, W):
        raise KeyError("W")

    with pytest.raises(ValueError, match="check_vjp: backward raised KeyError: 'W'") as info:
        check_vjp(tanh_matmul, backward, X, W)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "f, what",
    [(lambda x: "y", "out is str"), (lambda x: None, "got None"),
     (lambda x: (x, jnp.argmax(x)), r"out\[1\] is dtype int")],  # fmt: skip
)
def test_output_must_be_floating_arrays(f, what):
    with pytest.raises(ValueError, match=f"check_vjp: f must return an array or a pytree of "
                                         f"floating-point arrays; .*{what}"):
        check_vjp(f, lambda dy, x: (dy,), jnp.ones(3))


def test_argument_and_option_errors():
    with pytest.raises(ValueError, match="check_vjp: give the arguments"):
        check_vjp(tanh_matmul, tanh_matmul_backward)
    with pytest.raises(ValueError, match="check_vjp: backward must be a function"):
        check_vjp(tanh_matmul, None, X, W)
    with pytest.raises(ValueError, match="check_vjp: argument x must be an array of real"):
        check_vjp(lambda x: x, lambda dy, x: (dy,), np.array(["a"]))
    nan = W.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"check_vjp: argument W has 1 non-finite value\(s\)"):
        check_vjp(tanh_matmul, tanh_matmul_backward, X, nan)
    with pytest.raises(ValueError, match="check_vjp: dtype must be float64 or float32; got 'x'"):
        check_vjp(tanh_matmul, tanh_matmul_backward, X, W, dtype="x")
    with pytest.raises(ValueError, match=r"check_vjp: dy\['h'\] must have the shape of f's "
                                         r"output out\['h'\] \(4, 5\); got \(5,\)"):
        check_vjp(dense_tanh, dense_tanh_backward, PARAMS, X, dy={"h": np.ones(5), "s": 1.0})


# ------------------------------------------------------------------ integer arguments
def test_integer_arguments_have_no_rows():
    def embed(E, ids):
        return E[ids]

    def embed_backward(dy, E, ids):
        return jnp.zeros_like(E).at[ids].add(dy), None

    E, ids = RNG.normal(size=(5, 3)), np.array([0, 3, 3, 1])
    report = check_vjp(embed, embed_backward, E, ids)
    assert report.ok and [r.path for r in report.rows] == ["E"]
    assert any("no row: ids" in n for n in report.notes)
    with pytest.raises(ValueError, match="check_vjp: no argument of f has floating-point"):
        check_vjp(lambda ids: ids * 1.0, lambda dy, ids: (None,), ids)


def test_integer_leaf_inside_a_dict():
    def scale(p):
        return p["w"] * p["n"]

    report = check_vjp(scale, lambda dy, p: ({"w": dy * p["n"], "n": None},),
                       {"w": np.arange(3.0), "n": np.array(2)})
    assert report.ok and [r.path for r in report.rows] == ["p['w']"]


# ------------------------------------------------------------------ custom_vjp
def custom_tanh_matmul(factor=1.0):
    @jax.custom_vjp
    def f(x, W):
        return jnp.tanh(x @ W)

    def fwd(x, W):
        return f(x, W), (x, W)

    def bwd(saved, dy):
        x, W = saved
        return tanh_matmul_backward(dy, x, W, factor=factor)

    f.defvjp(fwd, bwd)
    return f


def test_custom_vjp_right_and_wrong_rule():
    right = check_custom_vjp(custom_tanh_matmul(), X, W)
    assert right.ok and [r.path for r in right.rows] == ["x", "W"]
    assert "check_custom_vjp: fn=f" in str(right)
    wrong = check_custom_vjp(custom_tanh_matmul(factor=2.0), X, W)
    assert not wrong.ok and failing(wrong) == ["W"]
    assert wrong.first_divergence == "the custom_vjp rule"


def test_custom_vjp_nondiff_argnums_are_held_fixed():
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def act(g, x):
        return g(x)

    def bwd(g, x, dy):
        return (jax.vjp(g, x)[1](dy)[0],)

    act.defvjp(lambda g, x: (g(x), x), bwd)
    report = check_custom_vjp(act, jnp.sin, X)
    assert report.ok and [r.path for r in report.rows] == ["x"]
    assert any("nondiff_argnums: g held fixed" in n for n in report.notes)


def test_custom_vjp_refuses_other_functions():
    msg = ("check_custom_vjp: fn must be a jax.custom_vjp function; got tanh_matmul (function); "
           "for a function and a hand-written backward use jaxbp.check_vjp(f, backward, *args)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_custom_vjp(tanh_matmul, X, W)
    undefined = jax.custom_vjp(tanh_matmul)
    with pytest.raises(ValueError, match=r"tanh_matmul has no rule to check; define it with "
                                         r"tanh_matmul.defvjp\(fwd, bwd\)"):
        check_custom_vjp(undefined, X, W)


def test_custom_rule_that_raises():
    f = jax.custom_vjp(tanh_matmul)
    f.defvjp(lambda x, W: (f(x, W), (x, W)), lambda saved, dy: (saved[0].T, saved[1]))
    with pytest.raises(ValueError, match="check_custom_vjp: the custom_vjp rule of tanh_matmul "
                                         "raised ValueError: Custom VJP bwd rule"):
        check_custom_vjp(f, X, W)


# ------------------------------------------------------------------ float32, HTML, gradcheck
def test_float32_with_looser_tolerance():
    with pytest.warns(UserWarning, match="float32 check"):
        right = check_vjp(tanh_matmul, tanh_matmul_backward, X, W, dtype="float32")
        wrong = check_vjp(tanh_matmul, functools.partial(tanh_matmul_backward, factor=2.0), X, W,
                          dtype="float32")
    assert right.ok and right.dtype == "float32" and "float32" in right.precision
    assert 0 < max(r.rel_err for r in right.rows) < 1e-4
    assert failing(wrong) == ["W"]


def test_html_holds_the_rows_and_the_verdict():
    report = check_vjp(dense_tanh, dense_tanh_backward, PARAMS, X)
    page = report._repr_html_()
    assert page.startswith("<div>") and "check_vjp: f=dense_tanh" in page
    for r in report.rows:
        assert re.search(rf"<td[^>]*>{re.escape(html.escape(r.path))}</td>", page)
    assert "OK: the manual backward matches autodiff" in page


@pytest.mark.parametrize("thing, name", [(layers.Dense(3), "Dense"), (tanh_matmul, "function")])
def test_gradcheck_refuses_what_is_not_a_model(thing, name):
    msg = ("gradcheck checks a model (jaxbp.Sequential(layers, loss=...)); for one layer use "
           "jaxbp.check_layer(layer, input_shape)")
    with pytest.raises(ValueError, match=re.escape(msg) + f".*got {name}$"):
        gradcheck(thing, [], X, np.zeros(4))
