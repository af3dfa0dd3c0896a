"""Checkpoints: parameters, network and optimizer state, step, PRNG key and config in one file.

Format: a single safetensors file. Its arrays are the leaves of ``params``,
``net_state`` (BatchNorm's running statistics, where the network has state) and
``opt_state`` named by their pytree paths (``params[0]['W']``,
``net_state[1]['mean']``, ``opt_state[0].mu[0]['W']``) plus ``key`` (the PRNG
key's raw uint32 data); its
string metadata holds ``format``, ``version``, ``epoch``, ``step``, the key's
implementation, JSON-encoded ``config`` and ``history``, and two integrity
fields: ``tensor_sha256`` (the SHA-256 of every array's name, dtype, shape and
bytes) and ``metadata_sha256`` (the SHA-256 of all other metadata).

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

Integrity: a checkpoint is written only from finite arrays and a consistent
step count (``epoch`` ≤ ``step``, and a history with per-epoch ``epoch`` and
``step`` lists must end at the checkpoint's epoch and step). Reading checks the
same, verifies both digests, and accepts exactly the arrays the model expects,
so a truncated, bit-flipped or edited file is a ``ValueError`` naming the file
and what is wrong, and is never used.

Writes are atomic: the bytes go to a temporary file in the same directory,
which is flushed and fsync'ed, then renamed over the target (``os.replace`` is
atomic on POSIX), and the directory is fsync'ed so the rename survives a crash.
A process killed mid-save leaves the previous checkpoint intact; the temporary
file it leaves behind (``.NAME.<32 hex digits>.tmp``) is removed by the next
save of the same path, or by ``remove_stale_temporaries``. One process writes a
given checkpoint at a time.

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

import hashlib
import json
import os
import re
import uuid

import jax
import numpy as np
import safetensors
import safetensors.numpy

from .layers.base import count_non_finite
from .paths import existing_ancestor
from .train import TrainState, is_train_state

FORMAT = "jaxbp-checkpoint"
VERSION = 2
FILENAME = "checkpoint.safetensors"
_MAX_SHOWN = 12  # differences listed in a mismatch error
# metadata every checkpoint has
_FIELDS = ("epoch", "step", "key_impl", "config", "history", "tensor_sha256", "metadata_sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _named_leaves(prefix: str, tree) -> dict[str, jax.Array]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _not_a_directory(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(
            f"checkpoint {path} is a directory, not a checkpoint file (did you mean "
            f"{os.path.join(path, FILENAME)}?)"
        )


# ------------------------------------------------------------------ integrity


def _tensor_digest(name: str, array: np.ndarray) -> str:
    """SHA-256 of an array's name, dtype, shape and C-order bytes."""
    digest = hashlib.sha256(json.dumps([name, array.dtype.name, list(array.shape)]).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _metadata_digest(metadata: dict) -> str:
    """SHA-256 of every metadata field but ``metadata_sha256`` itself."""
    fields = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _non_finite(tensors: dict) -> tuple[str, int] | None:
    """``(name, count)`` of the first float array holding NaN or ±inf, or ``None``."""
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.inexact):
            bad = count_non_finite(array)
            if bad:
                return name, bad
    return None


def _clip(text) -> str:
    """``repr(text)``, cut short: a corrupt field can be long."""
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "…"


def _short(values: list) -> str:
    return str(values) if len(values) <= 6 else f"[{values[0]}, {values[1]}, …, {values[-1]}]"


def _inconsistency(epoch: int, step: int, history: dict) -> str | None:
    """What is inconsistent between ``epoch``, ``step`` and a per-epoch history, or ``None``.

    Every completed epoch took at least one step. A history with an ``epoch`` list (what
    ``train.fit`` returns) covers the last ``len`` epochs: its lists have that
    length, ``epoch`` counts up to the checkpoint's epoch, and a ``step`` list
    (steps completed after each epoch) increases and ends at the checkpoint's step.
    """
    if step < epoch:
        return f"epoch {epoch} with step {step} (every epoch takes at least one step)"
    epochs = history.get("epoch")
    if not isinstance(epochs, list):
        return None
    lengths = {k: len(v) for k, v in history.items() if isinstance(v, list)}
    if len(set(lengths.values())) > 1:
        return "its history's per-epoch lists differ in length (" + ", ".join(
            f"{k}: {n}" for k, n in lengths.items()) + ")"
    expected = list(range(epoch - len(epochs) + 1, epoch + 1))
    if len(epochs) > epoch:
        return f"epoch {epoch} with a history of {len(epochs)} epochs {_short(epochs)}"
    if epochs != expected or not all(type(e) is int for e in epochs):
        return (f"epoch {epoch} with a history of {len(epochs)} epoch(s) {_short(epochs)} "
                f"(expected {_short(expected)})")
    steps = history.get("step")
    if isinstance(steps, list) and steps:
        counts = all(type(s) is int for s in steps)
        if not counts or steps[-1] != step or steps[0] < epochs[0] or any(
                b <= a for a, b in zip(steps, steps[1:])):
            return (f"step {step} with a history of steps {_short(steps)} after epochs "
                    f"{_short(epochs)} (expected an increasing count, at least one per epoch, "
                    f"ending at {step})")
    return None


