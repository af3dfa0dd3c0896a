"""``jaxbp train`` for the character-level models: a text instead of images or a table.

``jaxbp train --model char-lstm`` (or ``char-rnn``, ``char-gru``) learns to
predict the next character of ``--dataset shakespeare`` (the default) or of any
UTF-8 file given as ``--text PATH``. Steps: load the text (the last 10% held
out), build :func:`jaxbp.models.char_rnn`, check the hand-written BPTT gradients
against autodiff on a few short windows (float64), train with
:func:`jaxbp.text_train.fit_text` and a tqdm bar, print the validation loss in
nats and bits per character and the throughput in tokens (characters) per
second. ``--checkpoint-dir`` saves every epoch, with the vocabulary in the
config, so ``jaxbp sample`` can rebuild the model from the checkpoint alone;
``--resume`` continues it exactly as an uninterrupted run would.

Example:
  >>> config = {"model": "char-gru", "hidden": [32, 32], "embed": 8, "weight_decay": 0.0,
  ...           "vocab": {"chars": "abc"}}
  >>> [layer.name for layer in build_model(config).layers]
  ['Embedding', 'GRU', 'GRU', 'Dense']
"""

from __future__ import annotations

import os
import sys
import time

from . import text
from .cli import POSITIVE_INT
from .train_cli import (
    DEFAULTS,
    IDX_DATASETS,
    _check_paths,
    _CheckpointWriteError,
    _gradcheck,
    _interrupted,
    _recorder,
    _report_divergence,
    _resume,
    _save_plot,
    _widths,
    build_optimizer,
    step_rate,
)

# --model -> the cell of models.char_rnn
MODELS = {"char-rnn": "rnn", "char-lstm": "lstm", "char-gru": "gru"}
# What only the char models have (their lr, epochs, batch size: train_cli.DEFAULTS).
TEXT_DEFAULTS = {"seq_len": 64, "steps_per_epoch": 200, "embed": 64, "clip": 1.0}
# A resumed run must agree on these, or its state would not fit the model.
STRUCTURAL = ("dataset", "model", "hidden", "embed", "optimizer", "clip", "vocab")
# The gradient check's batch: a few short windows, so that it takes seconds.
GRADCHECK_WINDOWS, GRADCHECK_LENGTH = 4, 16


def add_arguments(parser) -> None:
    group = parser.add_argument_group(
        f"character-level models (--model {', '.join(MODELS)})",
        "They learn to predict the next character of a text; jaxbp sample generates text "
        "from their checkpoints. The options here apply to them only (another --model "
        "refuses them); --lr, --epochs, --batch-size, --weight-decay and --clip have their "
        "own defaults for them (see above).")
    group.add_argument("--text", metavar="PATH",
                       help=f"train on this UTF-8 text file instead of a named --dataset "
                       f"(default --dataset {text.TEXTS[0]})")
    group.add_argument("--seq-len", type=POSITIVE_INT,
                       help=f"characters per training window, the steps BPTT runs through "
                       f"(default {TEXT_DEFAULTS['seq_len']})")
    group.add_argument("--steps-per-epoch", type=POSITIVE_INT,
                       help=f"optimizer steps per epoch, each on --batch-size random windows "
                       f"(default {TEXT_DEFAULTS['steps_per_epoch']})")
    group.add_argument("--embed", type=POSITIVE_INT,
                       help=f"size of the character embedding (default {TEXT_DEFAULTS['embed']})")


def check_not_given(args) -> None:
    """A ``ValueError`` naming the first option of the char models given to another model."""
    for option in ("seq_len", "steps_per_epoch", "embed"):
        if getattr(args, option) is not None:
            raise ValueError(f"train: --{option.replace('_', '-')} applies to the char models "
                             f"({', '.join(MODELS)}); got it with --model {args.model}")


def wants_text(args) -> bool:
    """Whether ``jaxbp train`` is asked for a text: a char model, a text dataset or ``--text``."""
    return args.model in MODELS or args.dataset in text.TEXTS or args.text is not None


