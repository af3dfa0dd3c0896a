"""``jaxbp train`` for the character-level models: a text instead of images or a table.

``jaxbp train --model char-lstm`` (or ``char-rnn``, ``char-gru``, ``char-gpt``)
learns to predict the next character of ``--dataset shakespeare`` (the default)
or of any UTF-8 file given as ``--text PATH``. Steps: load the text (the last
10% held out), build :func:`jaxbp.models.char_rnn` (or :func:`jaxbp.models.gpt`
for ``char-gpt``), check the hand-written gradients against autodiff on a few
short windows (float64), train with :func:`jaxbp.text_train.fit_text` and a
tqdm bar, print the validation loss in nats and bits per character and the
throughput in tokens (characters) per second. ``--checkpoint-dir`` saves every
epoch, with the vocabulary in the config, so ``jaxbp sample`` can rebuild the
model from the checkpoint alone; ``--resume`` continues it exactly as an
uninterrupted run would.

``char-gpt`` trains with AdamW (decoupled weight decay on the weight matrices
and embeddings, :func:`jaxbp.train.decay_mask`) after clipping the gradient's
global norm, at a learning rate that rises linearly from 0 to ``--lr`` over
``--warmup`` steps, then follows a cosine down to ``FINAL_LR · --lr`` at step
``--decay-steps`` (default: the run's ``--epochs × --steps-per-epoch``) and
stays there (:func:`lr_schedule`). The checkpoint records the schedule, and a
``--resume`` keeps it: more ``--epochs`` than it was planned for continue at
the final rate, and another ``--warmup`` or ``--decay-steps`` is refused.

Example:
  >>> config = {"model": "char-gru", "hidden": [32, 32], "embed": 8, "weight_decay": 0.0,
  ...           "vocab": {"chars": "abc"}}
  >>> [layer.name for layer in build_model(config).layers]
  ['Embedding', 'GRU', 'GRU', 'Dense']
"""

from __future__ import annotations

import functools
import os
import sys
import time

from . import text
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, number
from .train_cli import (
    DEFAULTS,
    IDX_DATASETS,
    _check_paths,
    _recorder,
    _resume,
    _save_plot,
    _widths,
    run_training,
    step_rate,
)
from .train_cli import build_optimizer as _build_optimizer

# --model -> the cell of models.char_rnn
CELLS = {"char-rnn": "rnn", "char-lstm": "lstm", "char-gru": "gru"}
GPT = "char-gpt"  # models.gpt, trained with AdamW on a warmup-cosine schedule
MODELS = (*CELLS, GPT)
# What only the char models have (their lr, epochs, batch size: train_cli.DEFAULTS).
TEXT_DEFAULTS = {"seq_len": 64, "steps_per_epoch": 200, "embed": 64, "clip": 1.0}
# What only char-gpt has; its --warmup is at most a tenth of the schedule's steps.
GPT_DEFAULTS = {"layers": 4, "heads": 4, "d_model": 128, "dropout": 0.0, "warmup": 100}
FINAL_LR = 0.1  # char-gpt's learning rate ends at FINAL_LR · --lr
# jaxbp train's --hidden and --optimizer when not given: char-gpt takes neither (its
# width is --d-model and it trains with AdamW), so it refuses any other value.
UNSET = {"hidden": "256", "optimizer": "adam"}
# A resumed run must agree on these, or its state would not fit the model (or, for
# char-gpt, the learning rate would jump to another schedule).
STRUCTURAL = ("dataset", "model", "hidden", "embed", "optimizer", "clip", "vocab")
GPT_STRUCTURAL = ("dataset", "model", "seq_len", "layers", "heads", "d_model", "tied",
                  "optimizer", "clip", "warmup", "decay_steps", "vocab")
