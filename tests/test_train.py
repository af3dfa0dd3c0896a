"""Training: the jitted step, fused epochs, manual = autodiff, weight decay, divergence, CLI."""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp import cli, data, models, train

from .helpers import max_tree_rel_error, run_on_cpu_devices

LAM = 0.05  # weight decay for the equivalence tests


@pytest.fixture(scope="module")
def spirals():
    return data.load("spirals")  # 480 train / 120 test, 3 classes


def _bit_equal(a, b) -> bool:
    a, b = (jax.tree.map(_unwrap_key, t) for t in (a, b))
    return all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _fit(ds, opt_name="momentum", grad="manual", epochs=10, fused=None, weight_decay=1e-3):
    """100 steps (10 epochs × 48 batches of 10) in float64."""
    net = models.mlp(hidden=(16,), classes=ds.classes, weight_decay=weight_decay)
    opt = train.optimizer(opt_name, 0.05 if opt_name != "adam" else 1e-2)
    state = train.init_state(net, opt, jax.random.key(7), ds.input_shape, jnp.float64)
    return train.fit(net, opt, state, ds, epochs=epochs, batch_size=48, grad=grad, fused=fused)


def _unwrap_key(a):
    is_key = isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    return jax.random.key_data(a) if is_key else a


@pytest.fixture(scope="module")
def manual_run(spirals):
    return _fit(spirals)


def test_fit_learns_and_records_history(manual_run):
    state, history = manual_run
    assert state.epoch == 10 and state.step == 100 and history["steps"] == 100
    assert history["epoch"] == list(range(1, 11)) and history["step"] == list(range(10, 101, 10))
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["test_accuracy"][-1] > 0.8 and history["train_accuracy"][-1] > 0.8
    assert np.all(np.diff(history["time"]) > 0)
    assert history["compiled"] == 1  # one program for all ten epochs: no recompilation


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_manual_and_autodiff_training_agree_after_100_steps(spirals, manual_run, opt_name):
    manual = manual_run if opt_name == "momentum" else _fit(spirals, opt_name)
    auto = _fit(spirals, opt_name, grad="autodiff")
    assert manual[0].step == auto[0].step == 100
    assert max_tree_rel_error(manual[0].params, auto[0].params) <= 1e-9
    np.testing.assert_allclose(manual[1]["train_loss"], auto[1]["train_loss"], rtol=1e-9)


def test_same_seed_twice_is_bit_identical(spirals, manual_run):
    again = _fit(spirals)
    assert _bit_equal(manual_run[0], again[0])
    assert manual_run[1]["train_loss"] == again[1]["train_loss"]


def test_python_loop_matches_fused_epochs_and_compiles_once(spirals, manual_run):
    state, history = _fit(spirals, fused=False)
    assert max_tree_rel_error(state.params, manual_run[0].params) <= 1e-9
    assert history["compiled"] == 2  # the step and the shuffle, each compiled once


def test_looped_fits_do_not_share_compile_counts(spirals):
    net = models.mlp(hidden=(4,), classes=3)
    opt = optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape)
    for batch_size in (48, 96):  # a new shuffle program each; counted only by its own fit
        _, history = train.fit(net, opt, state, spirals, epochs=1, batch_size=batch_size,
                               fused=False)
        assert history["compiled"] == 2


_FOUR_DEVICES = textwrap.dedent("""
    import json, jax, optax
    from jaxbp import data, models, train
    ds = data.load("spirals")
    net = models.mlp(hidden=(4,), classes=3)
    opt = optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), ds.input_shape)
    runs = [train.fit(net, opt, state, ds, epochs=3, batch_size=48, devices=4, fused=fused)
            for fused in (True, False, False)]
    print("RESULT " + json.dumps([h["compiled"] for _, h in runs]))
""")


def test_epochs_on_four_devices_compile_once():
    # Typed PRNG keys returned by jit on a mesh used to alternate physical shardings,
    # adding a second dispatch-cache entry from the third epoch on.
    assert run_on_cpu_devices(_FOUR_DEVICES) == [1, 2, 2]


def test_train_step_is_jitted_and_never_recompiles():
    net = models.mlp(hidden=(8,), classes=3)
    opt = optax.adam(1e-2)
    params = net.init(jax.random.key(0), (4,))
    opt_state = opt.init(params)
    step = train.make_train_step(net, opt, grad="manual")
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jnp.arange(16) % 3
    losses = []
    for _ in range(5):
        params, opt_state, metrics = step(params, opt_state, (x, y))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ weight decay