def _source(args) -> str:
    if args.text is not None:
        return f"--text {args.text}"
    return f"--dataset {args.dataset or text.TEXTS[0]}"


def _config(args) -> dict:
    """The run's settings (the vocabulary is added once the text is read); ``ValueError``
    names the bad option."""
    if args.text is not None and args.dataset is not None:
        raise ValueError(f"train: give --dataset or --text, not both; got --dataset "
                         f"{args.dataset} and --text {args.text}")
    if args.model not in MODELS:
        raise ValueError(f"train: --model {args.model} does not suit {_source(args)}, a text; "
                         f"use --model {', '.join(MODELS)}")
    if args.dataset is not None and args.dataset not in text.TEXTS:
        raise ValueError(f"train: --model {args.model} does not suit --dataset {args.dataset}: "
                         f"a char model learns from a text (--dataset "
                         f"{', '.join(text.TEXTS)} or --text PATH)")
    if args.devices not in (None, 1):
        raise ValueError(f"train: --devices {args.devices}: a char model trains on one device")
    if args.data_dir is not None:
        raise ValueError(f"train: --data-dir applies to the IDX datasets "
                         f"({', '.join(IDX_DATASETS)}), not to {_source(args)}")
    hidden = _widths("--hidden", args.hidden, "comma-separated positive ints")
    if len(set(hidden)) > 1:
        raise ValueError(f"train: --hidden for a char model must be one width per recurrent "
                         f"layer, all equal (e.g. 256,256); got {args.hidden!r}")
    defaults = {**TEXT_DEFAULTS, **DEFAULTS[args.model]}
    config = {
        "dataset": None if args.text is not None else args.dataset or text.TEXTS[0],
        "text": args.text,
        "model": args.model,
        "hidden": hidden,
        "grad": args.grad,
        "optimizer": args.optimizer,
        "clip": defaults["clip"] if args.clip is None else args.clip or None,
        "seed": args.seed,
    }
    for name in ("embed", "seq_len", "steps_per_epoch", "lr", "epochs", "batch_size",
                 "weight_decay"):
        value = getattr(args, name)
        config[name] = defaults[name] if value is None else value
    return config


def build_model(config: dict):
    """The :func:`jaxbp.models.char_rnn` a config describes (``model``, ``hidden``,
    ``embed``, ``weight_decay`` and ``vocab``)."""
    from . import models

    return models.char_rnn(
        len(config["vocab"]["chars"]), cell=MODELS[config["model"]],
        hidden=config["hidden"][0], embed=config["embed"], num_layers=len(config["hidden"]),
        weight_decay=config["weight_decay"],
    )


def new_state(config: dict):
    """``(net, opt, state)``: the model and optimizer of a config and a fresh state for them.

    The state is ``train.init_state`` from ``config["seed"]`` (0 when absent), float32.
    """
    import jax

    from . import train

    net, opt = build_model(config), build_optimizer(config)
    key = jax.random.key(config.get("seed", 0))
    return net, opt, train.init_state(net, opt, key, (config.get("seq_len", 1),), "float32")


def _check_lengths(config: dict, data) -> None:
    """Both splits hold one window of ``--seq-len`` and its targets (``ValueError``)."""
    need = config["seq_len"] + 1
    for split, ids in (("training", data.train_ids), ("validation", data.val_ids)):
        if len(ids) < need:
            raise ValueError(f"train: --seq-len {config['seq_len']} needs {need} characters in "
                             f"each split; the {split} split of {data.name} holds {len(ids)} "
                             f"(the last 10% is held out): use a longer text or a smaller "
                             f"--seq-len")


