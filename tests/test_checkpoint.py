"""Checkpoints: exact round trips, clear errors, atomic writes under SIGKILL, exact resume."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import checkpoint, cli, data, models, train


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@functools.lru_cache
def _state(hidden=(4,), steps=3):
    """An Adam state a few steps in, so every leaf is non-trivial."""
    net = models.mlp(hidden=hidden, classes=3)
    opt = optax.adam(1e-2)
    state = train.init_state(net, opt, jax.random.key(0), (5,), jnp.float32)
    step = train.make_train_step(net, opt)
    params, opt_state = state.params, state.opt_state
    x, y = jnp.ones((6, 5), jnp.float32), jnp.arange(6) % 3
    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state, (x, y))
    return train.TrainState(params, opt_state, jax.random.split(state.key)[0], min(2, steps),
                            steps)


def _contents(path):
    """The arrays and metadata of a safetensors file, as stored."""
    with safetensors.safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _rewrite(path, tensors=None, **fields):
    """Rewrite ``path`` with other arrays or metadata ``fields`` and matching digests: what a
    writer that records inconsistent values would produce."""
    stored, metadata = _contents(path)
    tensors = stored if tensors is None else tensors
    metadata = {**metadata, **fields, "tensor_sha256": json.dumps(
        {k: checkpoint._tensor_digest(k, v) for k, v in tensors.items()})}
    metadata["metadata_sha256"] = checkpoint._metadata_digest(metadata)
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def test_round_trip_is_exact(tmp_path):
    state = _state()
    path = tmp_path / "c.safetensors"
    config, history = {"model": "mlp", "hidden": [4]}, {"test_accuracy": [0.5, 0.75]}
    checkpoint.save(path, state, config=config, history=history)
    restored, meta = checkpoint.restore(path, like=_state(steps=0))
    assert _leaves_equal(restored.params, state.params)
    assert _leaves_equal(restored.opt_state, state.opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))
    assert (restored.epoch, restored.step) == (2, 3)
    assert meta == {"epoch": 2, "step": 3, "config": config, "history": history}
    assert [p for p in os.listdir(tmp_path)] == ["c.safetensors"]  # no temporary left behind


def test_other_architecture_names_what_differs(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, _state(hidden=(4,)))
    with pytest.raises(ValueError, match=r"does not match the model \(9 differences\):\n"
                       r"  params\[0\]\['W'\]: checkpoint has float32\[5, 4\], model expects "
                       r"float32\[5, 8\]"):
        checkpoint.restore(path, like=_state(hidden=(8,), steps=0))
    with pytest.raises(ValueError, match=r"params\[4\]\['W'\] float32\[4, 3\] is in the model "
                       r"but not in the checkpoint"):
        checkpoint.restore(path, like=_state(hidden=(4, 4), steps=0))
    like = _state(steps=0)
    sgd = train.TrainState(like.params, optax.sgd(0.1).init(like.params), like.key)
    with pytest.raises(ValueError, match=r"opt_state\[0\]\.mu\[0\]\['W'\] float32\[5, 4\] is "
                       r"in the checkpoint but not in the model"):
        checkpoint.restore(path, like=sgd)


def test_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, _state())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ValueError, match="not a readable safetensors file \\(truncated, corrupt"):
        checkpoint.restore(path, like=_state(steps=0))
    path.write_bytes(b'{"epoch": 3}')
    with pytest.raises(ValueError, match="another kind of file, 12 bytes"):
        checkpoint.read_metadata(path)
    safetensors.numpy.save_file({"w": np.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="a safetensors file but not a jaxbp checkpoint "
                       "\\(metadata format=None"):
        checkpoint.restore(path, like=_state(steps=0))
    with pytest.raises(FileNotFoundError, match="checkpoint .*absent does not exist"):
        checkpoint.read_metadata(tmp_path / "absent")
    metadata = {"format": checkpoint.FORMAT, "version": str(checkpoint.VERSION), "step": "0"}
    safetensors.numpy.save_file({"w": np.zeros(3)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(
            "lacks metadata field(s) epoch, key_impl, config, history, tensor_sha256, "
            "metadata_sha256 (a jaxbp checkpoint has epoch, step, key_impl, config, history, "
            "tensor_sha256, metadata_sha256)")):
        checkpoint.read_metadata(path)


def test_directories_and_bad_config(tmp_path):
    state = _state(steps=0)
    where = re.escape(f"checkpoint {tmp_path} is a directory, not a checkpoint file (did you mean ")
    with pytest.raises(ValueError, match=where):
        checkpoint.restore(tmp_path, like=state)
    with pytest.raises(ValueError, match=where):
        checkpoint.save(tmp_path, state)
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match=r"checkpoint.save: config\['f'\] must be "
                       r"JSON-serialisable .*got object"):
        checkpoint.save(path, state, config={"model": "mlp", "f": object()})
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        checkpoint.save(tmp_path / "c.safetensors", _state(steps=0))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "c.safetensors").st_mode & 0o777 == 0o640  # 0o666 & ~0o027


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import jax, numpy as np
    from jaxbp import checkpoint, train
    path = sys.argv[1]
    def state(fill, epoch):
        params = [{"W": np.full((512, 512), fill, np.float32)}]
        return train.TrainState(params, (), jax.random.key(0), epoch, epoch)
    checkpoint.save(path, state(1.0, 1))
    real_fsync = os.fsync
    def slow_fsync(fd):  # the second save stalls after writing its bytes
        print("writing", flush=True)
        time.sleep(60)
        real_fsync(fd)
    os.fsync = slow_fsync
    checkpoint.save(path, state(2.0, 2))
""")


