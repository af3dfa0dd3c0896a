"""The command line's finish: ``gradcheck --layer``, ``--version``, help that tells the
defaults, a missing ``--data-dir``, Ctrl-C during training, the progress bar's ETA, the
curves' title, and the worked example in both precisions."""

import contextlib
import doctest
import io
import re
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import checkpoint, cli, data, gradcheck_cli, models, text_cli, text_train, train
from jaxbp.train_cli import DEFAULTS


def _main(*argv):
    """``(exit status, stdout, stderr)`` of ``jaxbp ARGV``; argparse's exit is the status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as exit_:
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()


def _help(*command):
    rc, out, _ = _main(*command, "--help")
    assert rc == 0
    return out


def _flat(text):
    """Help text on one line, argparse's wrapping undone (it breaks after hyphens too)."""
    return re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", text))


# ------------------------------------------------------------------ gradcheck --layer
LAYERS = textwrap.dedent('''
    import dataclasses
    from typing import NamedTuple

    import jax
    import jax.numpy as jnp

    from jaxbp.layers import Layer


    class Residuals(NamedTuple):
        x: jax.Array


    @dataclasses.dataclass(frozen=True, repr=False)
    class Swish(Layer):
        """y = x σ(x); dx = dy (σ + x σ (1 − σ))."""

        def forward(self, params, state, x, ctx):
            return x * jax.nn.sigmoid(x), state, Residuals(x)

        def backward(self, params, residuals, dy):
            s = jax.nn.sigmoid(residuals.x)
            return {}, dy * (s + residuals.x * s * (1 - s))


    @dataclasses.dataclass(frozen=True, repr=False)
    class SwishMissingTerm(Swish):
        def backward(self, params, residuals, dy):
            return {}, dy * jax.nn.sigmoid(residuals.x)


    @dataclasses.dataclass(frozen=True, repr=False)
    class Project(Layer):
        """y = x @ W, W of shape (in, units)."""

        units: int

        def init(self, key, input_shape, dtype=None):
            W = jax.random.normal(key, (input_shape[-1], self.units), dtype)
            return {"W": W}, {}, (*input_shape[:-1], self.units)

        def check(self, params, state, x, ctx):
            if x.shape[-1] != params["W"].shape[0]:
                raise ValueError(f"Project: x must end in {params['W'].shape[0]}; got {x.shape}")

        def forward(self, params, state, x, ctx):
            return x @ params["W"], state, Residuals(x)

        def backward(self, params, residuals, dy):
            x = residuals.x
            return {"W": x.T @ dy}, dy @ params["W"].T


    @dataclasses.dataclass(frozen=True, repr=False)
    class Crashes(Swish):
        def backward(self, params, residuals, dy):
            raise RuntimeError("not written yet")


    def not_a_layer():
        return None
''')


@pytest.fixture
def user_layers(tmp_path, monkeypatch):
    """``polish_user_layers.py`` in the current directory (a fresh module for each test)."""
    (tmp_path / "polish_user_layers.py").write_text(LAYERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "polish_user_layers", raising=False)
    yield tmp_path / "polish_user_layers.py"
    sys.modules.pop("polish_user_layers", None)


def test_a_layer_of_ones_own_is_checked_from_its_module(user_layers):
    path = list(sys.path)
    rc, out, err = _main("gradcheck", "--layer", "polish_user_layers:Swish", "--input-shape",
                         "8,16")
    assert rc == 0 and err == "", err
    assert "gradcheck  Swish() on input (4, 8, 16)" in out
    assert out.rstrip().splitlines()[-1].startswith("OK: ")
    assert sys.path == path  # the current directory was on it for the import only


def test_a_wrong_backward_fails_with_exit_status_1(user_layers):
    rc, out, _ = _main("gradcheck", "--layer", "polish_user_layers:SwishMissingTerm",
                       "--input-shape", "5")
    assert rc == 1 and "FAIL: first divergence from the output: SwishMissingTerm()" in out


def test_layer_args_build_the_layer_and_a_file_path_works_too(user_layers):
    modules = set(sys.modules)
    rc, out, err = _main("gradcheck", "--layer", f"{user_layers}:Project", "--layer-args",
                         '{"units": 3}', "--input-shape", "5", "--json", "--dtype", "float32")
    assert rc == 0, err
    assert '"path": "W"' in out and '"ok": true' in out
    assert set(sys.modules) == modules  # the file was run, not left behind as a module


