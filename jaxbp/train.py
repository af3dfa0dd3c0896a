"""Training with optax: one jitted step, epochs fused with ``lax.scan``, evaluation.

A training step computes ``(J, ∂J/∂params)`` and the network's new state (BatchNorm's
running statistics) in train mode, either by the hand-written backward pass
(``grad="manual"``, ``net.manual_step``) or by autodiff (``grad="autodiff"``,
``jax.value_and_grad(net.loss_and_state, has_aux=True)``), then applies any optax
``GradientTransformation``. Both give the same parameters up to rounding. Each
step of a network with Dropout gets its own key, split from the epoch's.

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
from .data import check_classes, classes_in
from .layers.base import check_int, check_real, count_non_finite

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
      key: the PRNG key; each epoch splits off the key that shuffles it (and,
        for a network with Dropout, the keys of its steps).
      epoch: completed epochs.
      step: completed optimizer steps.
      net_state: the network's state (``net.init_state``: BatchNorm's running
        statistics); ``None`` for a network without state.
    """

    params: Any
    opt_state: Any
    key: jax.Array
    epoch: int = 0
    step: int = 0
    net_state: Any = None


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
    check_real(fn, arg, value, 0, strict=strict)


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
    """An optax mask (a function of params): True on every nested weight matrix and kernel.

    Use as ``optax.add_decayed_weights(λ, mask=decay_mask(net))`` to decay weights
    and kernels but never biases or normalisation scales — the leaves the
    objective ``λ/2 Σ‖W‖²`` covers.
    """
    return net.body.decayed


def freeze(opt, keys=("b",)):
    """``opt`` for every parameter except those named in ``keys``, which never change."""

    def labels(params):
        return [{k: "frozen" if k in keys else "train" for k in p} for p in params]

    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------- step


def _step_fn(net, opt, grad):
    if grad not in GRADS:
        raise ValueError(f"train: grad must be one of {', '.join(GRADS)}; got {grad!r}")

    def step(params, opt_state, batch, net_state=None, key=None):
        x, y = batch
        mode = {"state": net_state, "key": key, "train": True}
        if grad == "manual":
            loss, grads, net_state = net.manual_step(params, x, y, **mode)
        else:
            (loss, net_state), grads = jax.value_and_grad(net.loss_and_state, has_aux=True)(
                params, x, y, **mode)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss,
                                                                 "net_state": net_state}

    return step


