"""``jaxbp train``: check the hand-written gradients, then train on a real dataset.

Steps: load the dataset (standardised, deterministic split), build the model,
compare the manual gradients with autodiff on one batch (``jaxbp.gradcheck``,
float64) and print the verdict, train with a tqdm bar over the epochs, print a
summary, optionally save a checkpoint after every epoch and plot the curves.
Ctrl-C during training stops with exit status 130 and one line saying which
epoch it stopped in and which one the checkpoint keeps.

The character-level models (``--model char-rnn``, ``char-lstm``, ``char-gru``)
learn from a text instead: ``jaxbp.text_cli`` runs them.

``--epochs`` is the total: ``--resume`` continues a checkpoint from its epoch up
to ``--epochs``, and gives exactly the parameters an uninterrupted run would.

Several processes (``--coordinator``, ``--num-processes``, ``--process-id`` or
``--distributed``) first join one JAX job; each runs every step, only process 0
prints and writes files, and before training all of them agree that each can
train from the same start, so that one that stops stops the others.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import time

from . import data, text
from .cli import (
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    SEED,
    host_port,
)
from .parallel import CLUSTERS
from .paths import existing_ancestor, output_file_problem

# Per-model defaults: the plain command reaches ≥ 97% (MLP) / ≥ 98% (CNN, MLP with
# BatchNorm and Dropout) test accuracy on digits within a minute on two CPU cores.
DEFAULTS = {
    "mlp": {"lr": 1e-3, "epochs": 30, "batch_size": 32, "weight_decay": 1e-3},
    "mlp-bn": {"lr": 1e-3, "epochs": 30, "batch_size": 32, "weight_decay": 1e-3},
    "cnn": {"lr": 1e-3, "epochs": 25, "batch_size": 32, "weight_decay": 1e-4},
    # Character-level language models on a text (jaxbp.text_cli has their other defaults).
    "char-rnn": {"lr": 2e-3, "epochs": 10, "batch_size": 32, "weight_decay": 0.0},
    "char-lstm": {"lr": 2e-3, "epochs": 10, "batch_size": 32, "weight_decay": 0.0},
    "char-gru": {"lr": 2e-3, "epochs": 10, "batch_size": 32, "weight_decay": 0.0},
    "char-gpt": {"lr": 1e-3, "epochs": 10, "batch_size": 32, "weight_decay": 0.1},
}
# The datasets read from the IDX files in --data-dir.
IDX_DATASETS = ("mnist", "fashion-mnist")
MLP_BN_DROPOUT = 0.1  # mlp-bn: Dense → BatchNorm → ReLU → Dropout(0.1) per hidden layer
# A resumed run must agree on these, or its state would not fit the model.
STRUCTURAL = ("dataset", "model", "hidden", "filters", "optimizer", "clip")


def _per_model(name: str) -> str:
    """``default: 0.001 for mlp, mlp-bn, cnn; 0.002 for char-rnn, …`` from ``DEFAULTS``,
    the models that share a default named together."""
    groups = {}
    for model, defaults in DEFAULTS.items():
        groups.setdefault(defaults[name], []).append(model)
    if len(groups) == 1:
        return f"default {next(iter(groups)):g} for every model"
    return "default: " + "; ".join(f"{v:g} for {', '.join(ms)}" for v, ms in groups.items())


def add_arguments(parser) -> None:
    from . import text_cli  # (text_cli builds on this module)

    parser.add_argument("--dataset", choices=(*data.DATASETS, *text.TEXTS),
                        help="dataset to train on (default digits); the char models learn "
                        "from a text: shakespeare (their default) or --text PATH")
    parser.add_argument("--data-dir", metavar="DIR",
                        help=f"directory with the IDX files, required by --dataset "
                        f"{' and '.join(IDX_DATASETS)} (and only by them)")
    parser.add_argument("--model", default="mlp", choices=sorted(DEFAULTS),
                        help="network (default mlp; mlp-bn adds BatchNorm and Dropout "
                        f"{MLP_BN_DROPOUT:g} to each hidden layer; char-rnn, char-lstm, "
                        "char-gru and char-gpt are character-level language models)")
    parser.add_argument("--hidden", default="256",
                        help="MLP hidden widths, comma-separated positive ints (default 256); "
                        "for a char model one width per recurrent layer, all equal "
                        "(256,256: two layers of 256)")
    parser.add_argument("--filters", default="32,32",
                        help="CNN filters of its two conv layers: two comma-separated positive "
                        "ints (default 32,32)")
    parser.add_argument("--grad", default="manual", choices=("manual", "autodiff"),
                        help="hand-written backward (default) or jax.value_and_grad")
    parser.add_argument("--optimizer", default="adam", choices=("sgd", "momentum", "adam"),
                        help="optax optimizer (default adam; char-gpt always uses AdamW)")
    parser.add_argument("--lr", type=POSITIVE_FLOAT,
                        help=f"learning rate > 0 ({_per_model('lr')})")
    parser.add_argument("--epochs", type=POSITIVE_INT,
                        help=f"total epochs, counting those of a resumed checkpoint; a char "
                        f"model's epoch is --steps-per-epoch steps ({_per_model('epochs')})")
    parser.add_argument("--batch-size", type=POSITIVE_INT,
                        help=f"samples per step, for a char model windows of --seq-len "
                        f"characters ({_per_model('batch_size')})")
    parser.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT,
                        help=f"λ ≥ 0 of J = L + λ/2 Σ‖W‖² (for char-gpt: AdamW's decoupled "
                        f"decay) ({_per_model('weight_decay')})")
    parser.add_argument("--clip", type=NON_NEGATIVE_FLOAT,
                        help="clip the gradient to this global norm before the optimizer "
                        f"(optax.clip_by_global_norm); 0: no clipping (default "
                        f"{text_cli.TEXT_DEFAULTS['clip']:g} for the char models, none for the "
                        f"others)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seeds initialisation and shuffling (for a char model, the random "
                        "windows); default 0")
    parser.add_argument("--checkpoint-dir",
                        help="save a checkpoint here after every epoch (created if missing); "
                        "one already there is an error unless --resume continues it")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --checkpoint-dir")
    parser.add_argument("--plot", metavar="PATH",
                        help="save loss and accuracy curves (a char model's: train and "
                        "validation loss), titled with the dataset and model, at PATH, in the "
                        "format of its extension (png, pdf, svg, ...); PATH.png when it has none")
    parser.add_argument("--devices", type=POSITIVE_INT,
                        help="devices for data parallelism (default: all visible; a char model "
                        "trains on one); with several processes a multiple of their count, the "
                        "same number from each")
    several = parser.add_argument_group(
        "several processes (hosts)",
        "Any of these calls jax.distributed.initialize() first; what is not given JAX takes "
        f"from the cluster environment it detects ({CLUSTERS}). Every process runs the same "
        "command (but for --process-id) on the same data; only process 0 prints and writes "
        "checkpoints.")
    several.add_argument("--coordinator", type=host_port, metavar="HOST:PORT",
                         help="address of process 0, which serves the coordinator there; "
                         "the same in every process")
    several.add_argument("--num-processes", type=POSITIVE_INT, metavar="N",
                         help="number of processes")
    several.add_argument("--process-id", type=NON_NEGATIVE_INT, metavar="I",
                         help="this process's index in [0, N)")
    several.add_argument("--distributed", action="store_true",
                         help="join a run of several processes that the cluster environment "
                         "describes (no other option needed there)")
    parser.add_argument("--skip-gradcheck", action="store_true",
                        help="train without checking the gradients first")
    text_cli.add_arguments(parser)


def _widths(option: str, text: str, what: str, count: int | None = None) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1 or count not in (None, len(widths)):
        raise ValueError(f"train: {option} must be {what}; got {text!r}")
    return widths


def _config(args) -> dict:
    """The run's settings from ``args``; ``ValueError`` names the bad option."""
    from . import text_cli

    text_cli.check_not_given(args)
    dataset = args.dataset or "digits"
    if dataset in IDX_DATASETS and args.data_dir is None:
        raise ValueError(f"train: --dataset {dataset} needs --data-dir DIR, the directory with "
                         f"its four IDX files (train-images-idx3-ubyte[.gz], …); got no --data-dir")
    if dataset not in IDX_DATASETS and args.data_dir is not None:
        raise ValueError(f"train: --data-dir applies to the IDX datasets "
                         f"({', '.join(IDX_DATASETS)}), not to --dataset {dataset}")
    defaults = DEFAULTS[args.model]
    config = {
        "dataset": dataset,
        "model": args.model,
        "hidden": None,
        "filters": None,
        "grad": args.grad,
        "optimizer": args.optimizer,
        "clip": args.clip or None,
        "seed": args.seed,
    }
    if args.model in ("mlp", "mlp-bn"):
        config["hidden"] = _widths("--hidden", args.hidden, "comma-separated positive ints")
    else:
        config["filters"] = _widths(
            "--filters", args.filters, "two comma-separated positive ints (one per conv layer)", 2
        )
    for name in ("lr", "epochs", "batch_size", "weight_decay"):
        value = getattr(args, name)
        config[name] = defaults[name] if value is None else value
    return config  # numbers were checked by argparse (cli.number)


