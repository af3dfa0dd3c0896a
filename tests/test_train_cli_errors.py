"""``jaxbp train`` rejects bad options with ``error: …`` and exit status 2, before any training."""

import jax
import pytest

from jaxbp import checkpoint, cli

BAD_OPTIONS = [
    (["--hidden", "abc"], "train: --hidden must be comma-separated positive ints; got 'abc'"),
    (["--hidden", ""], "train: --hidden must be comma-separated positive ints; got ''"),
    (["--hidden", "16,0"], "train: --hidden must be comma-separated positive ints; got '16,0'"),
    (["--hidden", "-4"], "train: --hidden must be comma-separated positive ints; got '-4'"),
    (["--model", "cnn", "--filters", "4"],
     "train: --filters must be two comma-separated positive ints (one per conv layer); got '4'"),
    (["--batch-size", "1000"], "fit: batch_size 1000 exceeds the 120 training samples"),
    (["--devices", str(len(jax.devices()) + 1)],
     f"parallel: devices must be an int in [1, {len(jax.devices())}]"),
    (["--plot", ""], "train: --plot: expected a file path; got ''"),
    (["--checkpoint-dir", ""], "train: --checkpoint-dir needs a directory path; got ''"),
]


def _train(capsys, *options):
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "1", *options])
    out, err = capsys.readouterr()
    assert "gradcheck" not in out and "test accuracy" not in out  # failed before any work
    return rc, err


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_an_error_before_training(capsys, options, message):
    rc, err = _train(capsys, *options)
    assert rc == 2 and err.startswith("error: ") and message in err, err