def test_killed_save_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "c.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
        assert len(temps) == 1 and os.path.getsize(tmp_path / temps[0]) > 512 * 512 * 4
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    like = train.TrainState([{"W": np.zeros((512, 512), np.float32)}], (), jax.random.key(0))
    state, meta = checkpoint.restore(path, like=like)
    assert meta["epoch"] == 1 and np.all(state.params[0]["W"] == 1.0)


# ----------------------------------------------------------------------- resume


def test_resume_is_bit_identical(tmp_path):
    ds = data.load("spirals")
    net = models.mlp(hidden=(16,), classes=3)
    opt = optax.adam(1e-2)
    fresh = train.init_state(net, opt, jax.random.key(0), ds.input_shape, jnp.float32)
    straight, _ = train.fit(net, opt, fresh, ds, epochs=4, batch_size=32)

    path = tmp_path / "c.safetensors"
    half, _ = train.fit(net, opt, fresh, ds, epochs=2, batch_size=32,
                        on_epoch=lambda s, r: checkpoint.save(path, s))
    restored, _ = checkpoint.restore(path, like=fresh)
    resumed, history = train.fit(net, opt, restored, ds, epochs=4, batch_size=32)
    assert history["epoch"] == [3, 4] and resumed.step == straight.step
    assert _leaves_equal(resumed.params, straight.params)
    assert _leaves_equal(resumed.opt_state, straight.opt_state)


def test_divergence_keeps_last_good_checkpoint(tmp_path):
    ds = data.load("spirals")
    net = models.mlp(hidden=(16,), classes=3)
    opt = optax.sgd(optax.piecewise_constant_schedule(0.05, {25: 1e30}))  # blows up in epoch 2
    state = train.init_state(net, opt, jax.random.key(0), ds.input_shape, jnp.float32)
    path = tmp_path / "c.safetensors"
    with pytest.raises(train.NonFiniteLossError, match="at epoch 2, step") as info:
        train.fit(net, opt, state, ds, epochs=3, batch_size=32,
                  on_epoch=lambda s, r: checkpoint.save(path, s))
    kept, meta = checkpoint.restore(path, like=state)
    assert meta["epoch"] == 1 and _leaves_equal(kept.params, info.value.state.params)


