"""Training with optax: one jitted step, epochs fused with ``lax.scan``, evaluation.

A training step computes ``(J, ∂J/∂params)`` either by the hand-written backward
pass (``grad="manual"``, ``net.manual_value_and_grad``) or by autodiff
(``grad="autodiff"``, ``jax.value_and_grad(net.loss)``), then applies any optax
``GradientTransformation``. Both give the same parameters up to rounding.

Weight decay, two ways:

* In the objective, ``J = L + λ/2 Σ‖W‖²`` (``Sequential(weight_decay=λ)``): the
  gradient becomes ``∇L + λW`` and the optimizer sees that.
* In the optimizer, ``optax.add_decayed_weights(λ, mask=decay_mask(net))`` adds
  ``λW`` to the gradient it receives.

For SGD (with or without momentum) these are the same update,
``W ← W − η(∇L + λW) = (1 − ηλ)W − η∇L``, because the optimizer is linear in the
gradient. For Adam they are not the same as decoupled decay: Adam divides the
``λW`` term by ``√v̂`` along with ``∇L``, so weights with large gradients decay
less; AdamW (``optax.adamw``) instead adds ``ηλW`` after the adaptive scaling.
Chaining ``add_decayed_weights`` *before* ``optax.adam`` reproduces the
L2-in-the-loss Adam exactly. ``decay_mask(net)`` decays only each layer's
``decay_keys`` (weights and kernels, never biases), like the objective;
``freeze(optimizer, ("b",))`` keeps the named parameters fixed.

Example:
  >>> import jax, optax
  >>> from jaxbp import data, models, train
  >>> ds = data.load("iris")
  >>> net = models.mlp(hidden=(16,), classes=ds.classes)
  >>> opt = optax.adam(1e-2)
  >>> state = train.init_state(net, opt, jax.random.key(0), ds.input_shape, "float32")
  >>> state, history = train.fit(net, opt, state, ds, epochs=20, batch_size=16)
  >>> history["test_accuracy"][-1] > 0.8
  True
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import parallel
from .layers.base import check_int, count_non_finite, is_real

GRADS = ("manual", "autodiff")
OPTIMIZERS = ("sgd", "momentum", "adam")
# At most this many training samples are re-evaluated after each epoch.
TRAIN_EVAL_SAMPLES = 10_000
# Forward passes for evaluation run over chunks of this many samples.
EVAL_CHUNK = 1024


class TrainState(NamedTuple):
    """Everything that determines how training continues.

    Attributes:
      params: the network's parameter pytree.
      opt_state: the optax state.
      key: the PRNG key; each epoch splits off the key that shuffles it.
      epoch: completed epochs.
      step: completed optimizer steps.
    """

    params: Any
    opt_state: Any
    key: jax.Array
    epoch: int = 0
    step: int = 0


def is_train_state(state) -> bool:
    """A ``TrainState`` (judged by its fields, so it survives a reload of this module)."""
    return isinstance(state, tuple) and getattr(state, "_fields", None) == TrainState._fields


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss, the parameters or the optimizer state became NaN or Inf.

    ``what`` says which (``"loss is nan"``, ``"the update made the parameters
    non-finite"``, ``"the epoch's test loss is inf"``, …); ``epoch`` and ``step`` (1-based
    within the epoch) say where. ``state`` is the last good state: the one the
    epoch started from, which ``on_epoch`` has already seen (or the state ``fit``
    was given, when it is the first epoch of the call).
    """

    def __init__(self, what: str, epoch: int, step: int, steps: int, global_step: int, state):
        self.what, self.epoch, self.step, self.global_step, self.state = (
            what, epoch, step, global_step, state,
        )
        super().__init__(
            f"training diverged: {what} at epoch {epoch}, step {step} of {steps} "
            f"(global step {global_step})"
        )


# --------------------------------------------------------------- optimizers


def _check_rate(fn: str, arg: str, value, strict: bool = False) -> None:
    """A finite number ``value`` > 0 (``strict``) or ≥ 0, or an optax schedule (a callable)."""
    if callable(value):
        return
    if not is_real(value) or not (value > 0 if strict else value >= 0) or not np.isfinite(value):
        raise ValueError(f"{fn}: {arg} must be a finite number {'>' if strict else '>='} 0; "
                         f"got {value!r}")


