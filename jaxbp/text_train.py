"""Training a character-level language model on random windows of a text.

An epoch is ``steps_per_epoch`` optimizer steps, each on ``batch_size`` random
windows of ``length`` characters (:func:`jaxbp.text.windows`), all of them fused
in one jitted ``lax.scan`` with the windows stacked (steps, batch, length) on
the device. The windows of epoch ``e`` come from
``np.random.default_rng((seed, e))`` alone, so a run continued from a
checkpoint draws exactly the windows an uninterrupted run would, and ends with
the same parameters.

After each epoch the model is evaluated on the held-out ids: the mean
cross-entropy per character of the next-character predictions in eval mode,

    val_loss = −(1/N) Σ_{n,t} log softmax(z_{n,t})[y_{n,t}]     (nats per character)
    val_bpc  = val_loss / ln 2                                 (bits per character)

over :func:`jaxbp.text.eval_windows` (at most ``val_windows`` non-overlapping windows).

Example:
  >>> import jax, optax
  >>> from jaxbp import models, text, train
  >>> ids = text.CharVocab.from_text("ab").encode("abab" * 100)
  >>> data = text.TextData(text.CharVocab("ab"), ids[:300], ids[300:], "ab")
  >>> net, opt = models.char_rnn(2, cell="gru", hidden=8, embed=4), optax.adam(3e-2)
  >>> state = train.init_state(net, opt, jax.random.key(0), (8,), "float32")
  >>> state, history = fit_text(net, opt, state, data, epochs=2, steps_per_epoch=20,
  ...                           batch_size=4, length=8, progress=False)
  >>> state.epoch, state.step, history["val_loss"][-1] < 0.1   # "abab…" is predictable
  (2, 40, True)
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import text, train
from .layers.base import check_int
from .losses import SoftmaxCrossEntropy

RECORD = ("epoch", "step", "train_loss", "val_loss", "val_bpc", "time")
# Validation forward passes run over chunks of this many windows.
VAL_CHUNK = 64


@functools.lru_cache(maxsize=8)
def text_epoch(net, opt, grad: str):
    """One epoch, jitted: ``epoch(carry, key, xs, ys) -> (carry, key, checks)``.

    ``carry`` is ``(params, net_state, opt_state)``; ``xs``, ``ys`` the epoch's
    windows (steps, batch, length). ``key`` is split as ``fit`` splits it (the
    steps' keys reach only a network with Dropout); ``checks`` are each step's
    ``(loss, params finite, opt_state finite)``. The same ``(net, opt, grad)``
    give the same function, so a later call reuses what an earlier one compiled.
    """
    step = train._checked(train._step_fn(net, opt, grad), net.body.stochastic)

    def epoch(carry, key, xs, ys):
        key, epoch_key = jax.random.split(key)
        step_keys = jax.random.split(epoch_key, xs.shape[0])

        def body(carry, batch_and_key):
            x, y, step_key = batch_and_key
            return step(carry, (x, y), step_key)

        carry, checks = jax.lax.scan(body, carry, (xs, ys, step_keys))
        return carry, key, checks

    return jax.jit(epoch)


@functools.partial(jax.jit, static_argnums=0)
def _val_loss(net, params, net_state, x, y):
    n, length = x.shape
    chunk = min(n, VAL_CHUNK)
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    counted = jnp.arange(chunks * chunk) < n  # padding windows add nothing
    xs, ys, ws = (a.reshape(chunks, chunk, *a.shape[1:]) for a in (
        jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(y, ((0, pad), (0, 0))), counted))

    def nats(batch):  # the summed −log p of the next characters in one chunk
        xc, yc, wc = batch
        logp = jax.nn.log_softmax(net.forward(params, xc, state=net_state), axis=-1)
        picked = jnp.take_along_axis(logp, yc[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(wc[:, None], picked, 0.0))

    return jnp.sum(jax.lax.map(nats, (xs, ys, ws))) / (n * length)


def val_loss(net, params, x, y, net_state=None) -> float:
    """The mean nats per character of the next-character predictions ``y`` for ``x``.

    ``x``, ``y``: int ids (windows, length), e.g. :func:`jaxbp.text.eval_windows`.
    Eval mode, jitted, over chunks of ``VAL_CHUNK`` windows.
    """
    if np.shape(x)[:1] in ((), (0,)) or np.ndim(x) != 2 or np.shape(x) != np.shape(y):
        raise ValueError(f"val_loss: x and y must be ids of one shape (windows, length) with "
                         f"at least one window; got {np.shape(x)} and {np.shape(y)}")
    return float(_val_loss(net, params, net_state, jnp.asarray(x), jnp.asarray(y)))


def check_fit_text_arguments(net, opt, state, data, *, epochs, steps_per_epoch, batch_size,
                             length, seed, on_epoch, val_windows) -> None:
    """Raise ``ValueError`` for arguments :func:`fit_text` cannot train with, before any work.

    Every count is a positive int (``seed`` an int >= 0), ``state`` a
    ``TrainState`` holding a state of ``opt``, the network is trained with
    softmax cross-entropy and reads every id of ``data`` (its vocabulary fits
    the Embedding and the output), and both splits hold a window of
    ``length + 1`` ids.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch),
                        ("batch_size", batch_size), ("length", length),
                        ("val_windows", val_windows)):
        check_int("fit_text", name, value)
    check_int("fit_text", "seed", seed, 0)
    if on_epoch is not None and not callable(on_epoch):
        raise ValueError(f"fit_text: on_epoch must be callable as on_epoch(state, record) or "
                         f"None; got {type(on_epoch).__name__}")
    if not train.is_train_state(state):
        raise ValueError(f"fit_text: state must be a train.TrainState (init_state or a restored "
                         f"checkpoint); got {type(state).__name__}")
    if not isinstance(data, text.TextData):
        raise ValueError(f"fit_text: data must be a text.TextData (text.load_text); got "
                         f"{type(data).__name__}")
    if not isinstance(net.loss_fn, SoftmaxCrossEntropy):
        raise ValueError(f"fit_text: net must predict the next character with "
                         f"SoftmaxCrossEntropy (models.char_rnn); got {net.loss_fn.name}")
    expected = jax.tree.structure(jax.eval_shape(opt.init, state.params))
    if jax.tree.structure(state.opt_state) != expected:
        raise ValueError("fit_text: state.opt_state is not a state of opt (made by another "
                         "optimizer?); build the state with init_state(net, opt, key, "
                         "input_shape)")
    if net.stateful and state.net_state is None:
        raise ValueError("fit_text: the network has state; state.net_state must hold it "
                         "(build the state with init_state(net, opt, key, input_shape))")
    for split in ("train", "val"):
        ids = getattr(data, f"{split}_ids")
        if len(ids) < length + 1:
            raise ValueError(f"fit_text: a window of length {length} needs {length + 1} ids; "
                             f"the {split} split holds {len(ids)}")
        try:
            net.body.check_input_values(ids)
        except ValueError as err:
            raise ValueError(f"fit_text: {split} split: {err}") from None
        classes = net.output_shape((length,))[-1]
        if ids.max() >= classes:
            raise ValueError(f"fit_text: {split} split: ids must lie in [0, {classes}) for the "
                             f"network's {classes} outputs; got {ids.max()}")