def test_cli_resume_matches_uninterrupted_run(tmp_path, capsys):
    common = ["train", "--dataset", "iris", "--batch-size", "16", "--skip-gradcheck"]
    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    assert cli.main([*common, "--epochs", "2", "--checkpoint-dir", split]) == 0
    assert cli.main([*common, "--epochs", "4", "--checkpoint-dir", split, "--resume"]) == 0
    assert f"resumed {split}" in capsys.readouterr().out
    assert cli.main([*common, "--epochs", "4", "--checkpoint-dir", whole]) == 0
    a, b = (os.path.join(d, checkpoint.FILENAME) for d in (split, whole))
    meta_a, meta_b = checkpoint.read_metadata(a), checkpoint.read_metadata(b)
    for meta in (meta_a, meta_b):
        assert meta["history"].pop("time")  # wall-clock, the only thing allowed to differ
    assert meta_a == meta_b and meta_a["history"]["epoch"] == [1, 2, 3, 4]
    assert safetensors.numpy.load_file(a).keys() == safetensors.numpy.load_file(b).keys()
    for k, v in safetensors.numpy.load_file(a).items():
        np.testing.assert_array_equal(v, safetensors.numpy.load_file(b)[k], err_msg=k)

    assert cli.main([*common, "--epochs", "5", "--checkpoint-dir", split, "--resume",
                     "--hidden", "8"]) == 2
    assert "different setup: hidden [256] there, [8] now" in capsys.readouterr().err
    assert cli.main([*common, "--epochs", "5", "--checkpoint-dir", str(tmp_path / "no"),
                     "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_corrupt_metadata_names_the_field(tmp_path):
    import safetensors
    import safetensors.numpy

    net, opt = models.mlp(hidden=(3,), classes=2), optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), (2,))
    good = tmp_path / "good.safetensors"
    checkpoint.save(good, state)
    tensors = safetensors.numpy.load_file(good)
    with safetensors.safe_open(good, framework="numpy") as f:
        metadata = f.metadata()
    cases = [("epoch", "-5", "metadata field epoch must be an int >= 0; got '-5'"),
             ("step", "abc", "metadata field step must be an int >= 0; got 'abc'"),
             ("config", "{not json", "metadata field config is not valid JSON"),
             ("epoch", "²", "metadata field epoch must be an int >= 0; got '²'"),
             ("config", "[1, 2]", "metadata field config must be a JSON object; got list"),
             ("history", "[]", "metadata field history must be a JSON object; got list")]
    for i, (field, value, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        safetensors.numpy.save_file(tensors, path, metadata={**metadata, field: value})
        with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}: {message}")):
            checkpoint.restore(path, like=state)
        with pytest.raises(ValueError, match=re.escape(message)):
            checkpoint.read_metadata(path)
    path = tmp_path / "nokey.safetensors"
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != "key"}, path,
                                metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} is corrupt: array key has "
                                                   f"a digest but is missing from the file")):
        checkpoint.restore(path, like=state)
    _rewrite(path, tensors={k: v for k, v in tensors.items() if k != "key"})  # digests agree
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} lacks the 'key' array")):
        checkpoint.restore(path, like=state)


def test_save_and_restore_check_their_arguments(tmp_path):
    net, opt = models.mlp(hidden=(3,), classes=2), optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), (2,))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint.save: cannot create {afile}/c: "
                                                   f"{afile} is a file, not a directory")):
        checkpoint.save(afile / "c", state)
    with pytest.raises(ValueError, match="checkpoint.save: state must be a train.TrainState; "
                       "got NoneType"):
        checkpoint.save(tmp_path / "c", None)
    with pytest.raises(ValueError, match="checkpoint.save: state.epoch must be an int >= 0; "
                       "got -1"):
        checkpoint.save(tmp_path / "c", state._replace(epoch=-1))
    checkpoint.save(tmp_path / "c", state._replace(epoch=jax.numpy.int32(3), step=3))
    with pytest.raises(ValueError, match="checkpoint.restore: like must be a train.TrainState"):
        checkpoint.restore(tmp_path / "c", like=state.params)
    assert checkpoint.restore(tmp_path / "c", like=state)[0].epoch == 3


def test_fit_history_round_trips(tmp_path):
    net, opt = models.mlp(hidden=(3,), classes=3), optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), (4,))
    state, history = train.fit(net, opt, state, data.load("iris"), epochs=1, batch_size=30)
    checkpoint.save(tmp_path / "c", state, history=history)  # steps, device: not lists
    restored, meta = checkpoint.restore(tmp_path / "c", like=state)
    assert meta["history"] == history and restored.epoch == 1


def test_a_state_class_from_a_reloaded_module_is_still_a_train_state(tmp_path):
    import collections

    net, opt = models.mlp(hidden=(3,), classes=2), optax.sgd(0.1)
    state = train.init_state(net, opt, jax.random.key(0), (2,))
    Reloaded = collections.namedtuple("TrainState", train.TrainState._fields)
    checkpoint.save(tmp_path / "c", Reloaded(*state))
    assert checkpoint.restore(tmp_path / "c", like=Reloaded(*state))[0].step == 0


# -------------------------------------------------------------------- integrity


def _saved(tmp_path, epochs=3):
    """A checkpoint of a 3-epoch run with fit's per-epoch history, and a template state."""
    like = _state(steps=0)._replace(epoch=0, step=0)
    history = {"epoch": list(range(1, epochs + 1)), "step": [4 * e for e in range(1, epochs + 1)],
               "test_loss": [1.0 / e for e in range(1, epochs + 1)]}
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, _state()._replace(epoch=epochs, step=4 * epochs), history=history)
    return path, like