def _steps(net, opt, params, n=20):
    step = train.make_train_step(net, opt)
    opt_state = opt.init(params)
    x = jax.random.normal(jax.random.key(3), (n, 12, 4))
    y = jnp.arange(n * 12).reshape(n, 12) % 3
    for i in range(n):
        params, opt_state, _ = step(params, opt_state, (x[i], y[i]))
    return params


@pytest.fixture(scope="module")
def nets():
    """The same MLP with λ in the objective and without (for decay in the optimizer)."""
    with_l2 = models.mlp(hidden=(8,), classes=3, weight_decay=LAM)
    plain = models.mlp(hidden=(8,), classes=3)
    params = plain.init(jax.random.key(0), (4,))
    return with_l2, plain, params


def _decayed(plain, opt):
    return optax.chain(optax.add_decayed_weights(LAM, mask=train.decay_mask(plain)), opt)


@pytest.mark.parametrize("opt", [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9)], ids=["sgd", "mom"])
def test_l2_in_loss_equals_add_decayed_weights_for_sgd(nets, opt):
    with_l2, plain, params = nets
    a = _steps(with_l2, opt, params)
    b = _steps(plain, _decayed(plain, opt), params)
    assert max_tree_rel_error(a, b) <= 1e-12
    assert max_tree_rel_error(a, _steps(plain, opt, params)) > 1e-3  # the decay did something


def test_l2_in_loss_differs_from_adamw(nets):
    with_l2, plain, params = nets
    l2_adam = _steps(with_l2, optax.adam(1e-2), params)
    # Decay added before Adam's scaling is the same as λ in the objective …
    assert max_tree_rel_error(l2_adam, _steps(plain, _decayed(plain, optax.adam(1e-2)), params)) \
        <= 1e-10
    # … AdamW adds η·λ·W after the scaling: a different update.
    adamw = optax.adamw(1e-2, weight_decay=LAM, mask=train.decay_mask(plain))
    assert max_tree_rel_error(l2_adam, _steps(plain, adamw, params)) > 1e-2


def test_decay_mask_covers_weights_not_biases(nets):
    _, plain, params = nets
    mask = train.decay_mask(plain)(params)
    assert mask == [{"W": True, "b": False}, {}, {"W": True, "b": False}]


def test_frozen_biases_stay_fixed(nets):
    _, plain, params = nets
    params = jax.tree.map(lambda a: a + 0.1, params)
    out = _steps(plain, train.freeze(optax.sgd(0.1), ("b",)), params)
    for before, after in zip(params, out, strict=True):
        if before:
            np.testing.assert_array_equal(after["b"], before["b"])
            assert not np.array_equal(after["W"], before["W"])


# -------------------------------------------------------------------- divergence


def test_nonfinite_loss_names_epoch_and_step_and_keeps_last_good_state(spirals):
    net = models.mlp(hidden=(16,), classes=3)
    # Sane for two epochs (2 × 10 steps), then a learning rate that overflows.
    opt = optax.sgd(optax.piecewise_constant_schedule(0.05, {20: 1e30}))
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape, jnp.float32)
    seen = []
    message = r"at epoch 3, step 2 of 10 \(global step 22\)"
    with pytest.raises(train.NonFiniteLossError, match=message):
        try:
            train.fit(net, opt, state, spirals, epochs=5, batch_size=48,
                      on_epoch=lambda s, r: seen.append(s))
        except train.NonFiniteLossError as err:
            assert err.state.epoch == 2 and err.state.step == 20
            assert _bit_equal(err.state.params, seen[-1].params)
            assert all(np.isfinite(a).all() for a in jax.tree.leaves(err.state.params))
            raise
    assert [s.epoch for s in seen] == [1, 2]


@pytest.mark.parametrize("fused", [True, False])
def test_an_update_that_overflows_stops_training_at_that_step(spirals, fused):
    # The loss of a step is computed before its update: only the parameters after the
    # update show that the epoch's last step diverged.
    net = models.mlp(hidden=(4,), classes=3)
    opt = optax.sgd(lambda count: jnp.where(count == 9, jnp.inf, 0.05))  # epoch 1's last step
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape, jnp.float32)
    seen = []
    message = (r"training diverged: the update made the parameters non-finite at epoch 1, "
               r"step 10 of 10 \(global step 10\)$")
    with pytest.raises(train.NonFiniteLossError, match=message) as info:
        train.fit(net, opt, state, spirals, epochs=2, batch_size=48, fused=fused,
                  on_epoch=lambda s, r: seen.append(s))
    assert seen == [] and info.value.state.epoch == 0
    assert _bit_equal(info.value.state.params, state.params)