def _check_paths(args, ckpt: str | None) -> None:
    """Fail before any work on outputs that could not be written (``ValueError``)."""
    directory = args.checkpoint_dir
    if directory == "":
        raise ValueError("train: --checkpoint-dir needs a directory path; got ''")
    if ckpt and not args.resume:
        if os.path.exists(ckpt):
            raise ValueError(
                f"train: --checkpoint-dir {directory} already holds a checkpoint; "
                f"pass --resume to continue it or choose another directory"
            )
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"train: --checkpoint-dir must be a directory; {directory} is a file")
        # created by the first save; here only check that it could be
        ancestor = existing_ancestor(directory)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
            raise ValueError(
                f"train: --checkpoint-dir cannot be created: {ancestor} is not a writable directory"
            )
    if ckpt and os.path.isdir(directory) and not os.access(directory, os.W_OK):
        raise ValueError(f"train: --checkpoint-dir {directory} is not writable")
    if args.plot is not None:
        path = plot_path(args.plot)  # a directory is refused even where PATH.png could be written
        problem = output_file_problem(args.plot) or output_file_problem(path)
        if problem:
            raise ValueError(f"train: --plot: {problem}")
        extension = os.path.splitext(path)[1][1:].lower()
        if not extension:  # "curves." names no format
            raise ValueError(f"train: --plot {args.plot}: ends in '.' with no format after it; "
                             f"use one of {', '.join(sorted(_plot_formats()))}")
        if extension not in _plot_formats():
            raise ValueError(
                f"train: --plot {args.plot}: cannot write .{extension} files; use one of "
                f"{', '.join(sorted(_plot_formats()))}"
            )
        try:  # what only writing shows: a read-only filesystem, a name too long for it
            _try_writing(path)
        except OSError as err:
            raise ValueError(f"train: --plot: cannot write {path}: {err.strerror}") from None