def fit_text(
    net,
    opt,
    state,
    data,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    length: int,
    grad: str = "manual",
    seed: int = 0,
    on_epoch=None,
    progress: bool = True,
    val_windows: int = 256,
):
    """Train until ``state.epoch == epochs`` on random windows; return ``(state, history)``.

    Epoch ``e`` (counting from 0) takes ``steps_per_epoch`` steps on windows drawn
    with ``np.random.default_rng((seed, e))``, so ``fit_text(..., epochs=2N)``
    equals ``fit_text(..., epochs=N)`` followed by ``fit_text(..., epochs=2N)``
    from the returned (or checkpointed) state, parameter for parameter.

    Args:
      net: a character model (:func:`jaxbp.models.char_rnn`): int ids (batch,
        length) in, next-character logits (batch, length, vocab_size) out.
      opt: an optax ``GradientTransformation`` (``state.opt_state`` is its state).
      state: a ``train.TrainState``.
      data: a :class:`jaxbp.text.TextData`.
      epochs: the epoch to stop after (a restored state continues from its epoch).
      steps_per_epoch, batch_size, length: steps per epoch, windows per step,
        characters per window.
      grad: ``"manual"`` (the hand-written BPTT) or ``"autodiff"``.
      seed: seeds the windows, an int >= 0.
      on_epoch: called as ``on_epoch(state, record)`` after each epoch.
      progress: show a tqdm bar over the epochs with the losses (its ETA leaves
        out the first epoch, which compiles).
      val_windows: at most this many validation windows of ``length``.

    Returns:
      ``(state, history)``; ``history`` maps ``epoch``, ``step``, ``train_loss``
      (mean ``J`` over the epoch's steps), ``val_loss`` (nats per character),
      ``val_bpc`` (bits per character) and ``time`` (seconds since the call
      started, compilation included) to per-epoch lists, plus ``steps`` (steps
      this call took), ``device`` and ``compiled`` (the programs :func:`text_epoch`
      of ``(net, opt, grad)`` has compiled: 1 per shape of the windows, however
      many epochs and calls ran).

    Raises:
      ValueError: an argument :func:`check_fit_text_arguments` rejects.
      train.NonFiniteLossError: a step's loss, the parameters or the optimizer
        state, or the epoch's validation loss became NaN or Inf; that epoch
        reaches neither the history nor ``on_epoch``, and ``err.state`` is the
        state it started from.
    """
    check_fit_text_arguments(net, opt, state, data, epochs=epochs,
                             steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                             length=length, seed=seed, on_epoch=on_epoch,
                             val_windows=val_windows)
    steps, batch_size, length = int(steps_per_epoch), int(batch_size), int(length)
    run_epoch = text_epoch(net, opt, grad)
    val = tuple(jnp.asarray(a) for a in text.eval_windows(data.val_ids, length, val_windows))
    device = jax.local_devices()[0]
    history = {k: [] for k in RECORD}
    history.update(steps=0, device=f"1 × {device.device_kind}")
    bar = train._EpochBar(epochs, state.epoch) if progress and state.epoch < epochs else None
    # On the device: a restored state holds NumPy arrays, for which jit would compile again.
    carry = jax.device_put((state.params, state.net_state, state.opt_state))
    start = time.perf_counter()
    try:
        while state.epoch < epochs:
            rng = np.random.default_rng((int(seed), state.epoch))
            x, y = text.windows(data.train_ids, steps * batch_size, length, rng)
            xs, ys = (a.reshape(steps, batch_size, length) for a in (x, y))
            carry_next, key, checks = run_epoch(carry, state.key, xs, ys)
            record = _record(net, state, carry_next, checks, val, start)
            _check_finite(checks, record, state)
            carry = carry_next
            params, net_state, opt_state = carry
            state = train.TrainState(params, opt_state, key, state.epoch + 1,
                                     state.step + steps, net_state)
            for k, v in record.items():
                history[k].append(v)
            history["steps"] += steps
            if on_epoch is not None:
                on_epoch(state, record)
            if bar is not None:
                bar.update(state.epoch, loss=f"{record['train_loss']:.4f}",
                           val=f"{record['val_loss']:.4f}", bpc=f"{record['val_bpc']:.3f}")
    finally:
        if bar is not None:
            bar.close()
    history["compiled"] = run_epoch._cache_size()
    return state, history