def _one_line_error(call, path) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_flipped_bytes_and_edited_metadata_are_refused(tmp_path):
    path, like = _saved(tmp_path)
    raw = path.read_bytes()
    flipped = bytearray(raw)
    data_start = 8 + int.from_bytes(raw[:8], "little")
    for i in (0, 3, 100, 400):  # four bytes of array data
        flipped[data_start + i] ^= 0x10
    path.write_bytes(bytes(flipped))
    assert "is corrupt: array " in _one_line_error(lambda: checkpoint.restore(path, like), path)
    tensors, metadata = _contents(_saved(tmp_path)[0])
    history = json.loads(metadata["history"])
    edits = [dict(epoch="1"), dict(step="999999"),
             dict(history=json.dumps({k: v[:2] for k, v in history.items()}))]
    for fields in edits:  # edited by hand: the metadata digest no longer matches
        safetensors.numpy.save_file(tensors, path, metadata={**metadata, **fields})
        for call in (lambda: checkpoint.restore(path, like),
                     lambda: checkpoint.read_metadata(path)):
            assert "is corrupt: its metadata does not match the SHA-256 digest" in \
                _one_line_error(call, path)
    safetensors.numpy.save_file({**tensors, "extra": np.zeros(2, np.float32)}, path,
                                metadata=metadata)
    assert "is corrupt: array extra has no digest" in \
        _one_line_error(lambda: checkpoint.restore(path, like), path)


@pytest.mark.parametrize("fields, message", [
    (dict(epoch="1"), "epoch 1 with a history of 3 epochs [1, 2, 3]"),
    (dict(step="999999"), "step 999999 with a history of steps [4, 8, 12] after epochs "
                          "[1, 2, 3] (expected an increasing count"),
    (dict(step="2"), "epoch 3 with step 2 (every epoch takes at least one step)"),
    (dict(history=json.dumps({"epoch": [1, 2], "step": [4, 8]})),
     "epoch 3 with a history of 2 epoch(s) [1, 2] (expected [2, 3])"),
    (dict(history=json.dumps({"epoch": [1, 2, 3], "test_loss": [1.0]})),
     "its history's per-epoch lists differ in length (epoch: 3, test_loss: 1)"),
])
def test_inconsistent_metadata_is_refused_even_with_matching_digests(tmp_path, fields, message):
    path, like = _saved(tmp_path)
    _rewrite(path, **fields)
    for call in (lambda: checkpoint.restore(path, like), lambda: checkpoint.read_metadata(path)):
        assert f"checkpoint {path} is inconsistent: {message}" in _one_line_error(call, path)