def _try_writing(path: str) -> None:
    """Open ``path`` for writing and close it, changing nothing: a new file is removed
    again, an existing one is opened for appending and left as it was."""
    existed = os.path.exists(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666))
    if not existed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _CheckpointWriteError(Exception):
    """The checkpoint after an epoch could not be written."""


def build_model(config: dict, ds):
    """The network a config describes (``model`` "mlp", "mlp-bn" or "cnn") for dataset ``ds``."""
    from . import models

    if config["model"] in ("mlp", "mlp-bn"):
        bn = config["model"] == "mlp-bn"
        return models.mlp(
            hidden=tuple(config["hidden"]), classes=ds.classes,
            weight_decay=config["weight_decay"], norm="batch" if bn else None,
            dropout=MLP_BN_DROPOUT if bn else 0.0,
        )
    return models.cnn(
        ds.input_shape, ds.classes, filters=tuple(config["filters"]),
        weight_decay=config["weight_decay"],
    )


def build_optimizer(config: dict):
    """The optax optimizer of a config: ``optimizer`` at ``lr``, after clipping the
    gradient's global norm at ``clip`` (``None``: no clipping).

    Equal settings give the same object, so the programs jit compiled for one
    (``train.init_state``, an epoch) serve the next.
    """
    return _optimizer(config["optimizer"], config["lr"], config.get("clip"))


@functools.lru_cache(maxsize=8)
def _optimizer(name: str, lr: float, clip: float | None):
    import optax

    from . import train

    opt = train.optimizer(name, lr)
    return opt if clip is None else optax.chain(optax.clip_by_global_norm(clip), opt)


