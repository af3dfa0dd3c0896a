"""Training networks with state and randomness: fit, steps, evaluation, checkpoints, CLI, bench.

A BatchNorm + Dropout MLP carries its running statistics from step to step and
draws a fresh mask per step; manual and autodiff training stay equal; a
checkpoint stores and restores the state; eval mode uses the running statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp import bench, checkpoint, cli, data, layers, models, train


@pytest.fixture(scope="module")
def spirals():
    return data.load("spirals")  # 480 train / 120 test, 3 classes


def _net(dropout=0.2):
    return models.mlp(hidden=(16,), classes=3, norm="batch", dropout=dropout, weight_decay=1e-3)


def _start(net, opt, ds, dtype=jnp.float64):
    return train.init_state(net, opt, jax.random.key(3), ds.input_shape, dtype)


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(tree)]


def _equal(a, b, rtol=0.0):
    return all(np.allclose(u, v, rtol=rtol, atol=0) if rtol else np.array_equal(u, v)
               for u, v in zip(_leaves(a), _leaves(b), strict=True))


@pytest.fixture(scope="module")
def manual_run(spirals):
    net, opt = _net(), optax.sgd(0.05, momentum=0.9)
    start = _start(net, opt, spirals)
    return net, opt, start, train.fit(net, opt, start, spirals, epochs=4, batch_size=48)


def test_init_state_holds_the_running_statistics(manual_run):
    net, _, start, _ = manual_run
    assert start.net_state is not None
    bn = start.net_state[1]
    assert set(bn) == {"mean", "var"}
    assert np.all(np.asarray(bn["mean"]) == 0) and np.all(np.asarray(bn["var"]) == 1)
    assert [s for i, s in enumerate(start.net_state) if i != 1] == [{}] * (len(net.layers) - 1)
    plain = models.mlp(hidden=(4,), classes=3)
    assert train.init_state(plain, optax.sgd(0.1), jax.random.key(0), (2,)).net_state is None


def test_fit_updates_the_running_statistics_and_learns(manual_run, spirals):
    net, _, start, (state, history) = manual_run
    mean, var = (np.asarray(state.net_state[1][k]) for k in ("mean", "var"))
    assert np.all(np.isfinite(mean)) and not np.allclose(mean, 0)
    assert not np.allclose(var, 1)
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["test_accuracy"][-1] > 0.45  # 3 classes: chance is 1/3
    # evaluation is in eval mode: it uses the running statistics, so it changes with them
    loss, acc = train.evaluate(net, state.params, spirals.x_test, spirals.y_test,
                               net_state=state.net_state)
    assert float(acc) == pytest.approx(history["test_accuracy"][-1])
    other, _ = train.evaluate(net, state.params, spirals.x_test, spirals.y_test,
                              net_state=start.net_state)
    assert float(other) != float(loss)


def test_manual_and_autodiff_training_agree(manual_run, spirals):
    net, opt, start, (state, _) = manual_run
    auto, _ = train.fit(net, opt, start, spirals, epochs=4, batch_size=48, grad="autodiff")
    assert _equal(auto.params, state.params, rtol=1e-9)
    assert _equal(auto.net_state, state.net_state, rtol=1e-9)


def test_resuming_is_exact_and_looped_epochs_match(manual_run, spirals):
    net, opt, start, (state, _) = manual_run
    half, _ = train.fit(net, opt, start, spirals, epochs=2, batch_size=48)
    resumed, _ = train.fit(net, opt, half, spirals, epochs=4, batch_size=48)
    assert _equal(resumed.params, state.params) and _equal(resumed.net_state, state.net_state)
    looped, history = train.fit(net, opt, start, spirals, epochs=4, batch_size=48, fused=False)
    assert _equal(looped.params, state.params, rtol=1e-12)
    assert history["compiled"] == 2


def test_each_step_draws_its_own_dropout_mask(spirals):
    """Two steps from the same params and state differ only through their keys."""
    net, opt = _net(dropout=0.5), optax.sgd(0.1)
    start = _start(net, opt, spirals)
    step = train.make_train_step(net, opt)
    batch = (spirals.x_train[:32], spirals.y_train[:32])
    k1, k2 = jax.random.split(jax.random.key(0))
    runs = [step(start.params, start.opt_state, batch, start.net_state, k) for k in (k1, k1, k2)]
    assert float(runs[0][2]["loss"]) == float(runs[1][2]["loss"])
    assert float(runs[0][2]["loss"]) != float(runs[2][2]["loss"])
    new_state = runs[0][2]["net_state"]
    J, _, manual_state = net.manual_step(start.params, *batch, state=start.net_state, key=k1,
                                         train=True)
    assert _equal(new_state, manual_state) and float(J) == float(runs[0][2]["loss"])
    with pytest.raises(ValueError, match="Dropout: train=True needs a PRNG key"):
        step(start.params, start.opt_state, batch, start.net_state)


def test_fit_refuses_a_stateful_network_without_its_state(spirals):
    net, opt = _net(), optax.sgd(0.1)
    start = _start(net, opt, spirals)._replace(net_state=None)
    with pytest.raises(ValueError, match="fit: the network has state"):
        train.fit(net, opt, start, spirals, epochs=1, batch_size=48)


def test_checkpoint_round_trips_the_network_state(manual_run, tmp_path):
    net, opt, start, (state, history) = manual_run
    path = tmp_path / "bn.safetensors"
    checkpoint.save(path, state, history=history)
    restored, _ = checkpoint.restore(path, like=start)
    assert _equal(restored.net_state, state.net_state) and _equal(restored.params, state.params)
    names = set(checkpoint._open(str(path), tensors=True)[1])
    assert {"net_state[1]['mean']", "net_state[1]['var']"} <= names
    plain = models.mlp(hidden=(16,), classes=3)
    like = train.init_state(plain, opt, jax.random.key(0), (2,), jnp.float64)
    with pytest.raises(ValueError, match=r"net_state\[1\]\['mean'\] .* is in the checkpoint but "
                                         r"not in the model"):
        checkpoint.restore(path, like=like)


def test_cli_trains_the_batchnorm_dropout_mlp(capsys):
    rc = cli.main(["train", "--model", "mlp-bn", "--hidden", "32", "--epochs", "2",
                   "--batch-size", "64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "mlp-bn with" in out
    assert "gradcheck (float64, one batch of 64, train mode): OK" in out


def test_bench_runs_the_batchnorm_dropout_model_in_train_mode(monkeypatch):
    # mlp-bn's architecture (Dense → BatchNorm → ReLU → Dropout, twice), made narrow
    assert bench.MODELS["mlp-bn"].input_shape == (784,)
    narrow = bench.ModelSpec(lambda: models.mlp(hidden=(32, 32), norm="batch", dropout=0.1),
                             (20,), 8)
    monkeypatch.setitem(bench.MODELS, "mlp-bn", narrow)
    result = bench.bench_model("mlp-bn", batch=8, rounds=2, round_seconds=0.0, epoch_steps=2,
                               remat_every=2, peak_size=8, torch_reference=False)
    rows = {r["variant"]: r for r in result["rows"]}
    assert {"manual", "autodiff", "remat 2", "train", "scan"} <= set(rows)
    errors = result["grad_rel_error"]
    assert errors["manual"] < 1e-4 and errors["remat"] < 1e-4, errors
    assert "resmlp" in bench.MODELS


def test_residual_mlp_trains(spirals):
    net = models.residual_mlp(width=16, blocks=2, classes=3, dropout=0.1)
    opt = optax.adam(1e-2)
    state = _start(net, opt, spirals, jnp.float32)
    assert state.net_state is None  # LayerNorm has no state
    state, history = train.fit(net, opt, state, spirals, epochs=5, batch_size=48)
    assert history["test_accuracy"][-1] > 0.6
    assert isinstance(net.layers[1], layers.Residual)