def test_a_non_finite_test_loss_stops_training_before_on_epoch(spirals):
    x_test = spirals.x_test.copy()
    x_test[0] = 3e38  # finite, but its logits overflow
    net = models.mlp(hidden=(16,), classes=3)
    opt = optax.adam(1e-2)
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape, jnp.float32)
    seen = []
    with pytest.raises(train.NonFiniteLossError, match=r"the epoch's test loss is (nan|inf) at "
                       r"epoch 1, step 10 of 10 \(global step 10\)"):
        train.fit(net, opt, state, spirals._replace(x_test=x_test), epochs=2, batch_size=48,
                  on_epoch=lambda s, r: seen.append(r))
    assert seen == []


def test_bad_arguments_raise(spirals):
    net = models.mlp(hidden=(4,), classes=3)
    opt = optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape)
    with pytest.raises(ValueError, match="grad must be one of manual, autodiff; got 'numeric'"):
        train.make_train_step(net, opt, grad="numeric")
    with pytest.raises(ValueError, match="batch_size 1000 exceeds the 480 training samples"):
        train.fit(net, opt, state, spirals, epochs=1, batch_size=1000)
    with pytest.raises(ValueError, match="optimizer: name must be one of sgd, momentum, adam"):
        train.optimizer("rmsprop", 0.1)


@pytest.mark.parametrize("name, value, shown", [
    ("epochs", -2, "-2"), ("epochs", 0, "0"), ("epochs", 2.5, "2.5"), ("epochs", None, "None"),
    ("epochs", True, "True"), ("batch_size", True, "True"), ("batch_size", 0, "0"),
    ("batch_size", 16.0, "16.0"),
])
def test_fit_rejects_non_positive_int_epochs_and_batch_size(spirals, name, value, shown):
    net = models.mlp(hidden=(4,), classes=3)
    opt = optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape)
    kwargs = {"epochs": 1, "batch_size": 48, name: value}
    with pytest.raises(ValueError, match=rf"fit: {name} must be a positive int; got {shown}$"):
        train.fit(net, opt, state, spirals, **kwargs)


def test_fit_accepts_numpy_integers(spirals):
    net = models.mlp(hidden=(4,), classes=3)
    opt = optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), spirals.input_shape)
    state, history = train.fit(net, opt, state, spirals, epochs=np.int64(1),
                               batch_size=np.int32(96), devices=np.int64(1))
    assert state.epoch == 1 and state.step == 5 and history["epoch"] == [1]


def test_fit_checks_labels_against_the_network_before_training():
    iris = data.load("iris")  # labels 0..2
    net = models.mlp(hidden=(4,), classes=2)
    opt = optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), iris.input_shape)
    seen = []
    message = (r"fit: train split: loss SoftmaxCrossEntropy: integer labels must lie in "
               r"\[0, 2\) for 2 classes; got values in \[0, 2\]")
    with pytest.raises(ValueError, match=message):
        train.fit(net, opt, state, iris, epochs=1, batch_size=16,
                  on_epoch=lambda s, r: seen.append(r))
    assert seen == []


# --------------------------------------------------------------------------- CLI