LAYER_ERRORS = [
    (["--layer", "polish_missing_module:Swish", "--input-shape", "4"],
     "error: gradcheck: --layer: no module named 'polish_missing_module' in the current "
     "directory {cwd} or on sys.path; give an importable module or a path/to/file.py"),
    (["--layer", "polish_user_layers:Swsh", "--input-shape", "4"],
     "error: gradcheck: --layer polish_user_layers:Swsh: polish_user_layers has no 'Swsh'; "
     "its jaxbp layers: Crashes, Project, Swish, SwishMissingTerm"),
    (["--layer", "polish_user_layers:not_a_layer", "--input-shape", "4"],
     "error: gradcheck: --layer polish_user_layers:not_a_layer: not_a_layer is a function, "
     "not a jaxbp layer (a subclass of jaxbp.layers.Layer); its jaxbp layers: Crashes, "
     "Project, Swish, SwishMissingTerm"),
    (["--layer", "polish_user_layers:Residuals", "--input-shape", "4"],
     "error: gradcheck: --layer polish_user_layers:Residuals: Residuals is a class, not a "
     "jaxbp layer"),
    (["--layer", "polish_user_layers:Project", "--input-shape", "4"],
     "error: gradcheck: --layer polish_user_layers:Project: Project() failed: TypeError: "
     "Project.__init__() missing 1 required positional argument: 'units'; pass its arguments "
     "as --layer-args '{\"name\": value, ...}'"),
    (["--layer", "polish_user_layers:Project", "--layer-args", '{"width": 3}',
      "--input-shape", "4"],
     "error: gradcheck: --layer polish_user_layers:Project: Project(width=3) failed: "
     "TypeError: Project.__init__() got an unexpected keyword argument 'width'\n"),
    (["--layer", "polish_user_layers:Project", "--layer-args", '{"units": 3}',
      "--input-shape", "4,0"],
     "jaxbp gradcheck: error: argument --input-shape: expected comma-separated positive ints "
     "(the input shape without the batch axis, e.g. 8,16); got '4,0'"),
    (["--layer", "polish_user_layers:Project", "--layer-args", "[3]", "--input-shape", "4"],
     "jaxbp gradcheck: error: argument --layer-args: expected a JSON object of keyword "
     "arguments, e.g. '{\"units\": 4}'; got '[3]', a JSON list"),
    (["--layer", "polish_user_layers:Project", "--layer-args", "{units: 3}",
      "--input-shape", "4"],
     "jaxbp gradcheck: error: argument --layer-args: expected a JSON object of keyword "
     "arguments, e.g. '{\"units\": 4}'; got '{units: 3}' (Expecting property name"),
    (["--layer", "polish_user_layers:Swish"],
     "error: gradcheck: --layer polish_user_layers:Swish needs --input-shape, the layer's "
     "input shape without the batch axis (e.g. --input-shape 8,16)"),
    (["--layer", "Swish", "--input-shape", "4"],
     "error: gradcheck: --layer must be MODULE:CLASS or path/to/file.py:CLASS; got 'Swish'"),
    (["--layer", "no/such/file.py:Swish", "--input-shape", "4"],
     "error: gradcheck: --layer: no/such/file.py does not exist; expected a .py file"),
    (["--layer", "polish_user_layers:Swish", "--model", "mlp", "--input-shape", "4"],
     "error: gradcheck: give --model or --layer, not both; got --model mlp and --layer "
     "polish_user_layers:Swish"),
    (["--input-shape", "4"],
     "error: gradcheck: --input-shape applies to --layer (a layer of your own); got it "
     "without --layer"),
]


@pytest.mark.parametrize("argv, message", LAYER_ERRORS, ids=[" ".join(a) for a, _ in LAYER_ERRORS])
def test_a_layer_that_cannot_be_checked_is_a_one_line_error(user_layers, argv, message):
    rc, out, err = _main("gradcheck", *argv)
    assert rc == 2 and out == "", out
    assert message.replace("{cwd}", str(user_layers.parent)) in err, err
    assert "Traceback" not in err