def _record(net, state, carry, checks, val, start) -> dict:
    """The history entries of the epoch that ``state`` started and ``carry`` ended."""
    params, net_state, _ = carry
    steps = len(checks[0])
    loss = float(_val_loss(net, params, net_state, *val))
    return {
        "epoch": state.epoch + 1,
        "step": state.step + steps,
        "train_loss": float(np.mean(np.asarray(checks[0]))),
        "val_loss": loss,
        "val_bpc": loss / math.log(2),
        "time": time.perf_counter() - start,
    }


def _check_finite(checks, record, state) -> None:
    """``NonFiniteLossError`` at the epoch's first non-finite step, or its validation loss."""
    losses, params_finite, opt_state_finite = (np.asarray(c) for c in checks)
    steps = len(losses)
    bad = ~(np.isfinite(losses) & params_finite & opt_state_finite)
    if bad.any():
        i = int(np.argmax(bad))
        if not np.isfinite(losses[i]):
            what = f"loss is {losses[i]}"
        else:
            part = "parameters" if not params_finite[i] else "optimizer state"
            what = f"the update made the {part} non-finite"
    elif not np.isfinite(record["val_loss"]):
        i, what = steps - 1, f"the epoch's validation loss is {record['val_loss']}"
    else:
        return
    raise train.NonFiniteLossError(what, state.epoch + 1, i + 1, steps, state.step + i + 1, state)