def test_cli_checks_gradients_trains_and_plots(tmp_path, capsys):
    png = tmp_path / "curves"  # no extension: a PNG at curves.png
    rc = cli.main(["train", "--dataset", "xor", "--epochs", "3", "--batch-size", "16",
                   "--lr", "0.01", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "gradcheck (float64, one batch of 16, train mode): OK" in out
    assert "test accuracy" in out and "steps/s" in out and "device 1 × cpu" in out
    assert f"saved curves to {png}.png\n" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_setups(tmp_path, capsys):
    assert cli.main(["train", "--resume"]) == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 2
    assert "missing IDX file train-images-idx3-ubyte" in capsys.readouterr().err


def test_cli_trains_the_cnn_on_digit_images(capsys):
    rc = cli.main(["train", "--model", "cnn", "--filters", "4,4", "--epochs", "1",
                   "--batch-size", "64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(8, 8, 1), 10 classes; cnn with 358 parameters" in out
    assert "gradcheck (float64, one batch of 64, train mode): OK" in out


def _iris_state(opt):
    net = models.mlp(hidden=(4,), classes=3)
    return net, train.init_state(net, opt, jax.random.key(0), (4,)), data.load("iris")


@pytest.mark.parametrize("call, message", [
    (lambda: train.optimizer("adam", -1.0),
     "optimizer: learning_rate must be a finite number > 0; got -1.0"),
    (lambda: train.optimizer("sgd", float("nan")),
     "optimizer: learning_rate must be a finite number > 0; got nan"),
    (lambda: train.optimizer("momentum", 0.1, momentum="a"),
     "optimizer: momentum must be a finite number >= 0; got 'a'"),
    (lambda: train.init_state(models.mlp(), optax.sgd(0.1), jax.random.key(0), 4),
     "init_state: input_shape must be a tuple of ints (batch axis excluded), e.g. (64,) or "
     "(8, 8, 1); got 4"),
])
def test_optimizer_and_init_state_check_their_arguments(call, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_fit_refuses_what_it_cannot_train_with_before_any_step():
    opt = optax.adam(1e-3)
    net, state, ds = _iris_state(opt)
    nan = ds._replace(x_train=ds.x_train.copy())
    nan.x_train[3, 1] = np.nan
    cases = [
        (dict(opt=optax.sgd(0.1, momentum=0.9)), "fit: state.opt_state is not a state of opt"),
        (dict(data=None), "fit: data must be a data.Dataset (with x_train, y_train, x_test, "
                          "y_test); got NoneType without x_train"),
        (dict(state=state.params), "fit: state must be a train.TrainState"),
        (dict(on_epoch=5), "fit: on_epoch must be callable as on_epoch(state, record) or None; "
                           "got int"),
        (dict(data=nan), "fit: x_train holds 1 non-finite value(s) (NaN or ±inf)"),
    ]
    for change, message in cases:
        args = {"opt": opt, "state": state, "data": ds, **change}
        on_epoch = args.pop("on_epoch", None)
        with pytest.raises(ValueError, match=__import__("re").escape(message)):
            train.fit(net, args["opt"], args["state"], args["data"], epochs=1, batch_size=8,
                      on_epoch=on_epoch)
    with pytest.raises(ValueError, match="evaluate: x must hold at least one sample; got "
                       r"shape \(0, 4\)"):
        train.evaluate(net, state.params, ds.x_test[:0], ds.y_test[:0])


def test_cli_divergence_says_what_was_saved_and_keeps_the_last_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    path = ck / "checkpoint.safetensors"
    common = ["train", "--dataset", "iris", "--batch-size", "30", "--skip-gradcheck",
              "--optimizer", "sgd", "--checkpoint-dir", str(ck)]
    assert cli.main([*common, "--epochs", "1", "--lr", "3e38"]) == 1
    err = capsys.readouterr().err
    assert "error: training diverged: " in err and " at epoch 1, step " in err
    assert (f"nothing was saved: no epoch of this run finished before it diverged, so there is "
            f"no {path}") in err
    assert "kept" not in err and not ck.exists()
    assert cli.main([*common, "--epochs", "1", "--lr", "0.01"]) == 0
    before = path.read_bytes()
    capsys.readouterr()
    assert cli.main([*common, "--epochs", "3", "--lr", "3e38", "--resume"]) == 1
    err = capsys.readouterr().err
    assert " at epoch 2, step " in err
    assert f"the last good checkpoint {path} (epoch 1) is left as it was" in err
    assert path.read_bytes() == before


def test_cli_plot_file_that_cannot_be_created_is_refused_before_training(tmp_path, capsys):
    too_long = tmp_path / ("c" * 300 + ".png")  # passes the directory checks
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "1", "--plot", str(too_long)])
    out, err = capsys.readouterr()
    assert rc == 2 and f"error: train: --plot: cannot write {too_long}: File name too long" in err
    assert "gradcheck" not in out
    # the probe leaves nothing behind, even when a later check stops the run
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "1", "--plot",
                   str(tmp_path / "c.png"), "--batch-size", "1000"])
    assert rc == 2 and os.listdir(tmp_path) == []
    (tmp_path / "old.png").write_bytes(b"old curves")
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "1", "--plot",
                   str(tmp_path / "old.png"), "--batch-size", "1000"])
    assert rc == 2 and (tmp_path / "old.png").read_bytes() == b"old curves"