BAD_NUMBERS = [
    (["--weight-decay", "-1"],
     "argument --weight-decay: expected a number ≥ 0 that float32 can hold; got '-1'"),
    (["--weight-decay", "inf"],
     "argument --weight-decay: expected a number ≥ 0 that float32 can hold; got 'inf'"),
    (["--epochs", "-3"], "argument --epochs: expected a positive int; got '-3'"),
    (["--epochs", "0"], "argument --epochs: expected a positive int; got '0'"),
    (["--epochs", "2.5"], "argument --epochs: expected a positive int; got '2.5'"),
    (["--lr", "-1"], "argument --lr: expected a number > 0 that float32 can hold; got '-1'"),
    (["--lr", "0"], "argument --lr: expected a number > 0 that float32 can hold; got '0'"),
    (["--lr", "nan"], "argument --lr: expected a number > 0 that float32 can hold; got 'nan'"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive int; got '0'"),
    (["--batch-size", "-5"], "argument --batch-size: expected a positive int; got '-5'"),
    (["--lr", "1e300"], "argument --lr: expected a number > 0 that float32 can hold; got '1e300'"),
    (["--seed", "-1"], "argument --seed: expected an int in [0, 2**32); got '-1'"),
    (["--seed", str(2**70)], f"argument --seed: expected an int in [0, 2**32); got '{2**70}'"),
    (["--devices", "0"], "argument --devices: expected a positive int; got '0'"),
]


@pytest.mark.parametrize("options, message", BAD_NUMBERS, ids=[" ".join(o) for o, _ in BAD_NUMBERS])
def test_bad_number_is_an_argparse_error(capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        _train(capsys, *options)
    assert exit_.value.code == 2
    assert f"jaxbp train: error: {message}" in capsys.readouterr().err


def test_checkpoint_dir_must_be_a_creatable_directory(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    rc, err = _train(capsys, "--checkpoint-dir", str(afile))
    assert rc == 2 and f"train: --checkpoint-dir must be a directory; {afile} is a file" in err
    rc, err = _train(capsys, "--checkpoint-dir", str(afile / "sub"))
    assert rc == 2
    assert f"train: --checkpoint-dir cannot be created: {afile} is not a writable directory" in err
    # a later check failing leaves nothing behind: the directory is made by the first save
    rc, err = _train(capsys, "--checkpoint-dir", str(tmp_path / "new" / "ck"),
                     "--batch-size", "1000")
    assert rc == 2 and not (tmp_path / "new").exists()


def test_existing_checkpoint_needs_resume(tmp_path, capsys):
    (tmp_path / checkpoint.FILENAME).write_bytes(b"not overwritten")
    rc, err = _train(capsys, "--checkpoint-dir", str(tmp_path))
    assert rc == 2
    assert (f"train: --checkpoint-dir {tmp_path} already holds a checkpoint; pass --resume "
            "to continue it or choose another directory") in err
    assert (tmp_path / checkpoint.FILENAME).read_bytes() == b"not overwritten"


def test_plot_path_is_checked_before_training(tmp_path, capsys):
    rc, err = _train(capsys, "--plot", str(tmp_path))
    assert rc == 2
    assert f"train: --plot: expected a file path; {str(tmp_path)!r} is a directory" in err
    missing = tmp_path / "missing" / "x.png"
    rc, err = _train(capsys, "--plot", str(missing))
    assert rc == 2
    where = f"directory {str(missing.parent)!r} of {str(missing)!r}"
    assert f"train: --plot: {where} does not exist" in err
    (tmp_path / "curves.png").mkdir()  # what --plot curves would write
    rc, err = _train(capsys, "--plot", str(tmp_path / "curves"))
    assert rc == 2
    assert f"expected a file path; {str(tmp_path / 'curves.png')!r} is a directory" in err
    rc, err = _train(capsys, "--plot", str(tmp_path / "curves.xyz"))
    assert rc == 2 and "cannot write .xyz files; use one of " in err and "png" in err


def test_plot_format_follows_the_extension(tmp_path):
    from jaxbp.train_cli import plot_history

    history = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "test_loss": [1.1, 0.6],
               "train_accuracy": [0.5, 0.7], "test_accuracy": [0.4, 0.6]}
    assert plot_history(history, str(tmp_path / "c.svg"), "iris · mlp") == str(tmp_path / "c.svg")
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]
    assert plot_history(history, str(tmp_path / "c"), "iris · mlp") == str(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("mlp- bn", "mlp-bn")  # (wrapped)
    for expected in ("(default digits)", "(default mlp; mlp-bn adds BatchNorm and Dropout 0.1",
                     "(default adam; char-gpt always uses AdamW)",
                     "default: 0.001 for mlp, mlp-bn, cnn, char-gpt; 0.002 for",
                     "default: 30 for mlp, mlp-bn; 25 for cnn; 10 for"):
        assert expected in text


def test_a_file_in_the_output_path_is_named_as_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    rc, err = _train(capsys, "--plot", str(afile / "x.png"))
    assert rc == 2 and f"train: --plot: {str(afile)!r} in " in err
    assert "is a file, not a directory" in err


def test_a_model_that_does_not_suit_the_images_is_a_usage_error(tmp_path, capsys):
    from tests.test_data import _write_mnist

    _write_mnist(tmp_path, size=2)  # 2×2 images: too small for the CNN's two poolings
    rc = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--model", "cnn",
                   "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and ("error: train: --model cnn does not suit mnist (input shape (2, 2, 1)): "
                        "cnn: input_shape must be at least 4×4 for two 2×2 poolings; got "
                        "(2, 2, 1)") in err, err


def test_a_checkpoint_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, capsys,
                                                                      monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "1", "--skip-gradcheck",
                   "--checkpoint-dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: train: cannot write the checkpoint " in err
    assert "No space left on device" in err


def test_resuming_a_finished_run_neither_checks_nor_trains(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert cli.main(["train", "--dataset", "iris", "--epochs", "1", "--skip-gradcheck",
                     "--checkpoint-dir", ck]) == 0
    capsys.readouterr()
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "1", "--checkpoint-dir", ck,
                   "--resume", "--plot", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "nothing to do: already at epoch 1 of 1" in out
    assert "gradcheck" not in out and (tmp_path / "c.png").exists()


def test_out_of_device_memory_is_a_one_line_error(capsys, monkeypatch):
    import jax

    from jaxbp import train_cli

    def exhausted(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 41 bytes")

    monkeypatch.setattr(train_cli, "run", exhausted)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxbp train: error: out of device memory (RESOURCE_EXHAUSTED: Out of "
                          "memory allocating 41 bytes)")


def test_a_resumed_history_must_hold_per_epoch_lists(tmp_path, capsys):
    import json

    import safetensors
    import safetensors.numpy

    ck = tmp_path / "ck"
    assert cli.main(["train", "--dataset", "iris", "--epochs", "1", "--skip-gradcheck",
                     "--checkpoint-dir", str(ck)]) == 0
    path = ck / checkpoint.FILENAME
    tensors = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    metadata["history"] = json.dumps({"epoch": 5})
    metadata["metadata_sha256"] = checkpoint._metadata_digest(metadata)  # an edit that re-signs
    safetensors.numpy.save_file(tensors, path, metadata=metadata)
    capsys.readouterr()
    rc = cli.main(["train", "--dataset", "iris", "--epochs", "2", "--checkpoint-dir", str(ck),
                   "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and (f"checkpoint {path}: its history must map names to per-epoch lists; "
                        "'epoch' is not a list") in err


def test_lr_must_survive_float32_rounding(capsys):
    for text in ("1e-50", "1e39"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["train", "--lr", text])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"expected a number > 0 that float32 can hold; got '{text}'" in err
    from jaxbp.cli import POSITIVE_FLOAT

    assert POSITIVE_FLOAT("3.4028235e38") > 3e38  # float32's largest is allowed