def test_only_the_expected_arrays_are_accepted(tmp_path):
    path, like = _saved(tmp_path)
    tensors, _ = _contents(path)
    _rewrite(path, tensors={**tensors, "stray": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"stray float32\[1\] is in the checkpoint but not in "
                       r"the model"):
        checkpoint.restore(path, like)
    _rewrite(path, tensors={**tensors, "key": np.zeros(3, np.uint32)})
    assert "its PRNG key data is uint32[3]; a threefry2x32 key is uint32[2]" in \
        _one_line_error(lambda: checkpoint.restore(path, like), path)
    _rewrite(path, tensors={**tensors, "params[0]['b']": np.full(4, np.inf, np.float32)})
    assert "array params[0]['b'] holds 4 non-finite value(s)" in \
        _one_line_error(lambda: checkpoint.restore(path, like), path)


def test_save_refuses_non_finite_or_inconsistent_state_and_keeps_the_old_file(tmp_path):
    path, _ = _saved(tmp_path)
    before = path.read_bytes()
    state = _state()._replace(epoch=4, step=16)
    nan = state._replace(params=jax.tree.map(lambda a: a.at[0].set(np.nan), state.params))
    with pytest.raises(ValueError, match=re.escape("checkpoint.save: params[0]['W'] holds 4 "
                                                   "non-finite value(s)")):
        checkpoint.save(path, nan)
    with pytest.raises(ValueError, match="checkpoint.save: epoch 4 with a history of 1 epoch"):
        checkpoint.save(path, state, history={"epoch": [1]})
    with pytest.raises(ValueError, match=r"checkpoint.save: history\['test_loss'\] must be "
                       r"JSON-serialisable \(str, finite number"):
        checkpoint.save(path, state, history={"test_loss": [float("inf")]})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    ours = [f".c.safetensors.{'0123456789abcdef' * 2}.tmp", f".c.safetensors.{'f' * 32}.tmp"]
    others = [".c.safetensors.0123.tmp", f".d.safetensors.{'f' * 32}.tmp",
              f"c.safetensors.{'f' * 32}.tmp", f".c.safetensors.{'F' * 32}.tmp", "notes.txt"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"partial")
    os.mkdir(tmp_path / f".c.safetensors.{'e' * 32}.tmp")  # not a file: not ours
    checkpoint.save(tmp_path / "c.safetensors", _state(steps=0))
    left = set(os.listdir(tmp_path))
    assert left == {"c.safetensors", f".c.safetensors.{'e' * 32}.tmp", *others}
    assert checkpoint.remove_stale_temporaries(tmp_path / "absent" / "c") == []


def test_cli_refuses_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    common = ["train", "--dataset", "iris", "--batch-size", "30", "--skip-gradcheck",
              "--checkpoint-dir", str(ck)]
    assert cli.main([*common, "--epochs", "2"]) == 0
    path = ck / checkpoint.FILENAME
    good = path.read_bytes()
    metadata = _contents(path)[1]
    corruptions = {  # more kinds of damage: the tests above and the fuzz test below
        "flipped": lambda: path.write_bytes(good[:-8] + bytes(b ^ 1 for b in good[-8:])),
        "history cut": lambda: _rewrite(path, history=json.dumps(  # consistent, but partial
            {k: v[1:] for k, v in json.loads(metadata["history"]).items()})),
    }
    stale = ck / f".{checkpoint.FILENAME}.{'0' * 32}.tmp"  # left by a save cut short
    stale.write_bytes(good[:100])
    capsys.readouterr()
    for name, corrupt in corruptions.items():
        path.write_bytes(good)
        corrupt()
        assert cli.main([*common, "--epochs", "3", "--resume"]) == 2, name
        out, err = capsys.readouterr()
        assert err.startswith(f"error: checkpoint {path}") and err.count("\n") == 1, err
        assert "resumed" not in out and "Traceback" not in err
        assert not stale.exists()  # removed when the run started
        assert (f"removed {stale}, left by an interrupted save" in out) == (name == "flipped")
    assert "its history covers 1 of its 2 epochs; jaxbp train saves every epoch's" in err


# ------------------------------------------------------------------------ fuzz


def _split_header(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


@st.composite
def _corruptions(draw, raw: bytes):
    """``raw`` truncated, with bytes flipped, or with its JSON header edited."""
    kind = draw(st.sampled_from(["truncate", "flip", "metadata", "tensor", "length"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        out = bytearray(raw)
        for i, bit in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 7)),
                                    min_size=1, max_size=4)):
            out[i] ^= 1 << bit
        return bytes(out)
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + raw[8:]
    header, body = _split_header(raw)
    if kind == "metadata":
        metadata = header["__metadata__"]
        field = draw(st.sampled_from(sorted(metadata) + ["extra"]))
        metadata[field] = draw(st.one_of(
            st.text(max_size=12), st.integers(0, 10**7).map(str),
            st.sampled_from(["{}", "[]", "NaN", '{"epoch": [1, 2]}', metadata.get(field, "")]),
        ))
        return _join_header(header, body)
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    change = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "copy"]))
    if change == "drop":
        del header[name]
    elif change == "copy":
        header[draw(st.sampled_from(["extra", "params[9]['W']", "key "]))] = header[name]
    elif change == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F32", "F64", "F16", "BF16", "I32", "U32",
                                                       "U8", "I64", "BOOL", "X"]))
    elif change == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(0, 12), max_size=3))
    else:
        header[name]["data_offsets"] = draw(st.lists(st.integers(0, len(body) + 8),
                                                     min_size=2, max_size=2))
    return _join_header(header, body)


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    path, like = _saved(tmp_path_factory.mktemp("fuzz"))
    return path.read_bytes(), like, checkpoint.restore(path, like)


@settings(max_examples=300)
@given(data=st.data())
def test_a_corrupted_checkpoint_is_restored_exactly_or_refused_in_one_line(
        tmp_path_factory, saved_bytes, data):
    raw, like, (original, original_meta) = saved_bytes
    path = tmp_path_factory.mktemp("case") / "c.safetensors"
    path.write_bytes(data.draw(_corruptions(raw)))
    for call in (lambda: checkpoint.read_metadata(path), lambda: checkpoint.restore(path, like)):
        start = time.perf_counter()
        try:
            result = call()
        except ValueError as err:
            assert "\n" not in str(err) and f"checkpoint {path}" in str(err), str(err)
        else:
            meta = result[1] if isinstance(result, tuple) else result
            assert meta == original_meta
            if isinstance(result, tuple):
                raw = [s._replace(key=jax.random.key_data(s.key)) for s in (result[0], original)]
                assert _leaves_equal(*raw)
        assert time.perf_counter() - start < 3