# The gradient check's batch (windows, characters) and its finite differences per
# parameter: the GPT's float64 check is bigger, so it gets fewer of each to take seconds.
GRADCHECK = {"recurrent": (4, 16, 32), "gpt": (2, 8, 4)}
RATE = number(float, 0, "a drop probability in [0, 1)", maximum=1)


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
                       help=f"characters per training window, the steps BPTT runs through; "
                       f"char-gpt's context, the most characters it reads "
                       f"(default {TEXT_DEFAULTS['seq_len']})")
    group.add_argument("--steps-per-epoch", type=POSITIVE_INT,
                       help=f"optimizer steps per epoch, each on --batch-size random windows "
                       f"(default {TEXT_DEFAULTS['steps_per_epoch']})")
    group.add_argument("--embed", type=POSITIVE_INT,
                       help=f"size of the character embedding of char-rnn, char-lstm and "
                       f"char-gru (default {TEXT_DEFAULTS['embed']})")
    gpt = parser.add_argument_group(
        f"--model {GPT}",
        "A GPT (jaxbp.models.gpt): character and position embeddings, pre-LN transformer "
        "blocks with causal attention, LayerNorm, a linear head; --seq-len is its context. It "
        "trains with AdamW, whose decoupled weight decay --weight-decay sets (W ← W − lr·λ·W "
        "on the weight matrices and embeddings, not a term of J), after --clip, at a "
        f"learning rate that rises linearly from 0 to --lr over --warmup steps, then follows a "
        f"cosine down to {FINAL_LR:g}·--lr at step --decay-steps and stays there. --resume "
        "keeps the schedule of the checkpoint (more --epochs continue at the final rate). "
        "--hidden, --embed and --optimizer do not apply to it; the options here apply to it "
        "only.")
    gpt.add_argument("--layers", type=POSITIVE_INT,
                     help=f"transformer blocks (default {GPT_DEFAULTS['layers']})")
    gpt.add_argument("--heads", type=POSITIVE_INT,
                     help=f"attention heads per block; they divide --d-model "
                     f"(default {GPT_DEFAULTS['heads']})")
    gpt.add_argument("--d-model", type=POSITIVE_INT,
                     help=f"channels: the embeddings' width and every block's "
                     f"(default {GPT_DEFAULTS['d_model']})")
    gpt.add_argument("--tied", action="store_true",
                     help="use the character embedding, transposed, as the output head "
                     "(weight tying) instead of a separate Dense layer")
    gpt.add_argument("--dropout", type=RATE,
                     help=f"drop probability of the blocks' residual branches in training "
                     f"(default {GPT_DEFAULTS['dropout']:g})")
    gpt.add_argument("--warmup", type=NON_NEGATIVE_INT,
                     help=f"steps of the learning rate's linear rise from 0 to --lr (default "
                     f"{GPT_DEFAULTS['warmup']}, or a tenth of --decay-steps where that is "
                     f"less; with --resume the checkpoint's)")
    gpt.add_argument("--decay-steps", type=POSITIVE_INT,
                     help="the step at which the cosine reaches its final rate, warmup "
                     "included (default --epochs × --steps-per-epoch; with --resume the "
                     "checkpoint's)")


