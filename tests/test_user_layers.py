"""A layer a user writes works wherever a built-in one does, and its mistakes are named.

``Swish`` (a plain subclass, no params), ``SwishBeta`` (a frozen dataclass) and
``PReLU`` (a learned slope ``alpha``) go through ``Sequential``, ``Residual``,
``check_layer``, ``gradcheck``, ``train.fit`` and a checkpoint. Each way of
breaking the contract gets its own message: at construction for the methods'
signatures and hashability, at trace time for what ``forward`` and ``backward``
raise or return.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import Sequential, check_layer, checkpoint, data, gradcheck, layers, losses, train
from jaxbp.layers.base import LayerError, check_contract, check_params
from jaxbp.network import Model


class SwishResiduals(NamedTuple):
    x: jax.Array  # the input
    s: jax.Array  # σ(βx), the shape of x


def _swish(beta, x):
    s = jax.nn.sigmoid(beta * x)
    return x * s, SwishResiduals(x=x, s=s)


def _swish_dx(beta, residuals, dy):
    """dx = dy ⊙ (σ(βx) + βx σ(βx)(1 − σ(βx)))."""
    x, s = residuals
    return dy * (s + beta * x * s * (1 - s))


class Swish(layers.Layer):
    """``y = x σ(x)``, written as a plain class: hashes by identity."""

    def forward(self, params, state, x, ctx):
        y, residuals = _swish(1.0, x)
        return y, state, residuals

    def backward(self, params, residuals, dy):
        return {}, _swish_dx(1.0, residuals, dy)


@dataclasses.dataclass(frozen=True)
class SwishBeta(layers.Layer):
    """``y = x σ(βx)``, written as the recommended frozen dataclass."""

    beta: float = 1.0

    def forward(self, params, state, x, ctx):
        y, residuals = _swish(self.beta, x)
        return y, state, residuals

    def backward(self, params, residuals, dy):
        return {}, _swish_dx(self.beta, residuals, dy)


class PReLUResiduals(NamedTuple):
    x: jax.Array  # the input, (batch, …, features)


def _per_feature(alpha, x):
    return alpha.reshape((1,) * (x.ndim - 1) + alpha.shape)


@dataclasses.dataclass(frozen=True)
class PReLU(layers.Layer):
    """``y = x`` for x ≥ 0, ``α x`` otherwise, one learned α per feature."""

    start: float = 0.25

    def init(self, key, input_shape, dtype=None):
        alpha = jnp.full(input_shape[-1:], self.start, dtype or jnp.result_type(float))
        return {"alpha": alpha}, {}, tuple(input_shape)

    def check(self, params, state, x, ctx):
        check_params("PReLU", params, {"alpha": ((x.shape[-1],), "(features,)")})

    def forward(self, params, state, x, ctx):
        y = jnp.where(x >= 0, x, _per_feature(params["alpha"], x) * x)
        return y, state, PReLUResiduals(x=x)

    def backward(self, params, residuals, dy):
        """dα = Σ_{batch, …} dy ⊙ min(x, 0); dx = dy where x ≥ 0, α dy elsewhere."""
        x = residuals.x
        lead = tuple(range(x.ndim - 1))
        dalpha = jnp.sum(jnp.where(x >= 0, 0, dy * x), axis=lead)
        return {"alpha": dalpha}, jnp.where(x >= 0, dy, _per_feature(params["alpha"], x) * dy)


def _net(*middle):
    """4 features → Dense(8) → middle → Dense(3), softmax cross-entropy."""
    return Sequential([layers.Dense(8), *middle, layers.Dense(3)],
                      loss=losses.SoftmaxCrossEntropy())


def _batch(features=4):
    x = jax.random.normal(jax.random.key(1), (5, features))
    return x, jnp.array([0, 1, 2, 0, 1])


def _nested():
    body = Sequential([layers.Dense(8), Swish(), layers.Dense(8), SwishBeta(2.0)])
    return _net(PReLU(), layers.Residual(body))


# --------------------------------------------------------------------------- works
def test_repr_of_plain_and_dataclass_layers():
    class Tagged(Swish):
        def __init__(self, tag):
            self.tag, self._private = tag, None

    assert repr(Swish()) == "Swish()"
    assert repr(Tagged("a")) == "Tagged(tag='a')"
    assert repr(SwishBeta(2.0)) == "SwishBeta(beta=2.0)"
    assert repr(_nested().body.layers[2]) == (  # (longer than 80 characters: a layer a line)
        "Residual(Sequential([\n  Dense(units=8, init='lecun_normal', use_bias=True),\n"
        "  Swish(),\n  Dense(units=8, init='lecun_normal', use_bias=True),\n"
        "  SwishBeta(beta=2.0),\n]))")


def test_plain_layers_hash_by_identity_dataclasses_by_value():
    assert Swish() != Swish() and hash(Swish()) is not None
    assert SwishBeta(2.0) == SwishBeta(2.0) and hash(SwishBeta(2.0)) == hash(SwishBeta(2.0))


@pytest.mark.parametrize("layer", [Swish(), SwishBeta(1.5), PReLU()], ids=repr)
def test_check_layer(layer):
    report = check_layer(layer, (2, 4))
    assert report.ok, str(report)


def test_gradcheck_nested_in_residual_and_remat():
    net = _nested()
    params = net.init(jax.random.key(0), (4,))
    x, y = _batch()
    report = gradcheck(net, params, x, y)
    assert report.ok, str(report)
    assert report.row("layers[1].alpha").shape == (8,)
    assert report.row("layers[2].body.layers[3].dx").status == "ok"
    plain, remat = (net.manual_backward(params, x, y, remat_every=k) for k in (None, 2))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_fit_and_checkpoint_round_trip(tmp_path):
    ds = data.load("iris")
    net, opt = _net(PReLU(), Swish()), train.optimizer("momentum", 0.05)
    start = train.init_state(net, opt, jax.random.key(0), ds.input_shape)
    state, history = train.fit(net, opt, start, ds, epochs=2, batch_size=30)
    assert history["step"] == [4, 8] and np.all(np.isfinite(history["train_loss"]))
    assert not np.array_equal(state.params[1]["alpha"], start.params[1]["alpha"])
    path = tmp_path / "user.safetensors"
    checkpoint.save(path, state)
    restored, _ = checkpoint.restore(path, like=start)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_star_args_signatures_are_accepted():
    class Loose(layers.Layer):
        def forward(self, *args):
            params, state, x, ctx = args
            return x, state, ()

        def backward(self, params, *rest, **options):
            return {}, rest[1]

    net = _net(Loose())
    params = net.init(jax.random.key(0), (4,))
    assert net.manual_backward(params, *_batch())[0]["W"].shape == (4, 8)


def test_integer_input_needs_no_gradient():
    net = Sequential([layers.Embedding(10, 4), Swish(), layers.Dense(3)],
                     loss=losses.SoftmaxCrossEntropy())
    params = net.init(jax.random.key(0), (2,))
    ids, labels = jnp.array([[1, 2], [3, 9]]), jnp.array([[0, 1], [2, 0]])
    assert net.manual_backward(params, ids, labels)[0]["W"].shape == (10, 4)


ARGUMENTS = {  # the built-in layers that take constructor arguments
    "Sequential": lambda: layers.Sequential([layers.Dense(2)]),
    "Residual": lambda: layers.Residual(layers.Dense(2)),
    "Dense": lambda: layers.Dense(2),
    "Conv2D": lambda: layers.Conv2D(2, 3),
    "MaxPool2D": lambda: layers.MaxPool2D(2),
    "AvgPool2D": lambda: layers.AvgPool2D(2),
    "Dropout": lambda: layers.Dropout(0.5),
    "Embedding": lambda: layers.Embedding(10, 4),
    "TiedEmbedding": lambda: layers.TiedEmbedding(10, 4, body=layers.LayerNorm()),
    "PositionEmbedding": lambda: layers.PositionEmbedding(8, 4),
    "MultiHeadAttention": lambda: layers.MultiHeadAttention(2),
    "TransformerBlock": lambda: layers.TransformerBlock(2),
    "RNN": lambda: layers.RNN(3),
    "LSTM": lambda: layers.LSTM(3),
    "GRU": lambda: layers.GRU(3),
}


@pytest.mark.parametrize("name", [n for n in layers.__all__ if n not in ("Layer", "Context")])
def test_every_built_in_layer_meets_the_contract(name):
    make = ARGUMENTS.get(name, getattr(layers, name))
    check_contract(f"test: {name}", make())


# ---------------------------------------------------------------- at construction
def _refused(message: str, *layer, build=lambda *ls: Sequential(list(ls))):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(*layer)


def test_init_without_dtype():
    class NoDtypeSwish(Swish):
        def init(self, key, input_shape):
            return {}, {}, tuple(input_shape)

    _refused("Sequential: layers[1] NoDtypeSwish.init must take (key, input_shape, dtype=None): "
             "jaxbp passes the dtype; got (key, input_shape)", layers.Dense(2), NoDtypeSwish())


def test_missing_forward_or_backward():
    class OnlyBackward(layers.Layer):
        def backward(self, params, residuals, dy):
            return {}, dy

    class OnlyForward(layers.Layer):
        def forward(self, params, state, x, ctx):
            return x, state, ()

    _refused("Sequential: layers[0] OnlyBackward must define forward(params, state, x, ctx) -> "
             "(y, new_state, residuals): every layer writes its own forward and backward",
             OnlyBackward())
    _refused("Residual: body OnlyForward must define backward(params, residuals, dy) -> "
             "(dparams, dx)", OnlyForward(), build=layers.Residual)


class CheckWithoutState(Swish):
    def check(self, params, x):
        pass


class ForwardWithoutState(Swish):
    def forward(self, params, x):
        return x, ()


class BackwardWithoutParams(Swish):
    def backward(self, residuals, dy):
        return {}, dy


@pytest.mark.parametrize(("layer", "message"), [
    (CheckWithoutState(), "CheckWithoutState.check must take (params, state, x, ctx): jaxbp "
                          "passes the state and a Context; got (params, x)"),
    (ForwardWithoutState(), "ForwardWithoutState.forward must take (params, state, x, ctx): "
                            "jaxbp passes the state and a Context; got (params, x)"),
    (BackwardWithoutParams(), "BackwardWithoutParams.backward must take (params, residuals, "
                              "dy): jaxbp passes the residuals forward returned and ∂L/∂y; got "
                              "(residuals, dy)"),
], ids=lambda v: type(v).__name__ if isinstance(v, layers.Layer) else "")
def test_wrong_signature(layer, message):
    _refused(f"Model: body {message}", layer,
             build=lambda child: Model(child, losses.MeanSquaredError()))


def test_unhashable_layers():
    @dataclasses.dataclass
    class MutableSwish(Swish):
        beta: float = 1.0

    @dataclasses.dataclass(frozen=True)
    class ListSwish(Swish):
        betas: list = dataclasses.field(default_factory=list)

    for layer, why in ((MutableSwish(), "unhashable type: 'MutableSwish'"),
                       (ListSwish(), "unhashable type: 'list'")):
        _refused(f"Sequential: layers[0] {layer.name} is not hashable ({why}), and models are "
                 f"static arguments of jax.jit: make it @dataclasses.dataclass(frozen=True)",
                 layer)


def test_duck_typed_layer_is_refused_with_the_fix():
    class Duck:
        def forward(self, params, state, x, ctx):
            return x, state, ()

        def backward(self, params, residuals, dy):
            return {}, dy

    _refused("Sequential: layers[1] must be a jaxbp layer; got Duck, which has forward and "
             "backward but does not subclass jaxbp.layers.Layer: write class "
             "Duck(jaxbp.layers.Layer)", layers.Dense(2), Duck())
    _refused("Sequential: layers[0] must be a jaxbp layer; got int", 3)


# ------------------------------------------------------------------ at trace time
def _manual(*middle, features=4):
    net = _net(*middle)
    x, y = _batch(features)
    return net.manual_backward(net.init(jax.random.key(0), (features,)), x, y)


def test_shape_bug_in_backward_is_one_line_naming_path_and_function():
    class DenseNotTransposed(layers.Dense):
        def backward(self, params, residuals, dy):
            dparams, _ = super().backward(params, residuals, dy)
            return dparams, dy @ params["W"]  # should be dy @ W.T

    body = Sequential([DenseNotTransposed(6), layers.Tanh(), layers.Dense(8)])
    with pytest.raises(LayerError) as info:
        _manual(layers.Residual(body))
    message = str(info.value)
    assert re.fullmatch(
        r"layers\[1\]\.body\.layers\[0\] DenseNotTransposed\.backward raised TypeError: "
        r"dot_general requires contracting dimensions to have the same shape, got \(6,\) and "
        r"\(8,\)\. \(at .*test_user_layers\.py:\d+\)", message), message
    line = int(message.rsplit(":", 1)[1].rstrip(")"))
    assert "dy @ params" in open(__file__).read().splitlines()[line - 1]
    assert isinstance(info.value.__context__, TypeError)


def test_errors_inside_forward_and_under_gradcheck():
    class SquaresWrongly(Swish):
        def forward(self, params, state, x, ctx):
            return jnp.dot(x, x), state, ()

    class ReadsPastResiduals(Swish):
        def backward(self, params, residuals, dy):
            return {}, dy * residuals[2]

    with pytest.raises(LayerError, match=r"^layers\[1\] SquaresWrongly\.forward raised "
                                         r"TypeError: dot_general requires contracting"):
        _manual(SquaresWrongly())
    net = _net(ReadsPastResiduals())
    params, (x, y) = net.init(jax.random.key(0), (4,)), _batch()
    message = r"^layers\[1\] ReadsPastResiduals\.backward raised IndexError: tuple index out of"
    with pytest.raises(LayerError, match=message):
        gradcheck(net, params, x, y)
    with pytest.raises(LayerError, match=r"^layers\[0\] ReadsPastResiduals\.backward raised"):
        check_layer(Sequential([ReadsPastResiduals()]), (4,))


def test_wrong_dx_shape_is_named_before_xla():
    class ReLUNoMask(layers.Layer):
        def forward(self, params, state, x, ctx):
            return jax.nn.relu(x), state, ()

        def backward(self, params, residuals, dy):
            return {}, dy[:, :3]

    message = ("layers[1] ReLUNoMask.backward returned dx of shape (5, 3); the input has shape "
               "(5, 8)")
    with pytest.raises(LayerError, match=re.escape(message)):
        _manual(ReLUNoMask())
    net = _net(ReLUNoMask())
    with pytest.raises(LayerError, match=re.escape(message)):
        gradcheck(net, net.init(jax.random.key(0), (4,)), *_batch())


def test_wrong_dparams():
    class PReLUNotSummed(PReLU):
        def backward(self, params, residuals, dy):
            _, dx = super().backward(params, residuals, dy)
            return {"alpha": jnp.where(residuals.x >= 0, 0, dy * residuals.x)}, dx

    class SwishNoneParams(Swish):
        def backward(self, params, residuals, dy):
            return None, super().backward(params, residuals, dy)[1]

    with pytest.raises(LayerError, match=re.escape(
            "layers[1] PReLUNotSummed.backward returned dparams['alpha'] of shape (5, 8); "
            "params['alpha'] has shape (8,)")):
        _manual(PReLUNotSummed())
    with pytest.raises(LayerError, match=re.escape(
            "layers[1] SwishNoneParams.backward returned dparams of structure PyTreeDef(None); "
            "params have PyTreeDef({})")):
        _manual(SwishNoneParams())


def test_wrong_returns_and_missing_dx():
    class TwoFromForward(Swish):
        def forward(self, params, state, x, ctx):
            return x, ()

    class TwoFromInit(Swish):
        def init(self, key, input_shape, dtype=None):
            return {}, tuple(input_shape)

    class NoDx(Swish):
        def backward(self, params, residuals, dy):
            return {}, None

    with pytest.raises(LayerError, match=re.escape(
            "layers[1] TwoFromForward.forward must return (y, new_state, residuals); got a tuple "
            "of 2")):
        _manual(TwoFromForward())
    with pytest.raises(LayerError, match=re.escape(
            "layers[1] TwoFromInit.init must return (params, state, output_shape); got a tuple "
            "of 2")):
        _manual(TwoFromInit())
    with pytest.raises(LayerError, match=re.escape(
            "layers[1] NoDx.backward returned dx None; the input has shape (5, 8) and is "
            "floating-point")):
        _manual(NoDx())


def test_tuple_input_is_compared_leaf_by_leaf():
    class AddPair(layers.Layer):
        def init(self, key, input_shape, dtype=None):
            return {}, {}, input_shape[0]

        def check(self, params, state, x, ctx):
            pass

        def forward(self, params, state, x, ctx):
            return x[0] + x[1], state, ()

        def backward(self, params, residuals, dy):
            return {}, (dy, dy[:, :2])

    net = Sequential([AddPair(), layers.Dense(3)], loss=losses.SoftmaxCrossEntropy())
    params = net.init(jax.random.key(0), ((4,), (4,)))
    x = (jnp.ones((5, 4)), jnp.zeros((5, 4)))
    with pytest.raises(LayerError, match=re.escape(
            "layers[0] AddPair.backward returned dx[1] of shape (5, 2); the input[1] has shape "
            "(5, 4)")):
        net.manual_backward(params, x, _batch()[1])


def test_a_user_layer_in_the_bench(monkeypatch):
    from jaxbp import bench

    def build():
        return Sequential([layers.Dense(8), PReLU(), layers.Dense(3)],
                          loss=losses.SoftmaxCrossEntropy())

    spec = bench.ModelSpec(build, (4,), 8, classes=3)  # a user's network, by registering it
    monkeypatch.setitem(bench.MODELS, "prelu-mlp", spec)
    result = bench.bench_model("prelu-mlp", rounds=2, round_seconds=0.0, epoch_steps=2,
                               peak_size=32, torch_reference=False)
    rows = {r["variant"]: r for r in result["rows"]}
    assert {"manual", "autodiff"} <= set(rows) and rows["manual"]["time_s"] > 0
    assert result["grad_rel_error"]["manual"] < 1e-5  # float32, against autodiff
