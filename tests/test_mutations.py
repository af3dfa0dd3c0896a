"""gradcheck flags every wrong backward of the catalogue and names where it is wrong.

Each mutation is checked in its mode (train mode with BatchNorm's state and Dropout's
key, or eval mode): the unmutated case passes, the mutant has the same loss (its
forward is untouched), and the report names the first divergent nested layer and
exactly the failing rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxbp import Sequential, gradcheck, layers, losses, with_manual_grad
from tests.mutations import EVERY, MUTATIONS

_CLEAN = {}  # (case, mode) -> the unmutated case's report: several mutations share a case


def _clean_report(mutation, net, params, x, y, mode):
    key = (mutation.case, mutation.mode)
    if key not in _CLEAN:
        _CLEAN[key] = gradcheck(net, params, x, y, **mode)
    return _CLEAN[key]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_gradcheck_flags_mutation_and_names_where(mutation):
    net, params, x, y = mutation.case()
    mode = mutation.gradcheck_mode(net, x)
    clean = _clean_report(mutation, net, params, x, y, mode)
    assert clean.ok, f"the unmutated case must pass:\n{clean}"

    mutant = mutation.mutate(net)
    assert mutant != net  # (an equal model would reuse the unmutated compiled program)
    report = gradcheck(mutant, params, x, y, **mode)
    assert report.loss == pytest.approx(clean.loss, rel=1e-13)  # the forward is untouched
    assert [r.path for r in report.rows] == [r.path for r in clean.rows]
    assert not report.ok
    assert report.first_divergence == mutation.blame, str(report)
    failing = {r.path for r in report.failures}
    expected = {r.path for r in report.rows} if mutation.failing == EVERY else mutation.failing
    assert failing == expected, str(report)
    assert f"first divergence from the output: {mutation.blame}" in str(report)


def test_catalogue_reaches_nested_layers_in_both_modes():
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert {m.mode for m in MUTATIONS} == {None, "train", "eval"}
    nested = [m.blame for m in MUTATIONS if ".body." in m.blame or "].layers[" in m.blame]
    assert len(nested) >= 7
    assert any(b.startswith("layers[1].layers[1].body.layers[") for b in nested)


class DenseZeroWeightGradient(layers.Dense):
    """Returns dW = 0: the whole first-layer weight gradient is missing."""

    def backward(self, params, residuals, dy):
        dparams, dx = super().backward(params, residuals, dy)
        return {**dparams, "W": jnp.zeros_like(dparams["W"])}, dx


def _deep_sigmoid_case(first):
    """A 6 → 8 → 8 → 8 → 1 sigmoid regression net, float32, whose first W gradient is small."""
    stack = [first, layers.Sigmoid()]
    stack += [layers.Dense(8), layers.Sigmoid(), layers.Dense(8), layers.Sigmoid(), layers.Dense(1)]
    net = Sequential(stack, loss=losses.HalfSquaredError())
    k_init, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    params = net.init(k_init, (6,), jnp.float32)
    x = jax.random.normal(k_x, (16, 6), jnp.float32)
    y = jax.random.normal(k_y, (16, 1), jnp.float32)
    return net, params, x, y


def test_check_grads_float32_blind_spot_is_caught_by_gradcheck():
    """``jax.test_util.check_grads`` tests one random direction with tolerance 2e-3 in float32.

    A backward that returns zeros for the whole first-layer W passes it (through the
    custom_vjp bridge, check_grads sees the manual gradient): through three sigmoid
    layers that gradient is ~100× smaller than the last layer's, so it hardly moves
    the one projected number. gradcheck's per-leaf comparison names ``layers[0].W``.
    """
    net, params, x, y = _deep_sigmoid_case(DenseZeroWeightGradient(8))
    loss = with_manual_grad(net)
    check_grads(lambda p: loss(p, x, y), (params,), order=1, modes=("rev",))  # passes

    # check_grads is not vacuous: the same bug in the last layer (larger gradient) fails it.
    last = Sequential([*net.layers[:-1], DenseZeroWeightGradient(1)], loss=net.loss_fn)
    with pytest.raises(AssertionError, match="cotangent projection"):
        check_grads(lambda p: with_manual_grad(last)(p, x, y), (params,), 1, modes=("rev",))

    good = jax.grad(Sequential([layers.Dense(8), *net.layers[1:]], loss=net.loss_fn).loss)(
        params, x, y
    )
    bad = jax.grad(loss)(params, x, y)
    assert np.all(np.asarray(bad[0]["W"]) == 0) and np.any(np.asarray(good[0]["W"]) != 0)

    report = gradcheck(net, params, x, y)
    assert not report.ok
    assert {r.path for r in report.failures} == {"layers[0].W"}
    assert report.first_divergence == "layers[0] (DenseZeroWeightGradient)"
    assert report.row("layers[0].W").rel_err == 1.0



RECURRENT_BLAMES = {"layers[1] (RNNCarriedGradientDropped)", "layers[1] (LSTMForgetPathDropped)",
                    "layers[1] (GRUUpdateGateSignSwapped)",
                    "layers[0] (EmbeddingOverwritesRepeats)"}


def test_catalogue_reaches_recurrent_layers_and_embeddings():
    """BPTT's classic bugs (the carried dh dropped, the LSTM's cell path, the GRU's update
    gate) and the embedding's scatter, each placed at its layer of a tiny character model.
    Its input is integer ids, which have no gradient: no row for the Embedding's dx."""
    found = [m for m in MUTATIONS if m.blame in RECURRENT_BLAMES]
    assert {m.blame for m in found} == RECURRENT_BLAMES
    for m in found:
        x = m.case()[2]
        assert jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 2  # (batch, time)
        assert "layers[0].dx" not in m.failing
