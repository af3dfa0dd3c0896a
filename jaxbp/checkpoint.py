"""Checkpoints: parameters, optimizer state, step, PRNG key and config in one file.

Format: a single safetensors file. Its arrays are the leaves of ``params`` and
``opt_state`` named by their pytree paths (``params[0]['W']``,
``opt_state[0].mu[0]['W']``) plus ``key`` (the PRNG key's raw uint32 data); its
string metadata holds ``format``, ``version``, ``epoch``, ``step``, the key's
implementation and JSON-encoded ``config`` and ``history``.

Why safetensors: loading parses a JSON header and copies raw little-endian
bytes, so a checkpoint can never execute code (unlike pickle, which ``np.load``
with ``allow_pickle`` or ``torch.load`` may run); one file keeps arrays and
metadata together, so they cannot get out of step; the library is small and
already a dependency. orbax-checkpoint would bring async, multi-host
directories and TensorStore — more than a single-process trainer needs.

Restoring needs a template (``like``) of the state to restore into, built the
usual way (``net.init`` + ``opt.init``). Every leaf must match by path, shape
and dtype; otherwise the error lists what differs, so restoring into another
architecture says which layer changed and how.

Writes are atomic: the bytes go to a temporary file in the same directory,
which is flushed and fsync'ed, then renamed over the target (``os.replace`` is
atomic on POSIX), and the directory is fsync'ed so the rename survives a crash.
A process killed mid-save leaves the previous checkpoint intact.

Example:
  >>> import os, tempfile, jax, optax
  >>> from jaxbp import models, train
  >>> net, opt = models.mlp(hidden=(4,), classes=2), optax.adam(1e-3)
  >>> state = train.init_state(net, opt, jax.random.key(0), (3,))
  >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
  >>> save(path, state, config={"model": "mlp"})
  >>> restored, meta = restore(path, like=state)
  >>> meta["config"], restored.epoch
  ({'model': 'mlp'}, 0)
"""

from __future__ import annotations

import json
import os
import uuid

import jax
import numpy as np
import safetensors
import safetensors.numpy

from .cli import existing_ancestor
from .train import TrainState, is_train_state

FORMAT = "jaxbp-checkpoint"
VERSION = 1
FILENAME = "checkpoint.safetensors"
_MAX_SHOWN = 12  # differences listed in a mismatch error
_FIELDS = ("epoch", "step", "config", "history")  # metadata every checkpoint has


def _named_leaves(prefix: str, tree) -> dict[str, jax.Array]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _not_a_directory(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(
            f"checkpoint {path} is a directory, not a checkpoint file (did you mean "
            f"{os.path.join(path, FILENAME)}?)"
        )


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # Mode 0o666 less the umask, as open() gives (mkstemp's 0o600 would make it private).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path, state: TrainState, config: dict | None = None, history: dict | None = None):
    """Write ``state`` (and JSON-serialisable ``config``, ``history``) to ``path`` atomically."""
    path = os.fspath(path)
    _not_a_directory(path)
    if not is_train_state(state):
        raise ValueError(f"checkpoint.save: state must be a train.TrainState; got "
                         f"{type(state).__name__}")
    for name in ("epoch", "step"):
        value = getattr(state, name)
        integer = np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer)
        if isinstance(value, bool) or not integer or value < 0:
            raise ValueError(f"checkpoint.save: state.{name} must be an int >= 0; got {value!r}")
    ancestor = existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(ancestor):
        raise ValueError(f"checkpoint.save: cannot create {path}: {ancestor} is a file, "
                         f"not a directory")
    tensors = {
        **_named_leaves("params", state.params),
        **_named_leaves("opt_state", state.opt_state),
        "key": jax.random.key_data(state.key),
    }
    tensors = {k: np.asarray(jax.device_get(v), order="C") for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "epoch": str(int(state.epoch)),
        "step": str(int(state.step)),
        "key_impl": str(jax.random.key_impl(state.key)),
        "config": _json("config", config or {}),
        "history": _json("history", history or {}),
    }
    _atomic_write(path, safetensors.numpy.save(tensors, metadata=metadata))


def _json(arg: str, mapping) -> str:
    """``mapping`` as JSON; a ValueError names the first entry JSON cannot encode."""
    if not isinstance(mapping, dict):
        raise ValueError(f"checkpoint.save: {arg} must be a dict; got {type(mapping).__name__}")
    for key, value in mapping.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"checkpoint.save: {arg}[{key!r}] must be JSON-serialisable (str, number, bool, "
                f"None, list, dict); got {type(value).__name__}: {err}"
            ) from None
    return json.dumps(mapping)