def optimizer(name: str, learning_rate: float, momentum: float = 0.9):
    """``"sgd"``, ``"momentum"`` (SGD with ``momentum``) or ``"adam"`` as an optax transform."""
    _check_rate("optimizer", "learning_rate", learning_rate, strict=True)
    _check_rate("optimizer", "momentum", momentum)
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"optimizer: name must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def decay_mask(net):
    """An optax mask (a function of params): True on each layer's ``decay_keys`` leaves.

    Use as ``optax.add_decayed_weights(λ, mask=decay_mask(net))`` to decay weights
    and kernels but never biases — the leaves the objective ``λ/2 Σ‖W‖²`` covers.
    """

    def mask(params):
        layers = zip(net.layers, params, strict=True)
        return [{k: k in layer.decay_keys for k in p} for layer, p in layers]

    return mask


def freeze(opt, keys=("b",)):
    """``opt`` for every parameter except those named in ``keys``, which never change."""

    def labels(params):
        return [{k: "frozen" if k in keys else "train" for k in p} for p in params]

    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------- step


def value_and_grad_fn(net, grad: str = "manual"):
    """``(params, x, y) -> (J, ∂J/∂params)`` by hand (``"manual"``) or by ``"autodiff"``."""
    if grad == "manual":
        return net.manual_value_and_grad
    if grad == "autodiff":
        return jax.value_and_grad(net.loss)
    raise ValueError(f"train: grad must be one of {', '.join(GRADS)}; got {grad!r}")


def _step_fn(net, opt, grad):
    value_and_grad = value_and_grad_fn(net, grad)

    def step(params, opt_state, batch):
        x, y = batch
        loss, grads = value_and_grad(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    return step


def make_train_step(net, opt, grad: str = "manual"):
    """One jitted, pure optimizer step.

    ``step(params, opt_state, (x, y)) -> (params, opt_state, metrics)``;
    ``metrics["loss"]`` is the objective ``J`` at the parameters before the step.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxbp import models
      >>> net = models.mlp(hidden=(8,), classes=3)
      >>> params = net.init(jax.random.key(0), (4,))
      >>> opt = optax.sgd(0.1)
      >>> step = make_train_step(net, opt)
      >>> x, y = jnp.ones((5, 4)), jnp.zeros(5, int)
      >>> params, opt_state, m = step(params, opt.init(params), (x, y))
      >>> m["loss"].shape
      ()
    """
    return jax.jit(_step_fn(net, opt, grad))


@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4))
def _init(net, opt, key, input_shape, dtype):
    init_key, key = jax.random.split(key)
    params = net.init(init_key, input_shape, dtype)
    return params, opt.init(params), key


def init_state(net, opt, key, input_shape, dtype=None) -> TrainState:
    """Fresh parameters, optimizer state and PRNG key (split from ``key``), in one jitted call."""
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
        raise ValueError(f"init_state: input_shape must be a tuple of ints (batch axis "
                         f"excluded), e.g. (64,) or (8, 8, 1); got {input_shape!r}")
    dtype = None if dtype is None else np.dtype(dtype).name
    return TrainState(*_init(net, opt, key, tuple(input_shape), dtype), 0, 0)


# --------------------------------------------------------------- evaluation