# The options of add_arguments -> the models that take them.
_OPTIONS = {
    "seq_len": MODELS, "steps_per_epoch": MODELS, "embed": tuple(CELLS),
    **dict.fromkeys(("layers", "heads", "d_model", "tied", "dropout", "warmup", "decay_steps"),
                    (GPT,)),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _models(names: tuple) -> str:
    if names == MODELS:
        return f"the char models ({', '.join(MODELS)})"
    if names == tuple(CELLS):
        return f"the recurrent char models ({', '.join(CELLS)})"
    return f"--model {', '.join(names)}"


def check_not_given(args) -> None:
    """A ``ValueError`` naming the first option given that ``--model`` does not take.

    These are the options of :func:`add_arguments` for the models they are not
    for, and, for char-gpt, ``--hidden`` and ``--optimizer`` other than unset.
    """
    for dest, names in _OPTIONS.items():
        if args.model not in names and getattr(args, dest) not in (None, False):
            raise ValueError(f"train: {_flag(dest)} applies to {_models(names)}; got it with "
                             f"--model {args.model}")
    if args.model != GPT:
        return
    for dest, unset in UNSET.items():
        value = getattr(args, dest)
        if value != unset:
            instead = ("its width is --d-model and its depth --layers" if dest == "hidden"
                       else "it trains with AdamW on a warmup-cosine schedule")
            raise ValueError(f"train: {_flag(dest)} {value} does not apply to --model {GPT}: "
                             f"{instead}")


def wants_text(args) -> bool:
    """Whether ``jaxbp train`` is asked for a text: a char model, a text dataset or ``--text``."""
    return args.model in MODELS or args.dataset in text.TEXTS or args.text is not None


def _source(args) -> str:
    if args.text is not None:
        return f"--text {args.text}"
    return f"--dataset {args.dataset or text.TEXTS[0]}"


def _config(args, saved: dict | None = None) -> dict:
    """The run's settings (the vocabulary is added once the text is read); ``ValueError``
    names the bad option. ``saved`` is the config of the checkpoint ``--resume``
    continues, whose schedule char-gpt keeps."""
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
    check_not_given(args)
    defaults = {**TEXT_DEFAULTS, **DEFAULTS[args.model]}
    config = {
        "dataset": None if args.text is not None else args.dataset or text.TEXTS[0],
        "text": args.text,
        "model": args.model,
        "grad": args.grad,
        "clip": defaults["clip"] if args.clip is None else args.clip or None,
        "seed": args.seed,
    }
    for name in ("seq_len", "steps_per_epoch", "lr", "epochs", "batch_size", "weight_decay"):
        value = getattr(args, name)
        config[name] = defaults[name] if value is None else value
    if args.model == GPT:
        return {**config, **_gpt_config(args, config, saved or {})}
    hidden = _widths("--hidden", args.hidden, "comma-separated positive ints")
    if len(set(hidden)) > 1:
        raise ValueError(f"train: --hidden for a char model must be one width per recurrent "
                         f"layer, all equal (e.g. 256,256); got {args.hidden!r}")
    embed = defaults["embed"] if args.embed is None else args.embed
    return {**config, "hidden": hidden, "embed": embed, "optimizer": args.optimizer}


def _gpt_config(args, config: dict, saved: dict) -> dict:
    """char-gpt's own settings: its sizes, AdamW and the learning rate's schedule."""
    sizes = {name: GPT_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
             for name in ("layers", "heads", "d_model", "dropout")}
    if sizes["d_model"] % sizes["heads"]:
        raise ValueError(f"train: --d-model {sizes['d_model']} must be a multiple of --heads "
                         f"{sizes['heads']} (each head takes d_model / heads channels)")
    # Not given: the checkpoint's on --resume (another value there is refused then), else
    # the steps the run plans and a tenth of them, at most GPT_DEFAULTS["warmup"].
    kept = saved if saved.get("model") == GPT else {}
    decay_steps = args.decay_steps
    if decay_steps is None:
        decay_steps = _count(kept, "decay_steps", config["epochs"] * config["steps_per_epoch"],
                             1)
    warmup = args.warmup
    if warmup is None:
        warmup = _count(kept, "warmup", min(GPT_DEFAULTS["warmup"], decay_steps // 10), 0)
    if warmup >= decay_steps:
        raise ValueError(f"train: --warmup {warmup} must be less than --decay-steps "
                         f"{decay_steps}, the schedule's length (default --epochs × "
                         f"--steps-per-epoch)")
    return {**sizes, "tied": args.tied, "optimizer": "adamw", "warmup": warmup,
            "decay_steps": decay_steps}


def _count(saved: dict, name: str, default: int, minimum: int) -> int:
    """``saved[name]`` where it is an int >= ``minimum``, else ``default``."""
    value = saved.get(name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    return value if ok else default


def build_model(config: dict):
    """The network a config describes: :func:`jaxbp.models.char_rnn` (``model``,
    ``hidden``, ``embed``, ``weight_decay`` and ``vocab``) or, for char-gpt,
    :func:`jaxbp.models.gpt` (``seq_len`` its context, ``layers``, ``heads``,
    ``d_model``, ``tied``, ``dropout`` and ``vocab``)."""
    from . import models

    vocab_size = len(config["vocab"]["chars"])
    if config["model"] == GPT:
        return models.gpt(vocab_size, context=config["seq_len"], d_model=config["d_model"],
                          num_heads=config["heads"], num_layers=config["layers"],
                          tied=config["tied"], dropout=config["dropout"])
    return models.char_rnn(
        vocab_size, cell=CELLS[config["model"]], hidden=config["hidden"][0],
        embed=config["embed"], num_layers=len(config["hidden"]),
        weight_decay=config["weight_decay"],
    )


# The entries of a config build_model and build_optimizer read, per model.
REBUILT_FROM = {
    **dict.fromkeys(CELLS, ("hidden", "embed", "weight_decay", "optimizer", "lr", "vocab")),
    GPT: ("seq_len", "layers", "heads", "d_model", "tied", "dropout", "optimizer", "lr",
          "weight_decay", "warmup", "decay_steps", "vocab"),
}


def lr_schedule(config: dict):
    """char-gpt's learning rate per step (an optax schedule) from ``lr``, ``warmup`` and
    ``decay_steps``.

    With η = ``lr``, W = ``warmup``, D = ``decay_steps`` and f = ``FINAL_LR``:

        η_t = η · t / W                                             t < W
        η_t = η · (f + (1 − f) · ½ (1 + cos(π (t − W) / (D − W))))    W ≤ t < D
        η_t = f · η                                                 t ≥ D

    (``optax.warmup_cosine_decay_schedule``).

    Example:
      >>> schedule = lr_schedule({"lr": 1e-3, "warmup": 100, "decay_steps": 1000})
      >>> [round(float(schedule(t)), 6) for t in (0, 50, 100, 550, 1000, 5000)]
      [0.0, 0.0005, 0.001, 0.00055, 0.0001, 0.0001]
    """
    import optax

    lr = config["lr"]
    return optax.warmup_cosine_decay_schedule(0.0, lr, config["warmup"], config["decay_steps"],
                                              FINAL_LR * lr)


def build_optimizer(config: dict):
    """The optax optimizer of a config.

    ``optimizer`` "adamw" (char-gpt): ``optax.adamw`` at :func:`lr_schedule` with
    decoupled weight decay ``weight_decay`` on the leaves :func:`jaxbp.train.decay_mask`
    marks, after clipping the gradient's global norm at ``clip`` (``None``: no
    clipping). Any other: ``train_cli.build_optimizer``'s. Equal settings give the
    same object, so the programs jit compiled for one serve the next.
    """
    if config["optimizer"] != "adamw":
        return _build_optimizer(config)
    return _adamw(build_model(config), config["lr"], config["warmup"], config["decay_steps"],
                  config["weight_decay"], config.get("clip"))


@functools.lru_cache(maxsize=8)
def _adamw(net, lr: float, warmup: int, decay_steps: int, weight_decay: float,
           clip: float | None):
    import optax

    from . import train

    schedule = lr_schedule({"lr": lr, "warmup": warmup, "decay_steps": decay_steps})
    opt = optax.adamw(schedule, weight_decay=weight_decay, mask=train.decay_mask(net))
    return opt if clip is None else optax.chain(optax.clip_by_global_norm(clip), opt)


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

    from . import checkpoint, text_train

    if args.resume and not args.checkpoint_dir:
        print("error: train: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    ckpt = (None if args.checkpoint_dir is None
            else os.path.join(args.checkpoint_dir, checkpoint.FILENAME))
    try:
        if jax.process_count() > 1:
            raise ValueError("train: a char model trains in one process; drop --coordinator, "
                             "--num-processes, --process-id and --distributed")
        config = _config(args, _saved_config(ckpt) if args.resume else None)
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
        resumed = _resume(ckpt, config, state,
                          GPT_STRUCTURAL if config["model"] == GPT else STRUCTURAL)
        if isinstance(resumed, int):
            return resumed
        state, history = resumed
        print(f"resumed {ckpt} at epoch {state.epoch} (step {state.step})")
        if state.epoch >= config["epochs"]:
            print(f"nothing to do: already at epoch {state.epoch} of {config['epochs']}")
            if args.plot is not None and history.get("epoch"):
                return _save_plot(history, args.plot, title, plot_text_history)
            return 0

    print(
        f"{data.name}: {len(data.train_ids):,} training / {len(data.val_ids):,} validation "
        f"characters, {data.vocab.size} distinct; {config['model']} ({_sizes(config)}) with "
        f"{sum(p.size for p in jax.tree.leaves(state.params)):,} parameters"
    )
    if config["optimizer"] == "adamw":
        print(_schedule_line(config))
    if not args.skip_gradcheck and not _gradcheck_text(net, state, data, config):
        print("error: manual gradients disagree with autodiff; not training", file=sys.stderr)
        return 1

    fitted, status = run_training(lambda: text_train.fit_text(
        net, opt, state, data, epochs=config["epochs"],
        steps_per_epoch=config["steps_per_epoch"], batch_size=config["batch_size"],
        length=config["seq_len"], grad=config["grad"], seed=config["seed"],
        on_epoch=_recorder(ckpt, config, history)), ckpt, history, state.epoch,
        args.checkpoint_dir)
    if status is not None:
        return status
    state, run_history = fitted
    print(_summary(config, history, run_history, state.epoch, time.perf_counter() - start))
    if args.plot is not None:
        return _save_plot(history, args.plot, title, plot_text_history)
    return 0


def _saved_config(ckpt: str) -> dict:
    """The config of the checkpoint to resume; ``{}`` where it cannot be read (resuming
    then stops, saying why)."""
    from . import checkpoint

    try:
        return checkpoint.read_metadata(ckpt)["config"]
    except (OSError, ValueError):
        return {}


def _sizes(config: dict) -> str:
    """The model's sizes, e.g. ``2 × 256, embedding 64`` or ``4 layers, 4 heads, d_model
    128, context 64``."""
    if config["model"] != GPT:
        return f"{len(config['hidden'])} × {config['hidden'][0]}, embedding {config['embed']}"
    layers, heads = config["layers"], config["heads"]
    sizes = (f"{layers} layer{'s' * (layers != 1)}, {heads} head{'s' * (heads != 1)}, "
             f"d_model {config['d_model']}, context {config['seq_len']}")
    if config["tied"]:
        sizes += ", tied head"
    if config["dropout"]:
        sizes += f", dropout {config['dropout']:g}"
    return sizes


def _schedule_line(config: dict) -> str:
    """AdamW's settings and the learning rate's schedule, and where the run goes past it."""
    lr, warmup = config["lr"], config["warmup"]
    steps = config["epochs"] * config["steps_per_epoch"]
    rise = (f"0 → {lr:g} over {warmup} warmup step{'s' * (warmup != 1)}" if warmup
            else f"{lr:g} from the first step")
    line = (f"AdamW (weight decay {config['weight_decay']:g}), learning rate {rise}, cosine to "
            f"{FINAL_LR * lr:g} at step {config['decay_steps']}")
    if steps > config["decay_steps"]:
        line += f"; steps {config['decay_steps'] + 1} to {steps} train at {FINAL_LR * lr:g}"
    return line


def _gradcheck_text(net, state, data, config: dict) -> bool:
    """The gradient check (train mode) on a few short random training windows, as
    ``GRADCHECK`` sizes them for the kind of model."""
    import jax
    import numpy as np

    from .gradcheck import gradcheck

    windows, length, coords = GRADCHECK["gpt" if config["model"] == GPT else "recurrent"]
    length = min(length, len(data.train_ids) - 1)
    seed = config["seed"]
    x, y = text.windows(data.train_ids, windows, length, np.random.default_rng(seed))
    report = gradcheck(net, state.params, x, y, state=state.net_state, train=True,
                       key=jax.random.fold_in(jax.random.key(seed), 1), fd_max_coords=coords)
    print(f"gradcheck ({report.dtype}, one batch of {windows}, train mode): {report.verdict()}")
    if not report.ok:
        print(report)
    return report.ok