def _check_resume(path: str, config: dict, structural=STRUCTURAL) -> dict:
    from . import checkpoint

    meta = checkpoint.read_metadata(path)
    bad = [k for k, v in meta["history"].items() if not isinstance(v, list)]
    if bad:  # jaxbp train saves one list entry per epoch
        raise ValueError(f"checkpoint {path}: its history must map names to per-epoch lists; "
                         f"{bad[0]!r} is not a list")
    covered = len(meta["history"].get("epoch", []))
    if covered != meta["epoch"]:  # read_metadata checked that the lists end at its epoch
        raise ValueError(f"checkpoint {path}: its history covers {covered} of its "
                         f"{meta['epoch']} epochs; jaxbp train saves every epoch's entries")
    saved = meta["config"]
    differ = [k for k in structural if saved.get(k) != config[k]]
    if differ:
        raise ValueError(
            f"checkpoint {path} was trained with a different setup: "
            + "; ".join(f"{k} {saved.get(k)!r} there, {config[k]!r} now" for k in differ)
        )
    for k in sorted(set(config) - {"epochs", *structural}):
        if saved.get(k) != config[k]:
            print(f"note: {k} was {saved.get(k)!r} in the checkpoint, now {config[k]!r}")
    return meta


def _start(config: dict, ds, state) -> str:
    """What the processes of one run must share: options, data and the state they start from.

    The state (from init or a checkpoint) and the labels are compared exactly; the
    features only by shape, since standardising them may round differently on
    different CPUs. Such rounding changes the result slightly but cannot split the
    processes: the gradients are summed over all of them, while differing states
    would drift apart.
    """
    import jax
    import numpy as np

    def digest(*arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:12]

    params, opt_state, key = state.params, state.opt_state, jax.random.key_data(state.key)
    options = np.frombuffer(repr(sorted(config.items())).encode(), np.uint8)
    return (f"options {digest(options)}, "
            f"data {ds.x_train.shape}+{ds.x_test.shape} with labels "
            f"{digest(ds.y_train, ds.y_test)}, state at epoch {state.epoch} step {state.step} "
            f"{digest(*jax.tree.leaves((params, opt_state, key)))}")


def _gradcheck(net, state, x, y, seed: int) -> bool:
    """Check the training-mode gradient (batch statistics, a Dropout mask) on one batch."""
    import jax

    from .gradcheck import gradcheck

    report = gradcheck(net, state.params, x, y, state=state.net_state, train=True,
                       key=jax.random.fold_in(jax.random.key(seed), 1))
    print(f"gradcheck ({report.dtype}, one batch of {len(x)}, train mode): {report.verdict()}")
    if not report.ok:
        print(report)
    return report.ok


