"""``jaxbp sample``: generate text from a char model's checkpoint (``jaxbp train --model char-*``).

The checkpoint's config names the model, its sizes and its vocabulary, so the
network is rebuilt from the checkpoint alone; the text is the prompt followed
by ``--length`` characters drawn at ``--temperature`` (:func:`jaxbp.generate.sample`;
a char-gpt reads the last ``--seq-len`` characters it was trained with, its context).

Example:
  >>> import os, tempfile
  >>> from jaxbp import checkpoint, text_cli
  >>> config = {"model": "char-gru", "hidden": [8], "embed": 4, "weight_decay": 0.0,
  ...           "optimizer": "adam", "lr": 1e-3, "clip": 1.0, "vocab": {"chars": "ab"}}
  >>> _, _, state = text_cli.new_state(config)           # an untrained model
  >>> directory = tempfile.mkdtemp()
  >>> checkpoint.save(os.path.join(directory, checkpoint.FILENAME), state, config=config)
  >>> net, params, vocab = load(directory)
  >>> [layer.name for layer in net.layers], vocab.chars
  (['Embedding', 'GRU', 'Dense'], 'ab')
"""

from __future__ import annotations

import os
import sys

from .cli import NON_NEGATIVE_INT, POSITIVE_FLOAT, SEED


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint-dir", required=True,
                        help="directory of the checkpoint jaxbp train --model char-* saved")
    parser.add_argument("--prompt", default="\n",
                        help="text to start from, in the model's vocabulary (default a newline)")
    parser.add_argument("--length", type=NON_NEGATIVE_INT, default=400,
                        help="characters to generate after the prompt (default 400)")
    parser.add_argument("--temperature", type=POSITIVE_FLOAT, default=0.8,
                        help="divides the logits before sampling: below 1 sharper, above 1 "
                        "more varied (default 0.8)")
    parser.add_argument("--greedy", action="store_true",
                        help="take the most likely character each time (no sampling)")
    parser.add_argument("--seed", type=SEED, default=0, help="seeds the sampling (default 0)")


def load(directory: str):
    """``(net, params, vocab)`` of the char model checkpointed in ``directory``.

    Raises:
      ValueError: there is no checkpoint, it is unreadable or corrupt, or it holds
        another kind of model (the message says which).
    """
    from . import checkpoint, text, text_cli

    path = os.path.join(directory, checkpoint.FILENAME)
    if not os.path.isfile(path):
        raise ValueError(f"sample: --checkpoint-dir {directory} holds no checkpoint (expected "
                         f"{path}, which jaxbp train --checkpoint-dir writes)")
    try:
        config = checkpoint.read_metadata(path)["config"]
    except OSError as err:
        raise ValueError(str(err)) from None
    model = config.get("model")
    if model not in text_cli.MODELS:
        raise ValueError(f"sample: checkpoint {path} holds a {model} model trained on "
                         f"{config.get('dataset')}, not a char model; sample needs one of "
                         f"{', '.join(text_cli.MODELS)} (jaxbp train --model char-lstm)")
    missing = [k for k in text_cli.REBUILT_FROM[model] if k not in config]
    if missing:
        raise ValueError(f"sample: checkpoint {path}: its config lacks {', '.join(missing)}, "
                         f"which rebuild the model")
    vocab = text.CharVocab.from_dict(config["vocab"])
    net, _, like = text_cli.new_state(config)
    state, _ = checkpoint.restore(path, like=like)
    return net, state.params, vocab


def run(args) -> int:
    """``jaxbp sample``; the exit status."""
    import jax

    from . import generate

    try:
        net, params, vocab = load(args.checkpoint_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.prompt:
        print("error: sample: --prompt must hold at least one character; got ''",
              file=sys.stderr)
        return 2
    unknown = sorted(set(args.prompt) - set(vocab.chars))
    if unknown:
        print(f"error: sample: --prompt holds {len(unknown)} character(s) that are not in the "
              f"model's vocabulary of {vocab.size}: {', '.join(map(repr, unknown))}",
              file=sys.stderr)
        return 2
    out = generate.sample(net, params, vocab, args.prompt, args.length,
                          temperature=args.temperature, key=jax.random.key(args.seed),
                          greedy=args.greedy)
    print(out)
    return 0