def plot_text_history(history: dict, path: str, title: str) -> str:
    """Train and validation loss in nats per character per epoch; returns the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .train_cli import plot_path

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_loss"], marker=".",
            label="train J (mean over steps)")
    ax.plot(history["epoch"], history["val_loss"], marker=".", label="validation")
    ax.set(xlabel="epoch", ylabel="loss (nats per character)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = plot_path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _summary(config: dict, history: dict, run_history: dict, epoch: int, wall: float) -> str:
    """The closing line: validation loss, tokens/s after the first (compiling) epoch."""
    rate, steady = step_rate(run_history)
    tokens = rate * config["batch_size"] * config["seq_len"]
    times, steps = run_history["time"], run_history["steps"]
    return (
        f"val loss {history['val_loss'][-1]:.4f} nats/char "
        f"({history['val_bpc'][-1]:.3f} bits/char), train loss "
        f"{history['train_loss'][-1]:.4f} after {epoch} epochs | "
        f"{tokens:,.0f} tokens/s ({rate:,.1f} steps/s){' after the first epoch' if steady else ''}"
        f" | {steps} steps in {times[-1]:.1f} s | device {run_history['device']} | "
        f"wall {wall:.1f} s"
    )


def run_text(args) -> int:
    """``jaxbp train`` with a char model; the exit status."""
    start = time.perf_counter()
    import jax

    from . import checkpoint, text_train, train

    if args.resume and not args.checkpoint_dir:
        print("error: train: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    ckpt = (None if args.checkpoint_dir is None
            else os.path.join(args.checkpoint_dir, checkpoint.FILENAME))
    try:
        if jax.process_count() > 1:
            raise ValueError("train: a char model trains in one process; drop --coordinator, "
                             "--num-processes, --process-id and --distributed")
        config = _config(args)
        _check_paths(args, ckpt)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ckpt:
        for stale in checkpoint.remove_stale_temporaries(ckpt):
            print(f"removed {stale}, left by an interrupted save")
    try:
        data = text.load_text(config["dataset"], text_path=config["text"])
        config["vocab"] = data.vocab.to_dict()
        _check_lengths(config, data)
    except (ImportError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    net, opt, state = new_state(config)
    title = f"{data.name} · {config['model']}"

    history = {}
    if args.resume:
        resumed = _resume(ckpt, config, state, STRUCTURAL)
        if isinstance(resumed, int):
            return resumed
        state, history = resumed
        print(f"resumed {ckpt} at epoch {state.epoch} (step {state.step})")
        if state.epoch >= config["epochs"]:
            print(f"nothing to do: already at epoch {state.epoch} of {config['epochs']}")
            if args.plot is not None and history.get("epoch"):
                return _save_plot(history, args.plot, title, plot_text_history)
            return 0

    layers = len(config["hidden"])
    print(
        f"{data.name}: {len(data.train_ids):,} training / {len(data.val_ids):,} validation "
        f"characters, {data.vocab.size} distinct; {config['model']} ({layers} × "
        f"{config['hidden'][0]}, embedding {config['embed']}) with "
        f"{sum(p.size for p in jax.tree.leaves(state.params)):,} parameters"
    )
    if not args.skip_gradcheck and not _gradcheck_text(net, state, data, config["seed"]):
        print("error: manual gradients disagree with autodiff; not training", file=sys.stderr)
        return 1

    try:
        state, run_history = text_train.fit_text(
            net, opt, state, data, epochs=config["epochs"],
            steps_per_epoch=config["steps_per_epoch"], batch_size=config["batch_size"],
            length=config["seq_len"], grad=config["grad"], seed=config["seed"],
            on_epoch=_recorder(ckpt, config, history))
    except train.NonFiniteLossError as err:
        _report_divergence(err, ckpt)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except _CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(_interrupted(history, state.epoch, args.checkpoint_dir), file=sys.stderr)
        return 130
    print(_summary(config, history, run_history, state.epoch, time.perf_counter() - start))
    if args.plot is not None:
        return _save_plot(history, args.plot, title, plot_text_history)
    return 0


def _gradcheck_text(net, state, data, seed: int) -> bool:
    """The gradient check on ``GRADCHECK_WINDOWS`` random training windows, short ones."""
    import numpy as np

    length = min(GRADCHECK_LENGTH, len(data.train_ids) - 1)
    x, y = text.windows(data.train_ids, GRADCHECK_WINDOWS, length,
                        np.random.default_rng(seed))
    return _gradcheck(net, state, x, y, seed)