def test_errors_of_the_layers_own_code_name_it_and_the_line(user_layers):
    rc, _, err = _main("gradcheck", "--layer", "polish_user_layers:Crashes", "--input-shape", "4")
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    line = LAYERS.splitlines().index('        raise RuntimeError("not written yet")') + 1
    assert err.startswith("error: gradcheck: --layer polish_user_layers:Crashes with "
                          "--input-shape 4: ")
    assert "RuntimeError" in err and "not written yet" in err and "backward" in err
    assert f"{user_layers.name}:{line}" in err
    (user_layers.parent / "polish_broken.py").write_text("import polish_not_installed\n")
    rc, _, err = _main("gradcheck", "--layer", "polish_broken:X", "--input-shape", "4")
    assert rc == 2 and err == (
        f"error: gradcheck: --layer: importing polish_broken failed: ModuleNotFoundError at "
        f"{user_layers.parent / 'polish_broken.py'}:1 in <module>: No module named "
        f"'polish_not_installed'\n")


def test_the_presets_in_the_help_are_read_from_their_networks():
    text = _help("gradcheck")
    presets = text[text.index("presets (--model):"):]
    for name, case in gradcheck_cli.PRESETS.items():
        net, _, x, _ = case(jax.random.key(0), 2)
        parts = gradcheck_cli.describe(case)
        assert parts[0] == "×".join(map(str, x.shape[1:]))
        assert [p.split("(")[0] for p in parts[1:-1]] == [f"→ {layer.name}"
                                                         for layer in net.layers]
        assert parts[-1].startswith(f"· loss {net.loss_fn.name}")
        assert f" {name} {' '.join(parts)}" in re.sub(r"\s+", " ", presets)
    assert ("mlp 8 → Dense(16) → ReLU → Dense(16) → ReLU → Dense(4) · loss SoftmaxCrossEntropy, "
            "weight decay 0.001") in re.sub(r"\s+", " ", presets)
    assert "→ Conv2D(4, 3×3) → ReLU → MaxPool2D(2×2)" in re.sub(r"\s+", " ", presets)
    assert max(map(len, presets.splitlines())) <= 78


def test_every_dtype_option_says_what_it_does():
    for command in ("gradcheck", "bench"):
        assert re.search(r"--dtype \{[a-z0-9,]+\} [a-z%(]", _flat(_help(command))), command


# ------------------------------------------------------------------------ --version
def test_version():
    rc, out, _ = _main("--version")
    assert rc == 0 and out == f"jaxbp {jaxbp.__version__}\n" == "jaxbp 0.1.0\n"


# ---------------------------------------------------------------------- train --help
def _train_help(dest):
    """The help ``jaxbp train --help`` shows for the option stored as ``dest``."""
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    return next(a.help for a in train_parser._actions if a.dest == dest)


def _stated_defaults(entry):
    """``{model: value}`` from an option's help (``default: V for m, …; …``)."""
    every = re.search(r"default (\S+) for every model", entry)
    if every:
        return dict.fromkeys(DEFAULTS, float(every.group(1)))
    stated = {}
    for value, models_ in re.findall(r"([0-9.e-]+) for ([a-z, -]+?)(?:;|\))",
                                     entry.split("default: ", 1)[1]):
        stated.update(dict.fromkeys(models_.split(", "), float(value)))
    return stated


@pytest.mark.parametrize("key", ["lr", "epochs", "batch_size", "weight_decay"])
def test_train_help_states_the_defaults_each_model_trains_with(key):
    stated = _stated_defaults(_train_help(key))
    assert _flat(_train_help(key)) in _flat(_help("train"))  # shown as it is
    parser = cli.build_parser()
    for model in DEFAULTS:  # what the run's config takes when the option is not given
        args = parser.parse_args(["train", "--model", model])
        config = (text_cli._config(args) if model in text_cli.MODELS
                  else jaxbp.train_cli._config(args))
        assert stated[model] == pytest.approx(config[key]), (model, stated)