def _plot_formats() -> set[str]:
    """File extensions matplotlib can save a figure as."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def plot_path(path: str) -> str:
    """The file ``--plot path`` writes: ``path``, or ``path + ".png"`` without an extension."""
    return path if os.path.splitext(path)[1] else path + ".png"


def plot_history(history: dict, path: str, title: str) -> str:
    """Loss and accuracy per epoch, train and test, under ``title``; returns the file written.

    The format follows ``path``'s extension; without one, ``path + ".png"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], label="train J (mean over steps)")
    ax_loss.plot(epochs, history["test_loss"], label="test L")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.plot(epochs, history["train_accuracy"], label="train")
    ax_acc.plot(epochs, history["test_accuracy"], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = plot_path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Where the processes of a multi-process run agree that all of them can train
# (parallel.agree), before the first collective.
_READY = "training"
_SEVERAL = ("coordinator", "num_processes", "process_id")


def _save_plot(history: dict, path: str, title: str, plot=plot_history) -> int:
    """``plot(history, path, title)``; the exit status (1 when the file cannot be written)."""
    import jax

    if jax.process_index() != 0:  # one writer when several hosts train
        return 0
    try:
        print(f"saved curves to {plot(history, path, title)}")
    except OSError as err:  # e.g. the disk filled up during training
        print(f"error: train: --plot: cannot write {plot_path(path)}: {err.strerror or err}",
              file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    """``jaxbp train``; the exit status. Several processes first join one JAX job."""
    given = {k: getattr(args, k) for k in _SEVERAL}
    if not args.distributed and all(v is None for v in given.values()):
        return _run(args)
    import jax

    from . import parallel

    n, i = args.num_processes, args.process_id
    if n is not None and i is not None and i >= n:
        print(f"error: train: --process-id must be in [0, {n}) for --num-processes {n}; "
              f"got {i}", file=sys.stderr)
        return 2
    try:
        parallel.initialize(**given)
    except ValueError:
        missing = ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v is None)
        print(f"error: train: no cluster environment JAX detects ({CLUSTERS}) is set up here; "
              f"pass {missing}", file=sys.stderr)
        return 2
    try:
        if jax.process_index() == 0:
            status = _run(args)
        else:  # only process 0 reports; every process prints its errors (stderr)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                status = _run(args)
    except BaseException:
        parallel.agree(_READY, "stopped with an error before training")
        raise
    # Nothing is sent when this process got as far as training.
    parallel.agree(_READY, f"stopped before training (exit status {status})")
    return status


def _run(args) -> int:
    start = time.perf_counter()
    import jax

    from . import checkpoint, parallel, text_cli, train

    if text_cli.wants_text(args):
        return text_cli.run_text(args)
    if args.resume and not args.checkpoint_dir:
        print("error: train: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    ckpt = (None if args.checkpoint_dir is None
            else os.path.join(args.checkpoint_dir, checkpoint.FILENAME))
    try:
        config = _config(args)
        _check_paths(args, ckpt)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ckpt and jax.process_index() == 0:  # the writer's own leftovers, by their name pattern
        for stale in checkpoint.remove_stale_temporaries(ckpt):
            print(f"removed {stale}, left by an interrupted save")
    layout = "image" if config["model"] == "cnn" else "flat"
    try:
        ds = data.load(config["dataset"], layout=layout, data_dir=args.data_dir)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:  # e.g. a CNN for images smaller than its two poolings allow
        net = build_model(config, ds)
    except ValueError as err:
        print(f"error: train: --model {config['model']} does not suit {config['dataset']} "
              f"(input shape {ds.input_shape}): {err}", file=sys.stderr)
        return 2
    opt = build_optimizer(config)
    state = train.init_state(net, opt, jax.random.key(config["seed"]), ds.input_shape, "float32")

    history = {}
    if args.resume:
        resumed = _resume(ckpt, config, state)
        if isinstance(resumed, int):
            return resumed
        state, history = resumed
        print(f"resumed {ckpt} at epoch {state.epoch} (step {state.step})")
        if state.epoch >= config["epochs"]:
            print(f"nothing to do: already at epoch {state.epoch} of {config['epochs']}")
            if args.plot is not None and history.get("epoch"):
                return _save_plot(history, args.plot, _title(config))
            return 0

    print(
        f"{config['dataset']}: {len(ds.x_train)} train / {len(ds.x_test)} test samples of shape "
        f"{ds.input_shape}, {ds.classes} classes; {config['model']} with "
        f"{sum(p.size for p in jax.tree.leaves(state.params))} parameters"
    )
    try:
        train.check_fit_arguments(net, state, ds, epochs=config["epochs"],
                                  batch_size=config["batch_size"], devices=args.devices)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.skip_gradcheck:
        n = config["batch_size"]
        if not _gradcheck(net, state, ds.x_train[:n], ds.y_train[:n], config["seed"]):
            print("error: manual gradients disagree with autodiff; not training", file=sys.stderr)
            return 1
    try:  # on several hosts: every process can train, from the same start, or none starts
        parallel.agree(_READY, same=_start(config, ds, state) if jax.process_count() > 1 else "")
    except ValueError as err:
        print(f"error: train: {err}", file=sys.stderr)
        return 2

    fitted, status = run_training(lambda: train.fit(
        net, opt, state, ds, epochs=config["epochs"], batch_size=config["batch_size"],
        grad=config["grad"], devices=args.devices,
        on_epoch=_recorder(ckpt, config, history), progress=jax.process_index() == 0,
    ), ckpt, history, state.epoch, args.checkpoint_dir)
    if status is not None:
        return status
    state, run_history = fitted
    print(_summary(history, run_history, state.epoch, time.perf_counter() - start))
    if args.plot is not None:
        return _save_plot(history, args.plot, _title(config))
    return 0


def run_training(fit, ckpt, history: dict, epoch: int, checkpoint_dir):
    """``(fit(), None)``, or ``(None, exit status)`` after saying in one line why it stopped.

    A non-finite loss or a failed checkpoint write is 1, a bad argument 2, Ctrl-C
    130 (naming the epoch and the checkpoint kept); ``epoch`` is where training started.
    """
    from . import train

    try:
        return fit(), None
    except train.NonFiniteLossError as err:
        _report_divergence(err, ckpt)
        return None, 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 2
    except _CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 1
    except KeyboardInterrupt:
        print(_interrupted(history, epoch, checkpoint_dir), file=sys.stderr)
        return None, 130


def _title(config: dict) -> str:
    """The curves' title: dataset and model, e.g. ``digits · mlp``."""
    return f"{config['dataset']} · {config['model']}"


def _report_divergence(err, ckpt) -> None:
    """Say that training diverged (a ``NonFiniteLossError``) and what is left on disk."""
    print(f"error: {err}", file=sys.stderr)
    if ckpt and os.path.exists(ckpt):
        print(f"the last good checkpoint {ckpt} (epoch {err.epoch - 1}) is left as it was",
              file=sys.stderr)
    elif ckpt:
        print(f"nothing was saved: no epoch of this run finished before it diverged, so "
              f"there is no {ckpt}", file=sys.stderr)
    else:
        print("nothing was saved (pass --checkpoint-dir to keep the last good epoch)",
              file=sys.stderr)


def _interrupted(history: dict, start: int, directory: str | None) -> str:
    """The line for Ctrl-C during training: the epoch it stopped in and what is kept.

    ``history`` holds the epochs ``_recorder`` has recorded (and, given a checkpoint,
    saved); ``start`` is the epoch training started from; ``directory`` is
    ``--checkpoint-dir``.
    """
    done = history["epoch"][-1] if history.get("epoch") else start
    line = f"interrupted at epoch {done + 1}"
    if directory is None:
        return f"{line}; nothing was saved (pass --checkpoint-dir to keep finished epochs)"
    if not done:
        return f"{line}; nothing was saved yet, so {directory} holds no checkpoint"
    return (f"{line}; checkpoint of epoch {done} kept in {directory}; rerun with --resume to "
            f"continue")


def _resume(ckpt: str, config: dict, like, structural=STRUCTURAL):
    """``(state, history)`` from the checkpoint to resume, or the exit status 2 (said why)."""
    import jax

    from . import checkpoint, parallel

    try:
        _check_resume(ckpt, config, structural)
        state, meta = checkpoint.restore(ckpt, like=like)
    except (OSError, ValueError) as err:
        problem = str(err)
        if jax.process_count() > 1 and not os.path.isfile(ckpt):
            problem += ("; resuming needs the checkpoint on every host (a shared filesystem "
                        "or a copy)")
        print(f"error: {problem}", file=sys.stderr)
        parallel.agree(_READY, problem)
        return 2
    return state, {k: list(v) for k, v in meta["history"].items()}


def _recorder(ckpt, config: dict, history: dict):
    """``fit``'s ``on_epoch``: save the checkpoint, then record the epoch in ``history``.

    Process 0 writes; with a checkpoint, every process then agrees on whether the
    write succeeded, so the others stop with the writer instead of waiting for it.
    ``history`` gains the epoch last, so it holds exactly the epochs that were
    saved, even when Ctrl-C stops a save.
    """
    import jax

    from . import checkpoint, parallel

    def on_epoch(state, record):
        recorded = {**history, **{k: [*history.get(k, []), v] for k, v in record.items()}}
        problem = None
        if ckpt and jax.process_index() == 0:  # one writer when several hosts train
            try:
                checkpoint.save(ckpt, state, config=config, history=recorded)
            except OSError as err:  # disk full, permissions: stop, naming the file
                problem = f"train: cannot write the checkpoint {ckpt}: {err}"
        if ckpt:
            try:
                parallel.agree(f"epoch {state.epoch}", problem)
            except ValueError as err:
                problem = str(err)
        if problem:
            raise _CheckpointWriteError(problem)
        history.update(recorded)

    return on_epoch


def _summary(history: dict, run_history: dict, epoch: int, wall: float) -> str:
    """The closing line: accuracy, loss, steps/s after the first (compiling) epoch, device."""
    rate, steady = step_rate(run_history)
    times, steps = run_history["time"], run_history["steps"]
    return (
        f"test accuracy {history['test_accuracy'][-1]:.2%} "
        f"(train {history['train_accuracy'][-1]:.2%}, test loss {history['test_loss'][-1]:.4f}) "
        f"after {epoch} epochs | "
        f"{rate:,.0f} steps/s{' after the first epoch' if steady else ''} | "
        f"{steps} steps in {times[-1]:.1f} s | device {run_history['device']} | wall {wall:.1f} s"
    )


def step_rate(run_history: dict) -> tuple[float, bool]:
    """``(steps/s, steady)``: after the first (compiling) epoch where there was a later one
    (``steady``), else over the whole run."""
    times, steps = run_history["time"], run_history["steps"]
    steady = len(times) > 1 and times[-1] > times[0]
    rate = (steps - steps / len(times)) / (times[-1] - times[0]) if steady else steps / times[-1]
    return rate, steady