def remove_stale_temporaries(path) -> list[str]:
    """Delete the temporary files that interrupted saves of ``path`` left; return them.

    Only names of the form ``.NAME.<32 hex digits>.tmp`` next to ``path`` (what
    ``save`` writes) are touched.
    """
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{32}}\.tmp")
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for other in sorted(names):
        full = os.path.join(directory, other)
        if pattern.fullmatch(other) and os.path.isfile(full):
            try:
                os.unlink(full)
            except FileNotFoundError:  # removed meanwhile
                continue
            removed.append(full)
    return removed


# ----------------------------------------------------------------------- save


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
    """Write ``state`` (and JSON-serialisable ``config``, ``history``) to ``path`` atomically.

    Raises ValueError, writing nothing, when a float array of ``state`` holds NaN
    or ±inf, or when ``state.epoch``, ``state.step`` and ``history`` disagree
    (see the module docstring); stale temporary files of ``path`` are removed.
    """
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
        **_named_leaves("net_state", state.net_state),
        **_named_leaves("opt_state", state.opt_state),
        "key": jax.random.key_data(state.key),
    }
    tensors = {k: np.asarray(jax.device_get(v), order="C") for k, v in tensors.items()}
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"checkpoint.save: {bad[0]} holds {bad[1]} non-finite value(s) (NaN or "
                         f"±inf); a checkpoint is written only from finite state")
    epoch, step = int(state.epoch), int(state.step)
    config_json, history_json = _json("config", config or {}), _json("history", history or {})
    problem = _inconsistency(epoch, step, history or {})
    if problem:
        raise ValueError(f"checkpoint.save: {problem}")
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "epoch": str(epoch),
        "step": str(step),
        "key_impl": str(jax.random.key_impl(state.key)),
        "config": config_json,
        "history": history_json,
        "tensor_sha256": json.dumps({k: _tensor_digest(k, v) for k, v in tensors.items()}),
    }
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    data = safetensors.numpy.save(tensors, metadata=metadata)
    remove_stale_temporaries(path)
    _atomic_write(path, data)


def _json(arg: str, mapping) -> str:
    """``mapping`` as JSON; a ValueError names the first entry JSON cannot encode."""
    if not isinstance(mapping, dict):
        raise ValueError(f"checkpoint.save: {arg} must be a dict; got {type(mapping).__name__}")
    for key, value in mapping.items():
        try:
            json.dumps({key: value}, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"checkpoint.save: {arg}[{key!r}] must be JSON-serialisable (str, finite number, "
                f"bool, None, list, dict); got {type(value).__name__}: {err}"
            ) from None
    return json.dumps(mapping)


# ----------------------------------------------------------------------- read


def _open(path: str, tensors: bool):
    """``(metadata, tensors or None)`` of a jaxbp checkpoint, or a ValueError saying what
    it is not."""
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
            arrays = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except Exception as err:  # safetensors raises its own error types for every bad header
        reason = " ".join(str(err).split())
        raise ValueError(
            f"checkpoint {path} is not a readable safetensors file (truncated, corrupt or "
            f"another kind of file, {os.path.getsize(path)} bytes): {reason}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} is a safetensors file but not a jaxbp checkpoint "
            f"(metadata format={_clip(metadata.get('format'))}, expected {FORMAT!r})"
        )
    if metadata.get("version") != str(VERSION):
        raise ValueError(
            f"checkpoint {path} has version {_clip(metadata.get('version'))}; this jaxbp reads "
            f"version {VERSION}"
        )
    missing = [k for k in _FIELDS if k not in metadata]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks metadata field(s) {', '.join(missing)} (a jaxbp checkpoint "
            f"has {', '.join(_FIELDS)})"
        )
    return metadata, arrays