def test_train_help_says_which_options_are_the_char_models_and_their_defaults():
    line = _flat(_help("train"))
    assert "The options here apply to them only (another --model refuses them)" in line
    for option, default in (("--seq-len SEQ_LEN", "seq_len"),
                            ("--steps-per-epoch STEPS_PER_EPOCH", "steps_per_epoch"),
                            ("--embed EMBED", "embed")):
        entry = line[line.rindex(option):]  # (the last: the usage line comes first)
        assert f"(default {text_cli.TEXT_DEFAULTS[default]})" in entry[:200], option
    assert "(default --dataset shakespeare)" in line
    assert "(default 1 for the char models, none for the others)" in line


# ---------------------------------------------------------------------- --data-dir
def test_an_idx_dataset_without_data_dir_names_the_option(tmp_path):
    for dataset in ("mnist", "fashion-mnist"):
        rc, out, err = _main("train", "--dataset", dataset)
        assert rc == 2 and out == ""
        assert err == (f"error: train: --dataset {dataset} needs --data-dir DIR, the directory "
                       f"with its four IDX files (train-images-idx3-ubyte[.gz], …); got no "
                       f"--data-dir\n")
    rc, _, err = _main("train", "--dataset", "iris", "--data-dir", str(tmp_path))
    assert rc == 2 and err == ("error: train: --data-dir applies to the IDX datasets (mnist, "
                               "fashion-mnist), not to --dataset iris\n")


# --------------------------------------------------------------------------- Ctrl-C
def _interrupt_on_call(monkeypatch, owner, name, call):
    """Make ``owner.name`` raise KeyboardInterrupt on its ``call``-th call (1-based)."""
    real, calls = getattr(owner, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupting)


IRIS = ("train", "--dataset", "iris", "--epochs", "3", "--skip-gradcheck")


def test_ctrl_c_keeps_the_last_saved_epoch_and_says_how_to_resume(tmp_path, monkeypatch):
    ck = str(tmp_path / "ck")
    _interrupt_on_call(monkeypatch, checkpoint, "save", 2)  # while saving epoch 2
    rc, _, err = _main(*IRIS, "--checkpoint-dir", ck)
    assert rc == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted at epoch 2; checkpoint of epoch 1 kept in {ck}; "
                                    f"rerun with --resume to continue")
    assert checkpoint.read_metadata(f"{ck}/{checkpoint.FILENAME}")["epoch"] == 1
    monkeypatch.undo()
    rc, out, err = _main(*IRIS, "--checkpoint-dir", ck, "--resume")
    assert rc == 0 and f"resumed {ck}/{checkpoint.FILENAME} at epoch 1 (step " in out, err


def test_ctrl_c_without_a_checkpoint_says_nothing_was_saved(tmp_path, monkeypatch):
    _interrupt_on_call(monkeypatch, train, "evaluate", 5)  # two per epoch: in epoch 3
    rc, out, err = _main(*IRIS)
    assert rc == 130 and "Traceback" not in err and "test accuracy" not in out
    assert err.splitlines()[-1] == ("interrupted at epoch 3; nothing was saved (pass "
                                    "--checkpoint-dir to keep finished epochs)")
    monkeypatch.undo()
    _interrupt_on_call(monkeypatch, train, "evaluate", 1)
    rc, _, err = _main(*IRIS, "--checkpoint-dir", str(tmp_path / "ck"))
    assert rc == 130 and err.splitlines()[-1] == (
        f"interrupted at epoch 1; nothing was saved yet, so {tmp_path / 'ck'} holds no "
        f"checkpoint")


SMALL_TEXT = ("--model", "char-lstm", "--hidden", "16", "--embed", "8", "--seq-len", "16",
              "--steps-per-epoch", "5", "--batch-size", "4", "--skip-gradcheck")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "lines.txt"
    path.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 80)
    return str(path)


def test_ctrl_c_in_a_char_model_run(corpus, tmp_path, monkeypatch):
    ck = str(tmp_path / "ck")
    _interrupt_on_call(monkeypatch, checkpoint, "save", 2)
    rc, _, err = _main("train", "--text", corpus, *SMALL_TEXT, "--epochs", "3",
                       "--checkpoint-dir", ck)
    assert rc == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted at epoch 2; checkpoint of epoch 1 kept in {ck}; "
                                    f"rerun with --resume to continue")
    monkeypatch.undo()
    _interrupt_on_call(monkeypatch, text_train, "_val_loss", 3)  # one per epoch: in epoch 3
    rc, _, err = _main("train", "--text", corpus, *SMALL_TEXT, "--epochs", "3")
    assert rc == 130 and err.splitlines()[-1] == (
        "interrupted at epoch 3; nothing was saved (pass --checkpoint-dir to keep finished "
        "epochs)")