def make_train_step(net, opt, grad: str = "manual"):
    """One jitted, pure optimizer step, in train mode.

    ``step(params, opt_state, (x, y), net_state=None, key=None) -> (params,
    opt_state, metrics)``; ``metrics["loss"]`` is the objective ``J`` at the
    parameters before the step and ``metrics["net_state"]`` the network's state
    after it (pass it to the next step; ``net_state`` and ``key`` are needed only
    by networks with BatchNorm or Dropout).

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
    net_state = net.init_state(init_key, input_shape, dtype) if net.stateful else None
    return params, opt.init(params), key, net_state


def init_state(net, opt, key, input_shape, dtype=None) -> TrainState:
    """Fresh parameters, optimizer state, PRNG key (split from ``key``) and network state.

    One jitted call; the network state is ``None`` for a network without state.
    """
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
        raise ValueError(f"init_state: input_shape must be a tuple of ints (batch axis "
                         f"excluded), e.g. (64,) or (8, 8, 1); got {input_shape!r}")
    dtype = None if dtype is None else np.dtype(dtype).name
    params, opt_state, key, net_state = _init(net, opt, key, tuple(input_shape), dtype)
    return TrainState(params, opt_state, key, 0, 0, net_state)


# --------------------------------------------------------------- evaluation


def accuracy(y_hat, y):
    """Fraction of rows whose arg-max matches the integer label (or one-hot target's arg-max)."""
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=1)
    return jnp.mean((jnp.argmax(y_hat, axis=1) == labels).astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _evaluate(net, params, x, y, batch_sharding, net_state):
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
        return net.forward(params, xc, state=net_state)  # eval mode

    y_hat = jax.lax.map(forward, xs).reshape(chunks * chunk, -1)[:n]
    return net.loss_fn.value(y_hat, y), accuracy(y_hat, y)


def evaluate(net, params, x, y, mesh=None, net_state=None):
    """``(L, accuracy)`` over all of ``(x, y)`` in eval mode: the data loss without weight decay.

    Jitted; ``net_state`` is the network's state (BatchNorm's running statistics).
    """
    if np.shape(x)[:1] in ((), (0,)):
        raise ValueError(f"evaluate: x must hold at least one sample; got shape {np.shape(x)}")
    return _evaluate(net, params, x, y, parallel.batch_sharding(mesh), net_state)


# ---------------------------------------------------------------- epochs


def _epoch_indices(key, n, steps, batch_size, impl):
    """Split ``key`` (raw key data of ``impl``); the new subkey shuffles ``n`` samples
    into ``steps`` batches and gives each step its key (for Dropout). Returns the rest
    of the key as raw data again, the batches' indices and the steps' keys."""
    key, shuffle = jax.random.split(jax.random.wrap_key_data(key, impl=impl))
    perm = jax.random.permutation(shuffle, n)[: steps * batch_size]
    step_keys = jax.random.split(jax.random.fold_in(shuffle, 1), steps)
    return jax.random.key_data(key), perm.reshape(steps, batch_size), step_keys


def _all_finite(tree):
    """Whether no float leaf of ``tree`` holds a NaN or ±inf (a boolean array, traceable)."""
    checks = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def _checked(step, stochastic: bool):
    """``step(params, net_state, opt_state, batch, key)`` on one carry; checks as metrics.

    The checks are ``(loss, params finite, opt_state finite)``: the loss is
    computed before the update, the two flags after it, so a step whose update
    overflows is caught at that step, not one step later. The step's key reaches
    the network only if it has Dropout.
    """

    def checked(carry, batch, key):
        params, net_state, opt_state = carry
        params, opt_state, metrics = step(params, opt_state, batch, net_state,
                                          key if stochastic else None)
        checks = (metrics["loss"], _all_finite(params), _all_finite(opt_state))
        if net_state is not None:  # (None stays None: a network without state)
            net_state = metrics["net_state"]
        return (params, net_state, opt_state), checks

    return checked


def fused_epoch(net, opt, grad, steps, batch_size, impl, batch_sharding=None):
    """``fit``'s epoch: ``epoch(carry, raw_key, x, y) -> (carry, raw_key, checks)``, jitted.

    ``carry`` is ``(params, net_state, opt_state)``; ``raw_key`` the raw data of
    a key of implementation ``impl``; ``(x, y)`` the whole training split on the
    device. One ``lax.scan`` over ``steps`` shuffled batches of ``batch_size``;
    ``checks`` are each step's ``(loss, params finite, opt_state finite)``.
    """
    step = _checked(_step_fn(net, opt, grad), net.body.stochastic)
    return _scanned_epoch(step, steps, batch_size, impl, batch_sharding)


def _scanned_epoch(step, steps, batch_size, impl, batch_sharding):
    """One epoch as a single jitted ``lax.scan`` over its steps; the data stays on device."""

    def epoch(carry, key, x, y):
        key, idx, step_keys = _epoch_indices(key, x.shape[0], steps, batch_size, impl)

        def body(carry, i_and_key):
            i, step_key = i_and_key
            batch = (x[i], y[i])
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return step(carry, batch, step_key)

        carry, checks = jax.lax.scan(body, carry, (idx, step_keys))
        return carry, key, checks

    return jax.jit(epoch)


def _looped_epoch(step, steps, batch_size, impl, mesh):
    """One epoch as a Python loop over a jitted step; batches are gathered on the host."""
    jit_step = jax.jit(step)
    # A closure of its own: jitting the module-level function would share its cache
    # (and the count in ``history["compiled"]``) with every earlier ``fit``.
    indices = jax.jit(lambda key, n: _epoch_indices(key, n, steps, batch_size, impl),
                      static_argnums=1)

    def epoch(carry, key, x, y):
        key, idx, step_keys = indices(key, x.shape[0])
        checks = []
        for i, step_key in zip(np.asarray(idx), step_keys):
            batch = parallel.shard_batch((x[i], y[i]), mesh)
            carry, step_checks = jit_step(carry, batch, step_key)
            checks.append(step_checks)
        return carry, key, tuple(jnp.stack(c) for c in zip(*checks))

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
    """Raise ``ValueError`` for arguments ``fit`` cannot train with.

    Cheap (one pass over the data, no training FLOPs), so callers can check before
    any expensive work: ``epochs`` and ``batch_size`` are positive ints,
    ``batch_size`` fits the training split and divides over the devices, ``state``
    is a ``TrainState`` (and, given ``opt``, holds a state of ``opt``; a network
    with state needs ``state.net_state``), ``data``
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
    if net.stateful and state.net_state is None:
        raise ValueError("fit: the network has state (BatchNorm); state.net_state must hold it "
                         "(build the state with init_state(net, opt, key, input_shape))")
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        try:
            net.validate_labels(state.params, x, y, state=state.net_state)
        except ValueError as err:
            raise ValueError(f"fit: {split} split: {err}") from None
    if net.loss_fn.takes_labels:  # a classifier: classes the test split needs, trained
        train_classes, test_classes = classes_in(data.y_train), classes_in(data.y_test)
        if train_classes is not None and test_classes is not None:
            check_classes(train_classes, test_classes, "fit", "fit", every_class=False)


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
      progress: show a tqdm bar over the epochs with loss and accuracy (its ETA
        leaves out the first epoch, which compiles).

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
    check_fit_arguments(net, state, data, epochs=epochs, batch_size=batch_size,
                        devices=devices, opt=opt, on_epoch=on_epoch)
    epochs, batch_size = int(epochs), int(batch_size)
    mesh = parallel.data_mesh(devices)
    steps = len(data.x_train) // batch_size
    if fused is None:
        fused = _fits_on_device(data.x_train.nbytes + data.y_train.nbytes)
    placed = _place(state, data, mesh, fused)
    impl = jax.random.key_impl(state.key)
    if fused:
        run_epoch = fused_epoch(net, opt, grad, steps, batch_size, impl,
                                parallel.batch_sharding(mesh))
    else:
        step = _checked(_step_fn(net, opt, grad), net.body.stochastic)
        run_epoch = _looped_epoch(step, steps, batch_size, impl, mesh)
    history = {k: [] for k in RECORD}
    first = parallel.devices(mesh)[0]
    kind = first.platform if first.device_kind == first.platform else first.device_kind
    history["steps"] = 0
    history["device"] = f"{1 if mesh is None else mesh.size} × {kind}"
    bar = _EpochBar(epochs, state.epoch) if progress and state.epoch < epochs else None
    run = _epochs(net, state, placed, run_epoch, steps, epochs, mesh)
    try:
        for state, record in run:  # noqa: B020 (the last state is fit's result)
            for k, v in record.items():
                history[k].append(v)
            history["steps"] += steps
            if on_epoch is not None:
                on_epoch(state, record)
            if bar is not None:
                bar.update(state.epoch, loss=f"{record['train_loss']:.4f}",
                           acc=f"{record['train_accuracy']:.3f}",
                           test_acc=f"{record['test_accuracy']:.3f}")
    finally:
        if bar is not None:
            bar.close()
    history["compiled"] = _compile_counts(run_epoch)
    return state, history


RECORD = ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "time")


class _EpochBar:
    """A tqdm bar over the epochs ``done + 1 … epochs`` whose ETA leaves compilation out.

    The first epoch of a call also compiles the epoch program, which can take
    longer than many compiled epochs; tqdm's rate, and with it the ETA, would
    count it for the rest of the run (its smoothing forgets it only slowly). So
    that epoch has a bar of its own, "train (compiling)", and when it ends a new
    bar takes over at the epochs done: its clock and rate start there, counting
    compiled epochs only. The bars only watch the epochs (no extra or warm-up
    run), so training gives the same results, bit for bit, with or without them.

    ``update(epoch, **postfix)`` after each epoch (``epoch``: the epochs done),
    ``close()`` at the end.
    """

    def __init__(self, epochs: int, done: int):
        from tqdm.auto import tqdm

        self._tqdm, self._epochs, self._first = tqdm, epochs, True
        # (a bar for one epoch stays: no other replaces it)
        self._bar = tqdm(total=epochs, initial=done, unit="epoch", desc="train (compiling)",
                         leave=epochs - done == 1)

    def update(self, epoch: int, **postfix) -> None:
        if self._first and epoch < self._epochs:
            self._bar.close()
            self._bar = self._tqdm(total=self._epochs, initial=epoch, unit="epoch", desc="train")
            self._bar.set_postfix(postfix)
        else:
            if self._first:
                self._bar.set_description("train", refresh=False)
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
        self._first = False

    def close(self) -> None:
        self._bar.close()


class _Placed(NamedTuple):
    """What the epochs read, on the device(s): the carry, the raw key and the data."""

    carry: tuple  # (params, net_state, opt_state)
    key: jax.Array  # raw key data (see _place)
    train: tuple  # (x, y) on the device when fused, else on the host
    seen: tuple  # at most TRAIN_EVAL_SAMPLES training samples, re-evaluated each epoch
    test: tuple


def _place(state, data, mesh, fused) -> _Placed:
    """The state and data on the device(s), replicated: every device can gather any batch.

    The looped path keeps the training data on the host instead. The epochs carry
    the key's raw data: on a mesh, a typed key returned by a jitted function
    alternates between two equal physical shardings (P() and P(None)), so every
    other epoch missed jit's dispatch cache and added an entry (jax 0.10).
    """
    put = functools.partial(parallel.replicate, mesh=mesh)
    train = tuple(put(a) if fused else np.asarray(a) for a in (data.x_train, data.y_train))
    m = min(len(data.x_train), TRAIN_EVAL_SAMPLES)
    carry = (put(state.params), put(state.net_state), put(state.opt_state))
    return _Placed(carry, put(jax.random.key_data(state.key)), train,
                   (put(data.x_train[:m]), put(data.y_train[:m])),
                   (put(data.x_test), put(data.y_test)))


def _epochs(net, state, placed, run_epoch, steps, epochs, mesh):
    """Run epochs until ``epochs``, yielding ``(state, record)`` after each.

    Nothing of a diverged epoch reaches the state or a record: its
    ``NonFiniteLossError`` carries the state the epoch started from.
    """
    impl = jax.random.key_impl(state.key)
    typed = jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)

    def as_state(carry, raw_key, epoch, step):  # the key as the caller passed it
        key = jax.random.wrap_key_data(raw_key, impl=impl) if typed else raw_key
        params, net_state, opt_state = carry
        return TrainState(params, opt_state, key, epoch, step, net_state)

    carry, key = placed.carry, placed.key
    epoch, global_step, start = state.epoch, state.step, time.perf_counter()
    while epoch < epochs:
        carry_next, key_next, checks = run_epoch(carry, key, *placed.train)
        losses = np.asarray(checks[0])
        params, net_state = carry_next[:2]
        test_loss, test_acc = evaluate(net, params, *placed.test, mesh, net_state)
        _, train_acc = evaluate(net, params, *placed.seen, mesh, net_state)
        record = {
            "epoch": epoch + 1,
            "step": global_step + steps,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(train_acc),
            "test_loss": float(test_loss),
            "test_accuracy": float(test_acc),
            "time": time.perf_counter() - start,
        }
        problem = _divergence(losses, *(np.asarray(c) for c in checks[1:]), record)
        if problem is not None:
            i, what = problem
            good = as_state(carry, key, epoch, global_step)
            raise NonFiniteLossError(what, epoch + 1, i + 1, steps, global_step + i + 1, good)
        carry, key = carry_next, key_next
        epoch, global_step = epoch + 1, global_step + steps
        yield as_state(carry, key, epoch, global_step), record


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