def read_metadata(path) -> dict:
    """``{"epoch", "step", "config", "history"}`` of a checkpoint, without restoring arrays.

    The metadata's digest and consistency are checked; the arrays' digests are
    checked by ``restore``.
    """
    path = os.fspath(path)
    return _decode(_open(path, tensors=False)[0], path)[0]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _decode(metadata: dict, path: str) -> tuple[dict, dict]:
    """The metadata's typed values and the arrays' digests; a ValueError names what a
    corrupt file gets wrong."""
    decoded = {}
    for name in ("epoch", "step"):
        text = metadata[name]
        if not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise ValueError(f"checkpoint {path}: metadata field {name} must be an int >= 0; "
                             f"got {_clip(text)}")
        decoded[name] = int(text)
    for name in ("config", "history", "tensor_sha256"):
        try:
            value = json.loads(metadata[name], parse_constant=_reject_constant)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"checkpoint {path}: metadata field {name} is not valid JSON "
                             f"({err})") from None
        if not isinstance(value, dict):
            raise ValueError(f"checkpoint {path}: metadata field {name} must be a JSON "
                             f"object; got {type(value).__name__}")
        decoded[name] = value
    digests = decoded.pop("tensor_sha256")
    if not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in digests.values()):
        raise ValueError(f"checkpoint {path}: metadata field tensor_sha256 must map array names "
                         f"to SHA-256 hex digests")
    if metadata["metadata_sha256"] != _metadata_digest(metadata):
        raise ValueError(f"checkpoint {path} is corrupt: its metadata does not match the SHA-256 "
                         f"digest saved with it (the file changed after it was written)")
    problem = _inconsistency(decoded["epoch"], decoded["step"], decoded["history"])
    if problem:
        raise ValueError(f"checkpoint {path} is inconsistent: {problem}")
    return decoded, digests


def _verify(path: str, tensors: dict, digests: dict) -> None:
    """The arrays are exactly those digested at save, unchanged, and finite."""
    extra, missing = sorted(set(tensors) - set(digests)), sorted(set(digests) - set(tensors))
    if extra:
        raise ValueError(f"checkpoint {path} is corrupt: array {extra[0]} has no digest (it was "
                         f"added after the file was written)")
    if missing:
        raise ValueError(f"checkpoint {path} is corrupt: array {missing[0]} has a digest but is "
                         f"missing from the file")
    for name, array in tensors.items():
        if _tensor_digest(name, array) != digests[name]:
            raise ValueError(f"checkpoint {path} is corrupt: array {name} does not match its "
                             f"SHA-256 digest (its data, dtype or shape changed after the file "
                             f"was written)")
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"checkpoint {path}: array {bad[0]} holds {bad[1]} non-finite "
                         f"value(s) (NaN or ±inf); a checkpoint holds only finite state")


def _describe(a) -> str:
    return f"{np.dtype(a.dtype)}{list(a.shape)}"


def _fill(like, named: dict, tensors: dict, problems: list):
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

    ``metadata`` is what ``read_metadata`` returns. Raises ValueError for files
    that are truncated, corrupt (a digest does not match), inconsistent or not
    jaxbp checkpoints, and naming each leaf that is missing, extra, or of
    another shape or dtype than ``like``'s.
    """
    path = os.fspath(path)
    if not is_train_state(like):
        raise ValueError(f"checkpoint.restore: like must be a train.TrainState (the state "
                         f"to restore into); got {type(like).__name__}")
    metadata, tensors = _open(path, tensors=True)
    decoded, digests = _decode(metadata, path)
    _verify(path, tensors, digests)
    problems: list[str] = []
    named = {part: _named_leaves(part, getattr(like, part))
             for part in ("params", "net_state", "opt_state")}
    expected = {name for leaves in named.values() for name in leaves} | {"key"}
    for name in sorted(set(tensors) - expected):
        problems.append(f"{name} {_describe(tensors[name])} is in the checkpoint but not in "
                        f"the model")
    params, net_state, opt_state = (_fill(getattr(like, part), named[part], tensors, problems)
                                    for part in ("params", "net_state", "opt_state"))
    if problems:
        shown = problems[:_MAX_SHOWN] + (
            [f"… and {len(problems) - _MAX_SHOWN} more"] if len(problems) > _MAX_SHOWN else []
        )
        raise ValueError(
            f"checkpoint {path} does not match the model ({len(problems)} difference"
            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(shown)
        )
    impl = metadata["key_impl"]
    if "key" not in tensors:
        raise ValueError(f"checkpoint {path} lacks the 'key' array (the PRNG key's raw data)")
    if impl != str(jax.random.key_impl(like.key)):
        raise ValueError(
            f"checkpoint {path}: PRNG key of implementation {_clip(impl)} cannot restore into a "
            f"{jax.random.key_impl(like.key)} key"
        )
    expected = jax.random.key_data(like.key)
    if tensors["key"].shape != expected.shape or tensors["key"].dtype != expected.dtype:
        raise ValueError(f"checkpoint {path}: its PRNG key data is {_describe(tensors['key'])}; "
                         f"a {impl} key is {_describe(expected)}")
    key = jax.random.wrap_key_data(tensors["key"], impl=impl)
    state = TrainState(params, opt_state, key, decoded["epoch"], decoded["step"], net_state)
    return state, decoded