def _open(path: str):
    """``(metadata, tensors)`` of a jaxbp checkpoint, or a ValueError saying what it is not."""
    _not_a_directory(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:  # e.g. permissions: not the file's fault
        raise OSError(f"checkpoint {path} cannot be read: {err.strerror}") from None
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for every bad header
        raise ValueError(
            f"checkpoint {path} is not a readable safetensors file (truncated, corrupt or "
            f"another kind of file, {os.path.getsize(path)} bytes): {err}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} is a safetensors file but not a jaxbp checkpoint "
            f"(metadata format={metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if metadata.get("version") != str(VERSION):
        raise ValueError(
            f"checkpoint {path} has version {metadata.get('version')}; this jaxbp reads "
            f"version {VERSION}"
        )
    missing = [k for k in _FIELDS if k not in metadata]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks metadata field(s) {', '.join(missing)} (a jaxbp checkpoint "
            f"has {', '.join(_FIELDS)})"
        )
    return metadata, tensors


def read_metadata(path) -> dict:
    """``{"epoch", "step", "config", "history"}`` of a checkpoint, without restoring arrays."""
    path = os.fspath(path)
    return _decode(_open(path)[0], path)


def _decode(metadata: dict, path: str) -> dict:
    """The metadata's typed values; a ValueError names the field a corrupt file gets wrong."""
    decoded = {}
    for name in ("epoch", "step"):
        text = metadata[name]
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"checkpoint {path}: metadata field {name} must be an int >= 0; "
                             f"got {text!r}")
        decoded[name] = int(text)
    for name in ("config", "history"):
        try:
            value = json.loads(metadata[name])
        except ValueError as err:
            raise ValueError(f"checkpoint {path}: metadata field {name} is not valid JSON "
                             f"({err})") from None
        if not isinstance(value, dict):
            raise ValueError(f"checkpoint {path}: metadata field {name} must be a JSON "
                             f"object; got {type(value).__name__}")
        decoded[name] = value
    return decoded


def _describe(a) -> str:
    return f"{np.dtype(a.dtype)}{list(a.shape)}"


def _fill(path: str, prefix: str, like, tensors: dict, problems: list):
    named = _named_leaves(prefix, like)
    stored = {k for k in tensors if k.startswith(prefix)}
    for name in sorted(stored - set(named)):
        extra = _describe(tensors[name])
        problems.append(f"{name} {extra} is in the checkpoint but not in the model")
    leaves = []
    for name, leaf in named.items():
        if name not in tensors:
            problems.append(f"{name} {_describe(leaf)} is in the model but not in the checkpoint")
            leaves.append(leaf)
            continue
        value = tensors[name]
        if value.shape != tuple(leaf.shape) or value.dtype != leaf.dtype:
            problems.append(
                f"{name}: checkpoint has {_describe(value)}, model expects {_describe(leaf)}"
            )
        leaves.append(value)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def restore(path, like: TrainState) -> tuple[TrainState, dict]:
    """Load a checkpoint into the structure of ``like``; return ``(state, metadata)``.

    ``metadata`` is what ``read_metadata`` returns. Raises ValueError naming each
    leaf that is missing, extra, or of another shape or dtype, and for files that
    are truncated or not jaxbp checkpoints.
    """
    path = os.fspath(path)
    if not is_train_state(like):
        raise ValueError(f"checkpoint.restore: like must be a train.TrainState (the state "
                         f"to restore into); got {type(like).__name__}")
    metadata, tensors = _open(path)
    decoded = _decode(metadata, path)
    problems: list[str] = []
    params = _fill(path, "params", like.params, tensors, problems)
    opt_state = _fill(path, "opt_state", like.opt_state, tensors, problems)
    if problems:
        shown = problems[:_MAX_SHOWN] + (
            [f"… and {len(problems) - _MAX_SHOWN} more"] if len(problems) > _MAX_SHOWN else []
        )
        raise ValueError(
            f"checkpoint {path} does not match the model ({len(problems)} difference"
            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(shown)
        )
    impl = metadata.get("key_impl")
    if "key" not in tensors:
        raise ValueError(f"checkpoint {path} lacks the 'key' array (the PRNG key's raw data)")
    if impl != str(jax.random.key_impl(like.key)):
        raise ValueError(
            f"checkpoint {path}: PRNG key of implementation {impl!r} cannot restore into a "
            f"{jax.random.key_impl(like.key)} key"
        )
    key = jax.random.wrap_key_data(tensors["key"], impl=impl)
    state = TrainState(params, opt_state, key, decoded["epoch"], decoded["step"])
    return state, decoded