def test_ctrl_c_before_training_is_one_line_too(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxbp.train_cli, "run", interrupted)
    assert _main("train") == (130, "", "jaxbp train: interrupted\n")


# --------------------------------------------------------------- the progress bar
class _Bars:
    """A stand-in for ``tqdm.auto.tqdm`` that logs what the bars are asked to do."""

    def __init__(self):
        self.log = []

    def __call__(self, *, total, initial, unit, desc, leave=True):
        log = self.log
        log.append(("bar", desc, initial, total, leave))

        class Bar:
            def set_postfix(self, postfix, refresh=True):
                log.append(("postfix", sorted(postfix)))

            def set_description(self, desc, refresh=True):
                log.append(("desc", desc))

            def update(self, n):
                log.append(("update", n))

            def close(self):
                log.append(("close", desc))

        return Bar()


def _logged_fit(monkeypatch, epochs, progress):
    import tqdm.auto

    bars = _Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    ds = data.load("iris")
    net, opt = models.mlp(hidden=(8,), classes=ds.classes), optax.adam(1e-2)
    state = train.init_state(net, opt, jax.random.key(0), ds.input_shape, "float32")
    state, _ = train.fit(net, opt, state, ds, epochs=epochs, batch_size=16, progress=progress,
                         on_epoch=lambda s, r: bars.log.append(("epoch", s.epoch)))
    return state, [e for e in bars.log if e[0] != "postfix"]


def test_the_bar_that_shows_the_eta_starts_after_the_compiling_epoch(monkeypatch):
    state, log = _logged_fit(monkeypatch, 3, progress=True)
    assert log == [("bar", "train (compiling)", 0, 3, False), ("epoch", 1),
                   ("close", "train (compiling)"), ("bar", "train", 1, 3, True),
                   ("epoch", 2), ("update", 1), ("epoch", 3), ("update", 1), ("close", "train")]
    quiet, _ = _logged_fit(monkeypatch, 3, progress=False)
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((quiet.params, quiet.opt_state))):  # the bars only watch
        np.testing.assert_array_equal(a, b)
    _, log = _logged_fit(monkeypatch, 1, progress=True)  # one epoch: its bar stays
    assert log == [("bar", "train (compiling)", 0, 1, True), ("epoch", 1),
                   ("desc", "train"), ("update", 1), ("close", "train (compiling)")]


def test_the_text_bar_starts_again_after_the_first_epoch(corpus, monkeypatch):
    import tqdm.auto

    bars = _Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    rc, _, err = _main("train", "--text", corpus, *SMALL_TEXT, "--epochs", "2")
    assert rc == 0, err
    assert [e[:3] for e in bars.log if e[0] == "bar"] == [("bar", "train (compiling)", 0),
                                                          ("bar", "train", 1)]


# ------------------------------------------------------------------ the curves' title
def test_the_curves_are_titled_with_dataset_and_model(tmp_path, corpus):
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        rc, _, err = _main("train", "--dataset", "iris", "--epochs", "1", "--skip-gradcheck",
                           "--plot", str(tmp_path / "digits.svg"))
        assert rc == 0, err
        rc, _, err = _main("train", "--text", corpus, *SMALL_TEXT, "--epochs", "1", "--plot",
                           str(tmp_path / "text.svg"))
        assert rc == 0, err
    assert "iris · mlp" in (tmp_path / "digits.svg").read_text()
    assert "lines.txt · char-lstm" in (tmp_path / "text.svg").read_text()


# ------------------------------------------------------------- the worked example
@pytest.mark.parametrize("x64", [False, True], ids=["x64 off", "x64 on"])
def test_the_worked_example_shows_the_tutorials_J_with_x64_off_or_on(x64):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    with jax.enable_x64(x64):
        for test in doctest.DocTestFinder().find(models.worked_example, "worked_example",
                                                 globs={"worked_example": models.worked_example}):
            runner.run(test)
    assert runner.failures == 0 and runner.tries == 5
