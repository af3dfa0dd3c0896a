"""gradcheck / check_layer: the report's content, formats, precision handling, kinks and CLI."""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import Sequential, check_layer, cli, gradcheck, layers, losses, models
from jaxbp import gradcheck_cli as gradcheck_cli
from jaxbp.gradcheck import fd_coordinates, finite_differences
from jaxbp.gradcheck_report import GradcheckError, GradReport
from tests.mutations import (
    BatchNormEvalBackwardAlways,
    BatchNormVarianceTermDropped,
    DenseBiasNotSummed,
    DropoutNotRescaled,
    ResidualSkipGradientDropped,
    _residual_mlp,
    _tanh3,
    _worked_example,
    replace_at,
    replace_layer,
    running_state,
    sequence_blocks,
)


@pytest.fixture(scope="module")
def worked():
    return gradcheck(*_worked_example())


@pytest.fixture(scope="module")
def broken():
    net, params, x, y = _tanh3()
    return gradcheck(replace_layer(net, 4, DenseBiasNotSummed(2)), params, x, y)


def test_worked_example_rows_paths_and_order(worked):
    assert worked.ok and worked.first_divergence is None and worked.dtype == "float64"
    assert [r.path for r in worked.params] == [
        "layers[0].W", "layers[0].b", "layers[2].W", "layers[2].b"]  # fmt: skip
    assert [r.path for r in worked.signals] == [
        "loss.dy_hat", "layers[3].dx", "layers[2].dx", "layers[1].dx", "layers[0].dx"]  # fmt: skip
    assert worked.loss == pytest.approx(0.298371109, abs=1e-9)  # tutorial 004's E_total
    for r in worked.rows:
        assert r.status == "ok" and r.rel_err <= 1e-12 and r.cosine == pytest.approx(1.0)
    w = worked.row("layers[2].W")
    assert w.shape == (2, 2) and w.fd_coords == 4 and w.fd_rel_err < 1e-7
    assert worked.row("layers[0].dx").fd_rel_err is None  # signals: no finite differences


def test_text_table_is_aligned_and_says_precision(worked):
    text = str(worked)
    assert "float64 (jax_enable_x64 " in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name"))
    table = [line for line in lines[header:] if line.startswith(("name", "layers[", "loss."))]
    table = [line for line in table if not re.match(r"\S+: ", line)]  # drop detail lines
    assert len(table) == 1 + 4 + 5
    for column in ("shape", "|manual|", "cosine", "status"):
        at = lines[header].index(column)
        assert all(line[at - 2 : at] == "  " and line[at] != " " for line in table), column
    assert lines[-1].startswith("OK: ")


def test_failing_report_names_leaf_in_text_html_and_verdict(broken):
    assert not broken.ok
    assert [r.path for r in broken.failures] == ["layers[4].b"]
    assert broken.row("layers[4].b").detail.startswith("manual ≠ autodiff")
    text = str(broken)
    assert "FAIL: first divergence from the output: layers[4] (DenseBiasNotSummed)" in text
    assert re.search(r"^layers\[4\]\.b .* FAIL$", text, re.M)
    html = broken._repr_html_()
    # header, rows, signals heading, one line below the failing row with its detail
    assert html.count("<tr") == 1 + len(broken.rows) + 1 + 1
    assert re.search(r'<tr style="color:#b00020[^>]*><td[^>]*>layers\[4\]\.b</td>', html)
    assert "&#8627; manual ≠ autodiff (rel err" in html
    assert "first divergence from the output" in html


def test_raise_if_failed(worked, broken):
    assert worked.raise_if_failed() is worked
    with pytest.raises(GradcheckError, match=r"(?s)gradient check failed.*layers\[4\]\.b"):
        broken.raise_if_failed()
    assert issubclass(GradcheckError, AssertionError)


def test_dict_and_json_round_trip(worked, broken):
    for report in (worked, broken):
        d = json.loads(report.to_json())
        assert d["ok"] is report.ok and d == report.to_dict()
        assert GradReport.from_dict(d) == report
    assert d["first_divergence"] == "layers[4] (DenseBiasNotSummed)"
    assert d["params"][0]["shape"] == [3, 3]