def accuracy(y_hat, y):
    """Fraction of rows whose arg-max matches the integer label (or one-hot target's arg-max)."""
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=1)
    return jnp.mean((jnp.argmax(y_hat, axis=1) == labels).astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _evaluate(net, params, x, y, batch_sharding):
    n = x.shape[0]
    chunk = min(n, EVAL_CHUNK)
    if batch_sharding is not None:  # every chunk must split evenly over the devices
        devices = batch_sharding.mesh.size
        chunk = -(-chunk // devices) * devices
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(chunks, chunk, *x.shape[1:])

    def forward(xc):
        if batch_sharding is not None:
            xc = jax.lax.with_sharding_constraint(xc, batch_sharding)
        return net.forward(params, xc)

    y_hat = jax.lax.map(forward, xs).reshape(chunks * chunk, -1)[:n]
    return net.loss_fn.value(y_hat, y), accuracy(y_hat, y)


def evaluate(net, params, x, y, mesh=None):
    """``(L, accuracy)`` over all of ``(x, y)``: the data loss without weight decay, jitted."""
    if np.shape(x)[:1] in ((), (0,)):
        raise ValueError(f"evaluate: x must hold at least one sample; got shape {np.shape(x)}")
    return _evaluate(net, params, x, y, parallel.batch_sharding(mesh))


# ---------------------------------------------------------------- epochs


def _epoch_indices(key, n, steps, batch_size, impl):
    """Split ``key`` (raw key data of ``impl``); the new subkey shuffles ``n`` samples
    into ``steps`` batches. Returns the rest of the key as raw data again."""
    key, shuffle = jax.random.split(jax.random.wrap_key_data(key, impl=impl))
    perm = jax.random.permutation(shuffle, n)[: steps * batch_size]
    return jax.random.key_data(key), perm.reshape(steps, batch_size)


def _all_finite(tree):
    """Whether no float leaf of ``tree`` holds a NaN or ±inf (a boolean array, traceable)."""
    checks = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def _checked(step):
    """``step`` whose metrics are ``(loss, params finite, opt_state finite)``.

    The loss is computed before the update, the two flags after it, so a step
    whose update overflows is caught at that step, not one step later.
    """

    def checked(params, opt_state, batch):
        params, opt_state, metrics = step(params, opt_state, batch)
        return params, opt_state, (metrics["loss"], _all_finite(params), _all_finite(opt_state))

    return checked


def _fused_epoch(step, steps, batch_size, impl, batch_sharding):
    """One epoch as a single jitted ``lax.scan`` over its steps; the data stays on device.

    ``step`` is a ``_checked`` step; the epoch returns its metrics stacked over the steps.
    """

    def epoch(params, opt_state, key, x, y):
        key, idx = _epoch_indices(key, x.shape[0], steps, batch_size, impl)

        def body(carry, i):
            batch = (x[i], y[i])
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            params, opt_state, checks = step(*carry, batch)
            return (params, opt_state), checks

        (params, opt_state), checks = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state, key, checks

    return jax.jit(epoch)


def _looped_epoch(step, steps, batch_size, impl, mesh):
    """One epoch as a Python loop over a jitted step; batches are gathered on the host."""
    jit_step = jax.jit(step)
    # A closure of its own: jitting the module-level function would share its cache
    # (and the count in ``history["compiled"]``) with every earlier ``fit``.
    indices = jax.jit(lambda key, n: _epoch_indices(key, n, steps, batch_size, impl),
                      static_argnums=1)

    def epoch(params, opt_state, key, x, y):
        key, idx = indices(key, x.shape[0])
        checks = []
        for i in np.asarray(idx):
            batch = parallel.shard_batch((x[i], y[i]), mesh)
            params, opt_state, step_checks = jit_step(params, opt_state, batch)
            checks.append(step_checks)
        return params, opt_state, key, tuple(jnp.stack(c) for c in zip(*checks))

    epoch.compiled = (jit_step, indices)
    return epoch


def _fits_on_device(nbytes: int) -> bool:
    """Fuse epochs when the training data takes at most a quarter of device memory."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit", 4 * 2**30)
    return nbytes <= limit // 4


def check_fit_arguments(net, state: TrainState, data, *, epochs, batch_size, devices=None,
                        opt=None, on_epoch=None):
    """Raise ``ValueError`` for arguments ``fit`` cannot train with; return the mesh.

    Cheap (one pass over the data, no training FLOPs), so callers can check before
    any expensive work: ``epochs`` and ``batch_size`` are positive ints,
    ``batch_size`` fits the training split and divides over the devices, ``state``
    is a ``TrainState`` (and, given ``opt``, holds a state of ``opt``), ``data``
    has both splits with finite features, ``on_epoch`` is callable or ``None``,
    and the labels of both splits suit the network's output (e.g. integer labels
    lie in ``[0, classes)``); a classifier's training split holds at least two
    classes and every class of the test split.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_int("fit", name, value)
    if on_epoch is not None and not callable(on_epoch):
        raise ValueError(f"fit: on_epoch must be callable as on_epoch(state, record) or None; "
                         f"got {type(on_epoch).__name__}")
    if not is_train_state(state):
        raise ValueError(f"fit: state must be a train.TrainState (init_state or a restored "
                         f"checkpoint); got {type(state).__name__}")
    missing = [a for a in ("x_train", "y_train", "x_test", "y_test") if not hasattr(data, a)]
    if missing:
        raise ValueError(f"fit: data must be a data.Dataset (with x_train, y_train, x_test, "
                         f"y_test); got {type(data).__name__} without {', '.join(missing)}")
    if opt is not None:
        expected = jax.tree.structure(jax.eval_shape(opt.init, state.params))
        if jax.tree.structure(state.opt_state) != expected:
            raise ValueError("fit: state.opt_state is not a state of opt (made by another "
                             "optimizer?); build the state with init_state(net, opt, key, "
                             "input_shape)")
    for split in ("train", "test"):
        bad = count_non_finite(getattr(data, f"x_{split}"))
        if bad:
            raise ValueError(f"fit: x_{split} holds {bad} non-finite value(s) (NaN or ±inf)")
    mesh = parallel.data_mesh(devices)
    n_devices = 1 if mesh is None else mesh.size
    n = len(data.x_train)
    if batch_size > n:
        raise ValueError(f"fit: batch_size {batch_size} exceeds the {n} training samples")
    if batch_size % n_devices:
        raise ValueError(
            f"fit: batch_size {batch_size} must be divisible by the number of devices "
            f"({n_devices}) for data parallelism"
        )
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        try:
            net.validate_labels(state.params, x, y)
        except ValueError as err:
            raise ValueError(f"fit: {split} split: {err}") from None
    if net.loss_fn.takes_labels:  # a classifier: classes the test split needs, trained
        from .data import check_classes, classes_in

        train_classes, test_classes = classes_in(data.y_train), classes_in(data.y_test)
        if train_classes is not None and test_classes is not None:
            check_classes(train_classes, test_classes, "fit", "fit", every_class=False)
    return mesh


def fit(
    net,
    opt,
    state: TrainState,
    data,
    *,
    epochs: int,
    batch_size: int,
    grad: str = "manual",
    devices: int | None = None,
    fused: bool | None = None,
    on_epoch=None,
    progress: bool = False,
):
    """Train until ``state.epoch == epochs``; return ``(state, history)``.

    Each epoch splits ``state.key``, shuffles the training split with the new
    subkey, and takes ``len(x_train) // batch_size`` steps (the remainder is left
    out of that epoch, so every step has the same shape and nothing recompiles).
    It then evaluates the test split and at most ``TRAIN_EVAL_SAMPLES`` training
    samples. Given the same state and data, the result is deterministic, so
    ``fit(..., epochs=2N)`` equals ``fit(..., epochs=N)`` followed by another
    ``fit(..., epochs=2N)`` from the returned (or checkpointed) state.

    Args:
      net: a ``Sequential``.
      opt: an optax ``GradientTransformation`` (``state.opt_state`` is its state).
      state: a ``TrainState`` (``init_state`` or a restored checkpoint).
      data: a ``jaxbp.data.Dataset`` (or anything with ``x_train``, ``y_train``,
        ``x_test``, ``y_test``).
      epochs: the epoch to stop after, a positive int (counting from 0, so a
        restored state continues where it stopped; at most ``state.epoch``: nothing
        to do, and the history is empty).
      batch_size: samples per step, a positive int; divisible by the number of devices.
      grad: ``"manual"`` or ``"autodiff"``.
      devices: devices for data parallelism (``jaxbp.parallel``); ``None`` uses
        every visible device, 1 a single device.
      fused: run each epoch as one ``lax.scan`` with the data on the device; ``None``
        decides by the data's size; ``False`` loops over a jitted step in Python.
      on_epoch: called as ``on_epoch(state, record)`` after each epoch (e.g. to
        save a checkpoint); ``record`` holds that epoch's history entries.
      progress: show a tqdm bar over the epochs with loss and accuracy.

    Returns:
      ``(state, history)``; ``history`` maps ``epoch``, ``step`` (optimizer steps
      completed by the end of that epoch, counting those before this call),
      ``train_loss`` (mean ``J`` over the epoch's steps), ``train_accuracy``,
      ``test_loss`` (data loss ``L``), ``test_accuracy`` and ``time`` (seconds
      since ``fit`` started, compilation included) to per-epoch lists, plus
      ``steps`` (steps this call took), ``device`` and
      ``compiled`` (the entries this call's epoch functions added to jit's cache,
      i.e. the programs they compiled: 1 fused, 2 looped — never more, however
      many epochs ran; 0 when no epoch ran).

    Raises:
      ValueError: an argument ``check_fit_arguments`` rejects, before any training.
      NonFiniteLossError: a step's loss, the parameters or the optimizer state
        after an update, or the epoch's train or test loss became NaN or Inf;
        names the epoch and the step. That epoch reaches neither the returned
        history nor ``on_epoch``, so a checkpoint saved there is only ever
        written from finite values; ``err.state`` is the last good state.
    """
    mesh = check_fit_arguments(net, state, data, epochs=epochs, batch_size=batch_size,
                               devices=devices, opt=opt, on_epoch=on_epoch)
    epochs, batch_size = int(epochs), int(batch_size)
    n_devices = 1 if mesh is None else mesh.size
    n = len(data.x_train)
    steps = n // batch_size
    first = parallel.devices(mesh)[0]
    if fused is None:
        fused = _fits_on_device(data.x_train.nbytes + data.y_train.nbytes)

    # The training data goes to the device(s) once (replicated: every device can
    # gather any batch); the looped path keeps it on the host instead.
    put = functools.partial(parallel.replicate, mesh=mesh)
    x_train, y_train = (put(a) if fused else np.asarray(a) for a in (data.x_train, data.y_train))
    m = min(n, TRAIN_EVAL_SAMPLES)
    x_seen, y_seen = put(data.x_train[:m]), put(data.y_train[:m])
    x_test, y_test = put(data.x_test), put(data.y_test)
    params, opt_state = put(state.params), put(state.opt_state)
    # The epochs carry the key's raw data: on a mesh, a typed key returned by a jitted
    # function alternates between two equal physical shardings (P() and P(None)), so
    # every other epoch missed jit's dispatch cache and added an entry (jax 0.10).
    impl = jax.random.key_impl(state.key)
    typed = jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    key = put(jax.random.key_data(state.key))

    def as_key(raw):  # the key as the caller passed it: typed or raw
        return jax.random.wrap_key_data(raw, impl=impl) if typed else raw

    step = _checked(_step_fn(net, opt, grad))
    if fused:
        run_epoch = _fused_epoch(step, steps, batch_size, impl, parallel.batch_sharding(mesh))
    else:
        run_epoch = _looped_epoch(step, steps, batch_size, impl, mesh)

    history = {k: [] for k in ("epoch", "step", "train_loss", "train_accuracy", "test_loss",
                               "test_accuracy", "time")}
    kind = first.platform if first.device_kind == first.platform else first.device_kind
    history["steps"], history["device"] = 0, f"{n_devices} × {kind}"
    bar = None
    if progress and state.epoch < epochs:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=state.epoch, unit="epoch", desc="train")
    start = time.perf_counter()
    epoch, global_step = state.epoch, state.step
    try:
        while epoch < epochs:
            params_next, opt_next, key_next, checks = run_epoch(
                params, opt_state, key, x_train, y_train
            )
            losses = np.asarray(checks[0])
            test_loss, test_acc = evaluate(net, params_next, x_test, y_test, mesh)
            _, train_acc = evaluate(net, params_next, x_seen, y_seen, mesh)
            record = {
                "epoch": epoch + 1,
                "step": global_step + steps,
                "train_loss": float(np.mean(losses)),
                "train_accuracy": float(train_acc),
                "test_loss": float(test_loss),
                "test_accuracy": float(test_acc),
                "time": time.perf_counter() - start,
            }
            # Nothing of a diverged epoch reaches the state, the history or on_epoch.
            problem = _divergence(losses, *(np.asarray(c) for c in checks[1:]), record)
            if problem is not None:
                i, what = problem
                good = TrainState(params, opt_state, as_key(key), epoch, global_step)
                raise NonFiniteLossError(what, epoch + 1, i + 1, steps, global_step + i + 1, good)
            params, opt_state, key = params_next, opt_next, key_next
            epoch, global_step = epoch + 1, global_step + steps
            for k, v in record.items():
                history[k].append(v)
            history["steps"] += steps
            state = TrainState(params, opt_state, as_key(key), epoch, global_step)
            if on_epoch is not None:
                on_epoch(state, record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                acc=f"{record['train_accuracy']:.3f}",
                                test_acc=f"{record['test_accuracy']:.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    history["compiled"] = _compile_counts(run_epoch)
    return state, history


def _divergence(losses, params_finite, opt_state_finite, record):
    """``(step index, what)`` of an epoch's first non-finite value, or ``None``.

    Per step, the loss (before the update) comes before the parameters and the
    optimizer state (after it); the epoch's losses come after its last step.
    """
    bad = ~(np.isfinite(losses) & params_finite & opt_state_finite)
    if bad.any():
        i = int(np.argmax(bad))
        if not np.isfinite(losses[i]):
            return i, f"loss is {losses[i]}"
        what = "parameters" if not params_finite[i] else "optimizer state"
        return i, f"the update made the {what} non-finite"
    for name in ("train_loss", "test_loss"):
        if not np.isfinite(record[name]):
            return len(losses) - 1, f"the epoch's {name.replace('_', ' ')} is {record[name]}"
    return None


def _compile_counts(run_epoch) -> int:
    """How many programs the epoch function compiled (1 when nothing recompiled)."""
    fns = getattr(run_epoch, "compiled", (run_epoch,))
    return sum(f._cache_size() for f in fns)
