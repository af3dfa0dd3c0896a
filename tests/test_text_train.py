"""Character-level models: stepwise generation, fit_text, ``jaxbp train --model char-*``, sample.

Every training here shares one shape (batches of 4 windows of 16 characters of
a small text, an LSTM of 16 units on an embedding of 8, or a GPT of one layer of
8 channels), so the programs it compiles stay few and small.
"""

import contextlib
import functools
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp import (
    checkpoint,
    cli,
    generate,
    models,
    text,
    text_cli,
    text_train,
    train,
    train_cli,
)

SMALL = ["--hidden", "16", "--embed", "8", "--seq-len", "16", "--steps-per-epoch", "5",
         "--batch-size", "4"]
LINES = ("ROMEO: But soft, what light through yonder window breaks?\n"
         "JULIET: It is the east, and Juliet is the sun.\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "lines.txt"
    path.write_text(LINES * 40, encoding="utf-8")  # 4 KB: 3.7 KB training, 0.4 KB validation
    return str(path)


def _main(*argv):
    """``(exit status, stdout, stderr)`` of ``jaxbp ARGV``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Two epochs resumed to three, and three epochs in one go, with checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    resumed, whole = str(root / "resumed"), str(root / "whole")
    train_ = ("train", "--text", corpus, "--model", "char-lstm", *SMALL)
    first = _main(*train_, "--epochs", "2", "--checkpoint-dir", resumed,
                  "--plot", str(root / "curves.png"))
    second = _main(*train_, "--epochs", "3", "--checkpoint-dir", resumed, "--resume",
                   "--skip-gradcheck")
    third = _main(*train_, "--epochs", "3", "--checkpoint-dir", whole, "--skip-gradcheck")
    return {"first": first, "second": second, "third": third, "resumed": resumed,
            "whole": whole, "plot": str(root / "curves.png")}


def _restore(directory):
    path = os.path.join(directory, checkpoint.FILENAME)
    config = checkpoint.read_metadata(path)["config"]
    _, _, like = text_cli.new_state(config)
    return checkpoint.restore(path, like=like)


# --------------------------------------------------------------------- train


def test_train_checks_gradients_trains_and_saves(runs):
    rc, out, err = runs["first"]
    assert rc == 0, err
    assert "gradcheck (float64, one batch of 4, train mode): OK" in out
    assert "lines.txt: 3,780 training / 420 validation characters, 34 distinct" in out
    assert "nats/char" in out and "bits/char" in out and "tokens/s" in out
    assert "val=" in err and "bpc=" in err  # the tqdm bar
    assert open(runs["plot"], "rb").read(4) == b"\x89PNG"
    state, meta = _restore(runs["resumed"])
    history = meta["history"]
    assert history["epoch"] == [1, 2, 3] and history["step"] == [5, 10, 15]
    assert np.all(np.isfinite(history["val_loss"]))
    assert history["val_loss"][-1] < history["val_loss"][0]
    np.testing.assert_allclose(history["val_bpc"], np.array(history["val_loss"]) / math.log(2))
    config = meta["config"]
    assert config["vocab"] == text.load_text(text_path=config["text"]).vocab.to_dict()
    assert (config["model"], config["hidden"], config["embed"], config["clip"]) == (
        "char-lstm", [16], 8, 1.0)


def test_resume_gives_the_parameters_of_an_uninterrupted_run(runs):
    rc, out, err = runs["second"]
    assert rc == 0, err
    assert "resumed" in out and "at epoch 2 (step 10)" in out and "gradcheck" not in out
    assert runs["third"][0] == 0
    (resumed, meta_r), (whole, meta_w) = _restore(runs["resumed"]), _restore(runs["whole"])
    assert (resumed.epoch, resumed.step) == (whole.epoch, whole.step) == (3, 15)
    for a, b in zip(jax.tree.leaves((resumed.params, resumed.opt_state)),
                    jax.tree.leaves((whole.params, whole.opt_state)), strict=True):
        assert np.array_equal(a, b)
    for k in ("train_loss", "val_loss"):
        assert meta_r["history"][k] == meta_w["history"][k]


def test_sample_prints_the_prompt_and_the_requested_length(runs, capsys):
    argv = ["sample", "--checkpoint-dir", runs["resumed"], "--prompt", "ROMEO:", "--length",
            "40"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and out.endswith("\n") and len(out) == 6 + 40 + 1
    assert set(out) <= set(LINES)
    assert cli.main(argv) == 0 and capsys.readouterr().out == out  # --seed 0 both times
    assert cli.main([*argv, "--seed", "1", "--temperature", "2"]) == 0
    assert capsys.readouterr().out != out


TRAIN_ERRORS = [
    (["--model", "mlp"], "train: --model mlp does not suit --text {corpus}, a text; use --model "
     "char-rnn, char-lstm, char-gru, char-gpt"),
    (["--model", "char-lstm", "--dataset", "digits"], "train: give --dataset or --text, not "
     "both; got --dataset digits and --text {corpus}"),
    (["--model", "char-gru", "--hidden", "16,8"], "train: --hidden for a char model must be one "
     "width per recurrent layer, all equal (e.g. 256,256); got '16,8'"),
    (["--model", "char-rnn", "--seq-len", "500"], "train: --seq-len 500 needs 501 characters in "
     "each split; the validation split of lines.txt holds 420"),
    (["--model", "char-lstm", "--resume"], "train: --resume needs --checkpoint-dir"),
]


@pytest.mark.parametrize("options, message", TRAIN_ERRORS,
                         ids=[" ".join(o) for o, _ in TRAIN_ERRORS])
def test_bad_text_setups_are_errors_before_training(corpus, capsys, options, message):
    assert cli.main(["train", "--text", corpus, "--epochs", "1", *options]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message.format(corpus=corpus) in err, err
    assert "gradcheck" not in out


@pytest.mark.parametrize("options, message", [
    (["--model", "char-lstm", "--dataset", "digits"], "train: --model char-lstm does not suit "
     "--dataset digits: a char model learns from a text (--dataset shakespeare or --text PATH)"),
    (["--model", "cnn", "--dataset", "shakespeare"], "train: --model cnn does not suit --dataset "
     "shakespeare, a text; use --model char-rnn, char-lstm, char-gru, char-gpt"),
    (["--model", "char-lstm", "--text", "no/such.txt"],
     "read_text: text file no/such.txt does not exist"),
    (["--model", "mlp", "--dataset", "iris", "--seq-len", "8"], "train: --seq-len applies to "
     "the char models (char-rnn, char-lstm, char-gru, char-gpt); got it with --model mlp"),
    (["--model", "mlp", "--layers", "2"], "train: --layers applies to --model char-gpt; got it "
     "with --model mlp"),
    (["--model", "char-gru", "--data-dir", "idx"], "train: --data-dir applies to the IDX "
     "datasets (mnist, fashion-mnist), not to --dataset shakespeare"),
])
def test_models_and_data_must_match(capsys, options, message):
    assert cli.main(["train", "--epochs", "1", *options]) == 2
    assert message in capsys.readouterr().err


def test_clip_must_not_be_negative(corpus, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--text", corpus, "--model", "char-lstm", "--clip", "-1"])
    assert exit_.value.code == 2
    assert "argument --clip: expected a number ≥ 0 that float32 can hold; got '-1'" in (
        capsys.readouterr().err)


def test_resume_needs_the_same_model(runs, corpus, capsys):
    rc = cli.main(["train", "--text", corpus, "--model", "char-lstm", *SMALL, "--embed", "4",
                   "--epochs", "4", "--checkpoint-dir", runs["whole"], "--resume"])
    assert rc == 2
    assert "was trained with a different setup: embed 8 there, 4 now" in capsys.readouterr().err


# -------------------------------------------------------------------- sample


def test_sample_errors_name_the_problem(runs, tmp_path, capsys):
    directory = runs["resumed"]
    assert cli.main(["sample", "--checkpoint-dir", directory, "--prompt", "ROMEO€Z"]) == 2
    assert ("sample: --prompt holds 2 character(s) that are not in the model's vocabulary of "
            "34: 'Z', '€'") in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint-dir", directory, "--prompt", ""]) == 2
    assert "sample: --prompt must hold at least one character" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint-dir", str(tmp_path)]) == 2
    assert f"sample: --checkpoint-dir {tmp_path} holds no checkpoint" in capsys.readouterr().err
    net, opt = models.mlp(hidden=(4,), classes=3), optax.adam(1e-3)
    state = train.init_state(net, opt, jax.random.key(0), (4,), "float32")
    checkpoint.save(tmp_path / checkpoint.FILENAME, state,
                    config={"model": "mlp", "dataset": "iris"})
    assert cli.main(["sample", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "holds a mlp model trained on iris, not a char model" in capsys.readouterr().err


# ------------------------------------------------------------------ generate

VOCAB = text.CharVocab("abcd")


def _forced(cell, favourite: int):
    """A model whose logits are 30·one_hot(favourite) whatever it reads: Dense W = 0."""
    net = models.char_rnn(VOCAB.size, cell=cell, hidden=4, embed=3)
    params = net.init(jax.random.key(0), (1,), jnp.float32)
    params[-1] = {"W": jnp.zeros_like(params[-1]["W"]),
                  "b": 30.0 * jax.nn.one_hot(favourite, VOCAB.size, dtype=jnp.float32)}
    return net, params


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_forced_model_samples_its_one_character(cell):
    net, params = _forced(cell, favourite=2)
    out = generate.sample(net, params, VOCAB, "da", 7, temperature=0.5, key=jax.random.key(3))
    assert out == "da" + "c" * 7


def test_sampling_follows_softmax_over_temperature():
    net, params = _forced("rnn", favourite=0)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    params[-1]["b"] = jnp.log(jnp.asarray(p, jnp.float32))
    n = 4000
    for temperature in (1.0, 2.0):
        out = generate.sample(net, params, VOCAB, "a", n, temperature=temperature,
                              key=jax.random.key(0))
        freq = np.array([out[1:].count(c) for c in VOCAB.chars]) / n
        expected = p ** (1 / temperature) / np.sum(p ** (1 / temperature))
        assert np.max(np.abs(freq - expected)) < 0.03, (temperature, freq, expected)
    assert generate._generate._cache_size() >= 1
    before = generate._generate._cache_size()
    generate.sample(net, params, VOCAB, "a", n, temperature=0.3, key=jax.random.key(5))
    assert generate._generate._cache_size() == before  # another temperature and key: no compile
    assert generate.sample(net, params, VOCAB, "a", 5, key=jax.random.key(0), greedy=True) == (
        "a" + "d" * 5)  # the most likely character, p = 0.4


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_stepwise_logits_equal_the_forward_pass(cell):
    net = models.char_rnn(VOCAB.size, cell=cell, hidden=5, embed=3, num_layers=2)
    params = net.init(jax.random.key(1), (6,), jnp.float64)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB.size, (2, 6)), jnp.int32)
    stepwise = generate.stepwise_logits(net, params, ids)
    np.testing.assert_allclose(stepwise, net.forward(params, ids), rtol=0, atol=1e-12)


def test_sample_refuses_what_it_cannot_use():
    net, params = _forced("gru", favourite=0)
    key = jax.random.key(0)
    cases = [
        (dict(prompt=""), "sample: prompt must be a non-empty str"),
        (dict(prompt="abz!"), "sample: the prompt holds 2 character(s) outside the vocabulary "
         "of 4: '!', 'z'"),
        (dict(length=-1), "sample: length must be an int >= 0; got -1"),
        (dict(temperature=0.0), "sample: temperature must be a finite number > 0; got 0.0"),
        (dict(key=0), "sample: key must be a PRNG key"),
        (dict(vocab=text.CharVocab("abc")), "sample: the vocabulary has 3 characters but the "
         "network reads 4 ids and predicts 4"),
    ]
    for change, message in cases:
        kwargs = {"vocab": VOCAB, "prompt": "ab", "length": 3, "key": key, **change}
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(
                ")", r"\)")):
            generate.sample(net, params, kwargs.pop("vocab"), kwargs.pop("prompt"),
                            kwargs.pop("length"), **kwargs)
    wrong = [*params[:1], {**params[1], "Wh": params[1]["Wh"][:, :4]}, *params[2:]]
    with pytest.raises(ValueError, match=r"layers\[1\] GRU: params\['Wh'\] must have shape"):
        generate.sample(net, wrong, VOCAB, "ab", 3, key=key)
    mlp = models.mlp(hidden=(3,), classes=4)
    with pytest.raises(ValueError, match="sample: net must be a character model"):
        generate.sample(mlp, mlp.init(key, (2,)), VOCAB, "ab", 3, key=key)


# ------------------------------------------------------------------ fit_text


@pytest.fixture(scope="module")
def config(runs):
    """The config of the runs: the same network and optimizer share their compiled programs."""
    return checkpoint.read_metadata(os.path.join(runs["whole"], checkpoint.FILENAME))["config"]


def _fit(config, corpus, grad="manual", state=None, **kwargs):
    net, opt, fresh = text_cli.new_state(config)
    return text_train.fit_text(net, opt, fresh if state is None else state,
                               text.load_text(text_path=corpus), epochs=2, steps_per_epoch=5,
                               batch_size=4, length=16, grad=grad, progress=False, **kwargs)


def test_fit_text_manual_and_autodiff_agree(config, corpus):
    (manual, history), (auto, _) = _fit(config, corpus), _fit(config, corpus, grad="autodiff")
    assert history["compiled"] == 1 and history["steps"] == 10 and manual.step == 10
    for a, b in zip(jax.tree.leaves(manual.params), jax.tree.leaves(auto.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fit_text_stops_at_a_non_finite_loss(config, corpus):
    _, _, state = text_cli.new_state(config)
    embedding = {"W": state.params[0]["W"].at[:].set(jnp.nan)}
    state = state._replace(params=[embedding, *state.params[1:]])
    seen = []
    with pytest.raises(train.NonFiniteLossError, match="loss is nan at epoch 1, step 1 of 5"):
        _fit(config, corpus, state=state, on_epoch=lambda s, r: seen.append(r))
    assert seen == []


def test_fit_text_checks_its_arguments(config, corpus):
    net, opt, state = text_cli.new_state(config)
    data = text.load_text(text_path=corpus)
    fit = functools.partial(text_train.fit_text, epochs=1, steps_per_epoch=1, batch_size=1,
                            length=16)
    with pytest.raises(ValueError, match="fit_text: a window of length 16 needs 17 ids; the "
                       "val split holds 3"):
        fit(net, opt, state, data._replace(val_ids=data.val_ids[:3]))
    with pytest.raises(ValueError, match="fit_text: steps_per_epoch must be a positive int"):
        fit(net, opt, state, data, steps_per_epoch=0)
    with pytest.raises(ValueError, match="fit_text: state.opt_state is not a state of opt"):
        fit(net, optax.sgd(0.1, momentum=0.9), state, data)
    small = models.char_rnn(5, hidden=4, embed=2)
    params = small.init(jax.random.key(0), (16,), jnp.float32)  # (no jit: nothing to compile)
    small_state = train.TrainState(params, opt.init(params), jax.random.key(0))
    with pytest.raises(ValueError, match=r"fit_text: train split: .*ids must lie in \[0, 5\)"):
        fit(small, opt, small_state, data)


# ------------------------------------------------------------------ char-gpt

GPT_SMALL = ["--model", "char-gpt", "--layers", "1", "--heads", "2", "--d-model", "8",
             "--seq-len", "16", "--steps-per-epoch", "5", "--batch-size", "4", "--warmup", "2"]


@pytest.fixture(scope="module")
def gpt_runs(corpus, tmp_path_factory):
    """As ``runs`` for char-gpt: the first run plans its schedule for the three epochs."""
    root = tmp_path_factory.mktemp("gpt")
    resumed, whole = str(root / "resumed"), str(root / "whole")
    train_ = ("train", "--text", corpus, *GPT_SMALL)
    first = _main(*train_, "--epochs", "2", "--decay-steps", "15", "--checkpoint-dir", resumed)
    second = _main(*train_, "--epochs", "3", "--checkpoint-dir", resumed, "--resume",
                   "--skip-gradcheck")
    third = _main(*train_, "--epochs", "3", "--checkpoint-dir", whole, "--skip-gradcheck")
    return {"first": first, "second": second, "third": third, "resumed": resumed,
            "whole": whole}


def test_char_gpt_checks_gradients_and_trains_with_adamw(gpt_runs):
    rc, out, err = gpt_runs["first"]
    assert rc == 0, err
    assert ("char-gpt (1 layer, 2 heads, d_model 8, context 16) with 1,560 parameters"
            in out)
    assert ("AdamW (weight decay 0.1), learning rate 0 → 0.001 over 2 warmup steps, cosine "
            "to 0.0001 at step 15\n") in out
    assert "gradcheck (float64, one batch of 2, train mode): OK" in out
    assert "nats/char" in out and "tokens/s" in out
    state, meta = _restore(gpt_runs["resumed"])
    history, config = meta["history"], meta["config"]
    assert history["epoch"] == [1, 2, 3] and history["step"] == [5, 10, 15]
    assert np.all(np.isfinite(history["val_loss"]))
    assert all(np.diff(history["val_loss"]) < 0), history["val_loss"]
    assert {k: config[k] for k in ("model", "layers", "heads", "d_model", "tied", "seq_len",
                                   "optimizer", "lr", "weight_decay", "warmup", "decay_steps",
                                   "clip")} == {
        "model": "char-gpt", "layers": 1, "heads": 2, "d_model": 8, "tied": False,
        "seq_len": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": pytest.approx(0.1),
        "warmup": 2, "decay_steps": 15, "clip": 1.0}
    assert [layer.name for layer in text_cli.build_model(config).layers] == [
        "Embedding", "PositionEmbedding", "TransformerBlock", "LayerNorm", "Dense"]


def test_char_gpt_resumed_equals_uninterrupted(gpt_runs):
    rc, out, err = gpt_runs["second"]
    assert rc == 0, err
    assert "at epoch 2 (step 10)" in out and "cosine to 0.0001 at step 15\n" in out
    assert gpt_runs["third"][0] == 0, gpt_runs["third"][2]
    (resumed, meta_r), (whole, meta_w) = _restore(gpt_runs["resumed"]), _restore(
        gpt_runs["whole"])
    assert meta_w["config"]["decay_steps"] == 15  # --epochs × --steps-per-epoch
    assert (resumed.epoch, resumed.step) == (whole.epoch, whole.step) == (3, 15)
    for a, b in zip(jax.tree.leaves((resumed.params, resumed.opt_state)),
                    jax.tree.leaves((whole.params, whole.opt_state)), strict=True):
        assert np.array_equal(a, b)
    assert meta_r["history"]["val_loss"] == meta_w["history"]["val_loss"]


def test_char_gpt_resume_keeps_its_schedule(gpt_runs):
    path = os.path.join(gpt_runs["whole"], checkpoint.FILENAME)
    saved = checkpoint.read_metadata(path)["config"]
    parser = cli.build_parser()
    argv = ["train", "--text", saved["text"], *GPT_SMALL, "--resume", "--checkpoint-dir",
            gpt_runs["whole"]]
    config = text_cli._config(parser.parse_args([*argv, "--epochs", "6"]), saved)
    config["vocab"] = saved["vocab"]
    assert (config["warmup"], config["decay_steps"]) == (2, 15)  # not 6 × 5
    train_cli._check_resume(path, config, text_cli.GPT_STRUCTURAL)
    assert text_cli._schedule_line(config).endswith("; steps 16 to 30 train at 0.0001")
    config = text_cli._config(parser.parse_args([*argv, "--epochs", "4", "--decay-steps",
                                                 "20"]), saved)
    config["vocab"] = saved["vocab"]
    with pytest.raises(ValueError, match="was trained with a different setup: decay_steps 15 "
                       "there, 20 now"):
        train_cli._check_resume(path, config, text_cli.GPT_STRUCTURAL)


def test_sample_from_a_char_gpt(gpt_runs, capsys):
    prompt = "ROMEO: But soft, what light"  # longer than the context of 16
    argv = ["sample", "--checkpoint-dir", gpt_runs["resumed"], "--length", "30"]
    assert cli.main([*argv, "--prompt", prompt]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out) == len(prompt) + 30 + 1
    assert set(out) <= set(LINES)
    assert cli.main([*argv, "--prompt", prompt[-16:]]) == 0  # the characters it reads
    assert capsys.readouterr().out == prompt[-16:] + out[len(prompt):]
    assert cli.main([*argv, "--prompt", "R"]) == 0
    assert len(capsys.readouterr().out) == 1 + 30 + 1


GPT_ERRORS = [
    (["--model", "char-lstm", "--layers", "2"], "train: --layers applies to --model char-gpt; "
     "got it with --model char-lstm"),
    (["--model", "char-gru", "--tied"], "train: --tied applies to --model char-gpt; got it with "
     "--model char-gru"),
    (["--model", "char-gpt", "--embed", "8"], "train: --embed applies to the recurrent char "
     "models (char-rnn, char-lstm, char-gru); got it with --model char-gpt"),
    (["--model", "char-gpt", "--hidden", "64"], "train: --hidden 64 does not apply to --model "
     "char-gpt: its width is --d-model and its depth --layers"),
    (["--model", "char-gpt", "--optimizer", "sgd"], "train: --optimizer sgd does not apply to "
     "--model char-gpt: it trains with AdamW on a warmup-cosine schedule"),
    (["--model", "char-gpt", "--d-model", "10", "--heads", "4"], "train: --d-model 10 must be a "
     "multiple of --heads 4"),
    (["--model", "char-gpt", "--steps-per-epoch", "5", "--warmup", "5"], "train: --warmup 5 must "
     "be less than --decay-steps 5, the schedule's length"),
]


@pytest.mark.parametrize("options, message", GPT_ERRORS,
                         ids=[" ".join(o) for o, _ in GPT_ERRORS])
def test_options_a_model_does_not_take_are_errors(corpus, capsys, options, message):
    assert cli.main(["train", "--text", corpus, "--epochs", "1", *options]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err, err
    assert "gradcheck" not in out


def test_unset_is_what_train_holds_when_hidden_and_optimizer_are_not_given():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--model", "char-gpt"])
    assert {k: getattr(args, k) for k in text_cli.UNSET} == text_cli.UNSET


def _filled(net, values):
    """Parameters for ``net`` (context 5 or more) made by ``values(shape)``, float64: no
    initialisation to compile."""
    shapes = jax.eval_shape(lambda k: net.init(k, (5,), jnp.float64), jax.random.key(0))
    return jax.tree.map(lambda a: jnp.asarray(values(a.shape), jnp.float64), shapes)


GPT_CONFIG = {"model": "char-gpt", "vocab": {"chars": "abcd"}, "seq_len": 5, "layers": 1,
              "heads": 1, "d_model": 4, "tied": False, "dropout": 0.0, "optimizer": "adamw",
              "lr": 1e-2, "weight_decay": 0.5, "warmup": 3, "decay_steps": 13, "clip": 1.0}


def test_char_gpt_learning_rate_warms_up_then_follows_the_cosine():
    lr = GPT_CONFIG["lr"]
    schedule = text_cli.lr_schedule(GPT_CONFIG)
    np.testing.assert_allclose([float(schedule(t)) for t in (0, 1, 3, 8, 13, 40)],
                               [0, lr / 3, lr, 0.55 * lr, 0.1 * lr, 0.1 * lr], rtol=1e-6)
    net, opt = text_cli.build_model(GPT_CONFIG), text_cli.build_optimizer(GPT_CONFIG)
    assert text_cli.build_optimizer(dict(GPT_CONFIG)) is opt  # one object: jit reuses programs
    params = _filled(net, lambda shape: np.full(shape, 0.5))
    decayed = train.decay_mask(net)(params)
    assert not all(jax.tree.leaves(decayed)) and any(jax.tree.leaves(decayed))
    grads, opt_state = jax.tree.map(jnp.ones_like, params), opt.init(params)
    update = jax.jit(opt.update)
    for t in range(5):
        updates, opt_state = update(grads, opt_state, params)
        # A constant gradient (clipped, still constant): Adam's m̂/√v̂ = 1; AdamW adds λ·p
        # on the decayed leaves; both scaled by −η_t.
        for u, p, d in zip(*map(jax.tree.leaves, (updates, params, decayed)), strict=True):
            np.testing.assert_allclose(u, -float(schedule(t)) * (1 + 0.5 * p * d), rtol=1e-5)


# --------------------------------------------------------------- generate, GPT


def _gpt(tied):
    net = models.gpt(VOCAB.size, context=5, d_model=8, num_heads=2, num_layers=1, tied=tied)
    rng = np.random.default_rng(2)
    return net, _filled(net, lambda shape: rng.normal(0, 0.5, shape))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_gpt_sampler_reads_the_logits_of_the_last_context_ids(tied):
    net, params = _gpt(tied)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB.size, (2, 9)))
    stepwise = generate.stepwise_logits(net, params, ids)  # 9 positions, context 5
    for t in (1, 4, 7, 8):  # prefixes shorter than the context, as long, longer
        prefix = ids[:, max(0, t + 1 - 5):t + 1]
        np.testing.assert_allclose(stepwise[:, t], net.forward(params, prefix)[:, -1],
                                   rtol=0, atol=1e-12)


def test_gpt_sampling_is_deterministic_per_seed_and_one_program():
    net, params = _gpt(tied=False)
    before = generate._generate_windowed._cache_size()
    outs = {seed: generate.sample(net, params, VOCAB, "abcdabc", 20, key=jax.random.key(seed))
            for seed in (0, 1)}
    assert outs[0] == generate.sample(net, params, VOCAB, "abcdabc", 20, key=jax.random.key(0))
    assert outs[0] != outs[1] and all(len(o) == 7 + 20 for o in outs.values())
    # longer than the context of 5: only the prompt's last 5 characters count
    assert generate.sample(net, params, VOCAB, "cdabc", 20, key=jax.random.key(0)) == outs[0][2:]
    assert len(generate.sample(net, params, VOCAB, "a", 20, key=jax.random.key(0))) == 21
    assert generate._generate_windowed._cache_size() == before + 1  # any prompt, one program