def test_x64_enabled_for_the_check_only_and_restored():
    with jax.enable_x64(False):
        net, params, x, y = models.worked_example()  # float32 arrays
        report = gradcheck(net, params, x, y)
        assert jax.config.jax_enable_x64 is False
    assert "enabled for this check only; previous setting restored" in report.precision
    assert report.dtype == "float64" and report.ok
    # float32 finite differences could not get within 1e-7 of the gradient
    assert max(r.fd_rel_err for r in report.params) < 1e-7


def test_float32_warns_and_restores_x64():
    net, params, x, y = _worked_example()
    with pytest.warns(UserWarning, match="finite differences are unreliable in float32"):
        report = gradcheck(net, params, x, y, dtype="float32")
    assert jax.config.jax_enable_x64 is True
    assert report.dtype == "float32" and report.ok
    assert "disabled for this check only" in report.precision
    assert any("unreliable" in n for n in report.notes)


def test_bad_dtype():
    with pytest.raises(
        ValueError, match="gradcheck: dtype must be float64 or float32; got 'int32'"
    ):
        gradcheck(*_worked_example(), dtype="int32")
    with pytest.raises(ValueError, match="gradcheck: dtype must be float64 or float32; got 'bo"):
        gradcheck(*_worked_example(), dtype="bogus")
    with pytest.raises(ValueError, match="check_layer: dtype must be float64 or float32; got 'x'"):
        check_layer(layers.Dense(3), (4,), dtype="x")
    with pytest.raises(ValueError, match="gradcheck: dtype must be float64 or float32; got None"):
        gradcheck(*_worked_example(), dtype=None)


def test_bad_arguments():
    net, params, x, y = _worked_example()
    with pytest.raises(ValueError, match="gradcheck: fd_max_coords must be an int >= 0; got -1"):
        gradcheck(net, params, x, y, fd_max_coords=-1)
    with pytest.raises(ValueError, match=r"gradcheck: x must have a leading batch axis with at "
                       r"least 1 sample; got shape \(0, 2\)"):
        gradcheck(net, params, x[:0], y[:0])
    with pytest.raises(ValueError, match="check_layer: batch must be a positive int; got 0"):
        check_layer(layers.Dense(3), (4,), batch=0)
    with pytest.raises(ValueError, match=r"check_layer: x must have a leading batch axis .*"
                       r"got shape \(0, 4\)"):
        check_layer(layers.Dense(3), (4,), x=jnp.ones((0, 4)))
    with pytest.raises(ValueError, match=r"check_layer: input_shape must be a sequence of "
                       r"positive ints \(batch axis excluded\); got \(-4,\)"):
        check_layer(layers.Dense(3), (-4,))
    assert check_layer(layers.Dense(3), np.array([4])).ok  # any sequence of ints
    with pytest.raises(ValueError, match=r"check_layer: fd_max_coords must be an int >= 0; "
                       r"got 1.5"):
        check_layer(layers.Dense(3), (4,), fd_max_coords=1.5)


def test_out_of_range_labels_raise_instead_of_failing():
    net = models.mlp(hidden=(3,), classes=3)
    params = net.init(jax.random.key(0), (2,))
    with pytest.raises(ValueError, match=r"loss SoftmaxCrossEntropy: integer labels must lie in "
                       r"\[0, 3\) for 3 classes; got values in \[0, 5\]"):
        gradcheck(net, params, jnp.ones((2, 2)), jnp.array([0, 5]))


def test_fd_coordinates_full_small_seeded_subset_large():
    a, b = fd_coordinates([4, 100], 10, seed=3)
    np.testing.assert_array_equal(a, np.arange(4))
    assert len(set(b)) == 10 and list(b) == sorted(b) and b.max() < 100
    np.testing.assert_array_equal(b, fd_coordinates([4, 100], 10, seed=3)[1])
    assert not np.array_equal(b, fd_coordinates([4, 100], 10, seed=4)[1])
    assert [c.size for c in fd_coordinates([4, 100], 0, seed=0)] == [0, 0]


def test_finite_differences_per_leaf_coordinates():
    theta = [np.array([[0.5, -1.0], [2.0, 0.25]]), np.array([]), np.array([3.0, -0.7])]

    def J(t):
        return np.sum(np.sin(t[0]) * t[0]) + np.sum(t[2] ** 3)

    fd = finite_differences(J, theta, [[0, 3], [], [1]], 1e-5)
    w = theta[0].flat
    expected = [[np.cos(w[i]) * w[i] + np.sin(w[i]) for i in (0, 3)], [], [3 * 0.7**2]]
    assert [len(v) for v in fd] == [2, 0, 1]
    for got, want in zip(fd, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_finite_differences_divide_by_the_step_float32_took():
    # float32 near 1 cannot hold 1 ± 1e-7: the step taken is 2.38e-7, not 2e-7, and the
    # derivative of J = θ₀ + θ₁ (summed in float64) is exactly 1 only when divided by that step
    theta = {"w": np.array([1.0, 2.0], np.float32)}
    fd = finite_differences(lambda t: np.sum(t["w"], dtype=np.float64), theta, [[0]], 1e-7)
    assert fd[0].tolist() == [1.0]
    # a step below the resolution of float32 at θ leaves θ unchanged: NaN, not 0/0 or an error
    fd = finite_differences(lambda t: np.sum(t["w"], dtype=np.float64), theta, [[0, 1]], 1e-9)
    assert np.isnan(fd[0]).all()


def test_coordinates_the_step_cannot_move_are_left_out_not_passed():
    # float32 at 1e6 has a spacing of 0.0625, far above h = ∛ε ≈ 5e-3: θ ± h is θ, so the
    # finite differences are NaN there; the bias (0) still moves and is checked
    layer = layers.Dense(2)
    params = {"W": jnp.full((3, 2), 1e6, jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    with pytest.warns(UserWarning, match="float32 check"):
        report = check_layer(layer, (3,), dtype="float32", params=params)
    assert report.row("W").fd_coords == 0 and report.row("W").fd_rel_err is None
    assert report.row("b").fd_coords == 2 and np.isfinite(report.row("b").fd_rel_err)
    assert report.ok


def test_large_leaf_checks_a_seeded_subset():
    net = models.mlp(hidden=(20,), classes=3)
    params = net.init(jax.random.key(0), (10,))
    x, y = jax.random.normal(jax.random.key(1), (4, 10)), jnp.array([0, 1, 2, 0])
    report = gradcheck(net, params, x, y, fd_max_coords=8)
    assert report.ok
    assert [r.fd_coords for r in report.params] == [8, 8, 8, 3]  # W (10,20), b (20,), W, b (3,)


def test_wrong_shape_is_a_failing_row():
    class DenseBatchBias(layers.Dense):
        def backward(self, params, residuals, dy):
            dparams, dx = super().backward(params, residuals, dy)
            return {**dparams, "b": dy}, dx  # forgot to sum: (batch, out)

    net, params, x, y = _tanh3()
    report = gradcheck(replace_layer(net, 4, DenseBatchBias(2)), params, x, y)
    row = report.row("layers[4].b")
    assert row.status == "FAIL" and row.detail == "manual gradient has shape (4, 2), expected (2,)"


# ------------------------------------------------------------------------------ kinks
def test_relu_at_zero_is_a_kink_not_a_failure():
    """x = 0 and b = 0 put every ReLU input exactly at 0: FD of b straddles the kink."""
    net = Sequential([layers.Dense(3), layers.ReLU(), layers.Dense(2)], losses.HalfSquaredError())
    params = net.init(jax.random.key(0), (2,))
    params[2]["b"] = jnp.array([0.3, -0.2])
    x, y = jnp.zeros((2, 2)), jnp.ones((2, 2))
    report = gradcheck(net, params, x, y)
    assert report.ok, str(report)
    assert report.row("layers[0].b").status == "kink"
    assert "kink" in report.row("layers[0].b").detail and "(1 row(s) at a kink)" in str(report)


def test_hinge_at_the_margin_is_a_kink():
    net = Sequential([layers.Dense(3)], losses.Hinge(margin=0.0))
    params = [{"W": jnp.zeros((2, 3)), "b": jnp.zeros(3)}]  # every score 0: m_j = 0
    report = gradcheck(net, params, jnp.ones((2, 2)), jnp.array([0, 2]))
    assert report.ok and {r.status for r in report.params} == {"kink"}, str(report)


def test_max_pool_ties_are_a_kink():
    report = check_layer(layers.MaxPool2D(2), (4, 4, 1), x=jnp.ones((1, 4, 4, 1)))
    assert report.ok and report.row("dx").status == "kink", str(report)


def test_non_differentiable_forward_fails_in_float64():
    """manual = autodiff, but the forward hides a dependence from autodiff (stop_gradient)."""

    class HiddenScale(layers.Identity):
        def forward(self, params, state, x, ctx):
            return x + jax.lax.stop_gradient(x), state, None  # y = 2x, autodiff sees y' = 1

    net = Sequential([layers.Dense(2), HiddenScale()], losses.HalfSquaredError())
    net, params, x, y = net, net.init(jax.random.key(0), (2,)), jnp.ones((3, 2)), jnp.zeros((3, 2))
    report = gradcheck(net, params, x, y)
    assert not report.ok and report.first_divergence is None
    assert "both disagree with finite differences" in report.row("layers[0].W").detail
    assert "first divergence from the output: finite differences only" in str(report)


# ------------------------------------------------------------------------ check_layer
CHECKED_LAYERS = [
    (layers.Dense(3), (4,)),
    (layers.Dense(3, use_bias=False), (4,)),
    (layers.Identity(), (4,)),
    (layers.Sigmoid(), (4,)),
    (layers.Tanh(), (4,)),
    (layers.ReLU(), (4,)),
    (layers.LeakyReLU(0.1), (4,)),
    (layers.ELU(1.3), (4,)),
    (layers.GELU(approximate=True), (4,)),
    (layers.GELU(approximate=False), (4,)),
    (layers.Softplus(), (4,)),
    (layers.Softmax(), (4,)),
    (layers.Flatten(), (3, 3, 2)),
    (layers.Conv2D(2, 3, padding="SAME"), (5, 5, 2)),
    (layers.Conv2D(2, (3, 2), stride=2, padding=((1, 0), (0, 1))), (6, 5, 1)),
    (layers.MaxPool2D(2), (4, 4, 2)),
    (layers.MaxPool2D(3, stride=2, padding=1), (5, 5, 1)),
    (layers.AvgPool2D(2, padding="SAME"), (5, 5, 2)),
]


@pytest.mark.parametrize(("layer", "shape"), CHECKED_LAYERS, ids=lambda v: repr(v))
def test_check_layer_passes_every_layer(layer, shape):
    report = check_layer(layer, shape, batch=2)
    assert report.ok, str(report)
    params = layer.init(jax.random.key(0), shape)[0]
    assert [r.path for r in report.rows] == [*sorted(params), "dx"]


def test_check_layer_names_the_wrong_leaf():
    report = check_layer(DenseBiasNotSummed(3), (4,), batch=3)
    assert [r.path for r in report.failures] == ["b"]
    assert report.first_divergence.startswith("DenseBiasNotSummed(")


def _block():
    return layers.Residual(layers.Sequential([layers.LayerNorm(), layers.Dense(3), layers.Tanh()]))


KEY = jax.random.key(3)
BN_STATE = {"mean": np.array([0.2, -0.1, 0.4]), "var": np.array([0.5, 1.5, 2.0])}


@pytest.mark.parametrize(("layer", "shape", "mode"), [
    (layers.Dense(3), (2, 4), {}),  # (batch, time, features)
    (layers.LayerNorm(), (2, 4), {}),
    (layers.RMSNorm(), (4,), {}),
    (layers.BatchNorm(), (2, 3), {"train": True}),
    (layers.BatchNorm(), (3,), {"state": BN_STATE}),  # eval: the running statistics
    (layers.Dropout(0.5), (2, 4), {"train": True, "key": KEY}),
    (layers.Dropout(0.5), (4,), {}),  # eval: the identity
], ids=lambda v: repr(v) if isinstance(v, layers.Layer) else None)
def test_check_layer_passes_norms_dropout_and_sequences(layer, shape, mode):
    report = check_layer(layer, shape, batch=3, **mode)
    assert report.ok, str(report)
    assert [r.path for r in report.rows] == [*sorted(layer.init(KEY, shape)[0]), "dx"]


def test_check_layer_passes_combinators_with_nested_row_names():
    report = check_layer(layers.Sequential([layers.Dense(3), _block()]), (2, 4), batch=2)
    assert report.ok, str(report)
    assert [r.path for r in report.rows] == [
        "[0].W", "[0].b", "[1][0].offset", "[1][0].scale", "[1][1].W", "[1][1].b", "dx"]


@pytest.mark.parametrize(("layer", "mode"), [
    (BatchNormVarianceTermDropped(), {"train": True}),
    (BatchNormEvalBackwardAlways(), {"train": True}),
    (DropoutNotRescaled(0.5), {"train": True, "key": KEY}),
    (ResidualSkipGradientDropped(_block().body), {}),
], ids=lambda v: type(v).__name__ if isinstance(v, layers.Layer) else None)
def test_check_layer_flags_the_wrong_dx_of_norms_dropout_and_residuals(layer, mode):
    report = check_layer(layer, (3,), batch=4, **mode)
    assert [r.path for r in report.failures] == ["dx"], str(report)
    assert report.first_divergence.startswith(type(layer).__name__ + "(")


# ----------------------------------------------------------------------- nested networks
def test_nested_rows_and_every_nested_signal_from_the_output_down():
    report = gradcheck(*_residual_mlp())
    assert report.ok, str(report)
    assert [r.path for r in report.params] == [
        "layers[0].W", "layers[0].b", "layers[1].body.layers[0].W", "layers[1].body.layers[0].b",
        "layers[1].body.layers[2].W", "layers[1].body.layers[2].b", "layers[3].W", "layers[3].b"]
    assert [r.path for r in report.signals] == [
        "loss.dy_hat", "layers[3].dx", "layers[2].dx", "layers[1].body.layers[2].dx",
        "layers[1].body.layers[1].dx", "layers[1].body.layers[0].dx", "layers[1].body.dx",
        "layers[1].dx", "layers[0].dx"]
    # the block's body is its Sequential: the same signal at its input as its first layer's
    body, first = report.row("layers[1].body.dx"), report.row("layers[1].body.layers[0].dx")
    assert body.autodiff_norm == pytest.approx(first.autodiff_norm, rel=1e-14)
    # x + body(x): the skip path adds dy, so the block's signal is not its body's
    assert report.row("layers[1].dx").autodiff_norm != pytest.approx(body.autodiff_norm, rel=1e-3)


def test_a_wrong_nested_layer_is_named_by_its_nested_path_in_every_format():
    net, params, x, y = _residual_mlp()
    report = gradcheck(replace_at(net, "layers[1].body.layers[0]", DenseBiasNotSummed(4)),
                       params, x, y)
    assert [r.path for r in report.failures] == ["layers[1].body.layers[0].b"]
    assert report.first_divergence == "layers[1].body.layers[0] (DenseBiasNotSummed)"
    assert "first divergence from the output: layers[1].body.layers[0] (DenseBiasNotSummed)" in (
        str(report))
    assert GradReport.from_dict(json.loads(report.to_json())) == report
    assert re.search(r'<td[^>]*>layers\[1\]\.body\.layers\[0\]\.b</td>', report._repr_html_())
    # the text table names a nested row inside its block, on the line below the block's path
    assert re.search(r"^layers\[1\]\.body\.\n(  .*\n)*  layers\[0\]\.b .* FAIL$", str(report),
                     re.M)


def test_gradcheck_of_state_and_dropout_needs_state_and_key():
    net, params, x, y = sequence_blocks()
    state = running_state(net, x.shape[1:])
    with pytest.raises(ValueError, match=r"^Sequential: this network has state"):
        gradcheck(net, params, x, y, key=KEY, train=True)
    with pytest.raises(ValueError, match=r"^layers\[1\]\.layers\[1\]\.body\.layers\[3\] "
                       r"Dropout: train=True needs a PRNG key"):
        gradcheck(net, params, x, y, state=state, train=True)
    with pytest.raises(ValueError, match=r"^layers\[1\]\.layers\[1\]\.body\.layers\[0\] "
                       r"BatchNorm: train=True needs at least 2 values per channel"):
        gradcheck(net, params, x[:1, :1], y[:1, :1], state=state, key=KEY, train=True)


# -------------------------------------------------------------------------------- CLI
def test_cli_worked_example_exit_0(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "layers[2].W" in out and out.rstrip().splitlines()[-1].startswith("OK: ")


def test_cli_json_mlp(capsys):
    assert cli.main(["gradcheck", "--model", "mlp", "--batch", "3", "--seed", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is True and d["params"][0]["path"] == "layers[0].W"


def test_cli_exit_1_on_failure(capsys, monkeypatch):
    def broken_case(key, batch):
        net, params, x, y = _tanh3()
        return replace_layer(net, 4, DenseBiasNotSummed(2)), params, x, y

    monkeypatch.setitem(gradcheck_cli.PRESETS, "mlp", broken_case)
    assert cli.main(["gradcheck", "--model", "mlp"]) == 1
    assert "FAIL: first divergence from the output: layers[4]" in capsys.readouterr().out


def test_cli_cnn_float32_notes_without_a_raw_warning(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caveat is a note of the report, not a warning
        assert cli.main(["gradcheck", "--model", "cnn", "--dtype", "float32", "--batch", "2"]) == 0
    out, err = capsys.readouterr()
    assert "Conv2D" in out and "unreliable" in out and err == ""
    assert jax.config.jax_enable_x64 is True


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch", "0"], "argument --batch: expected a positive int; got '0'"),
    (["--fd-coords", "-1"], "argument --fd-coords: expected an int ≥ 0; got '-1'"),
    (["--fd-coords", "x"], "argument --fd-coords: expected an int ≥ 0; got 'x'"),
    (["--seed", "-1"], "argument --seed: expected an int in [0, 2**32); got '-1'"),
])  # fmt: skip
def test_cli_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["gradcheck", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"jaxbp gradcheck: error: {message}")


@pytest.mark.parametrize("call, message", [
    (lambda: gradcheck(*models.worked_example(), seed=-1), "gradcheck: seed must be an int >= 0; "
                                                           "got -1"),
    (lambda: check_layer(layers.Dense(3), (4,), seed=-1),
     "check_layer: seed must be an int >= 0; got -1"),
    (lambda: check_layer(layers.Dense(3), (4,), dy=jnp.ones((2, 2))),
     "check_layer: dy must have the shape of Dense's output (3, 3); got (2, 2)"),
    (lambda: finite_differences(lambda t: 0.0, {"w": np.ones(3)}, [[0]], 0.0),
     "finite_differences: step must be a finite number > 0; got 0.0"),
    (lambda: finite_differences(lambda t: 0.0, {"w": np.ones(3)}, [[0, 5]], 1e-3),
     "finite_differences: index[0] must hold flat indices in [0, 3) for leaf 0 of shape (3,); "
     "got values in [0, 5]"),
    (lambda: finite_differences(lambda t: 0.0, {"w": np.ones(3)}, [], 1e-3),
     "finite_differences: index must list the coordinates of each of theta's 1 leaves; got 0"),
])
def test_gradcheck_tools_check_their_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_non_finite_inputs_are_refused_not_blamed_on_the_loss():
    net, params, x, y = models.worked_example()
    with pytest.raises(ValueError, match=re.escape("gradcheck: x has 1 non-finite value(s) (NaN "
                                                   "or ±inf) among its 2")):
        gradcheck(net, params, x.at[0, 1].set(jnp.nan), y)
