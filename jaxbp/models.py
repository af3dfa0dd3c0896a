"""Ready-made networks: the tutorials' examples and the presets the CLI uses."""

from __future__ import annotations

import jax.numpy as jnp

from . import layers, losses
from .layers import Sequential
from .layers.base import check_int


def worked_example(dtype=None):
    """The 2-2-2 sigmoid network of tutorial 004 with its exact weights.

    Inputs i1 = 0.05, i2 = 0.10; targets 0.01, 0.99; w1..w8 = 0.15 … 0.55;
    hidden bias b1 = 0.35 and output bias b2 = 0.60 shared by both neurons of a
    layer; loss E = Σ ½(target − out)².

    In the tutorial ``net_h1 = w1·i1 + w2·i2 + b1`` and ``net_h2 = w3·i1 + w4·i2 + b1``,
    so in the row-vector convention ``W[i, j]`` (input i → neuron j) is
    ``[[w1, w3], [w2, w4]]``.

    Args:
      dtype: of the weights and data; default float64 where ``jax_enable_x64`` is
        on, else float32.

    Returns:
      ``(net, params, x, y)`` with x of shape (1, 2) and y of shape (1, 2).

    Example:
      >>> import jax
      >>> with jax.enable_x64():  # the tutorial's numbers are float64's
      ...     net, params, x, y = worked_example()
      ...     E = float(net.loss(params, x, y))
      >>> round(E, 9)
      0.298371109
      >>> net, params, x, y = worked_example("float32")  # agrees to 7 decimals
      >>> round(float(net.loss(params, x, y)), 7)
      0.2983711
    """
    f = jnp.result_type(float) if dtype is None else dtype
    net = Sequential(
        [layers.Dense(2), layers.Sigmoid(), layers.Dense(2), layers.Sigmoid()],
        loss=losses.HalfSquaredError(),
    )
    params = [
        {"W": jnp.array([[0.15, 0.25], [0.20, 0.30]], f), "b": jnp.array([0.35, 0.35], f)},
        {},
        {"W": jnp.array([[0.40, 0.50], [0.45, 0.55]], f), "b": jnp.array([0.60, 0.60], f)},
        {},
    ]
    x = jnp.array([[0.05, 0.10]], f)
    y = jnp.array([[0.01, 0.99]], f)
    return net, params, x, y


NORMS = {"batch": layers.BatchNorm, "layer": layers.LayerNorm, "rms": layers.RMSNorm}


def _norm(fn: str, norm):
    """The normalisation layer ``norm`` names (``None``: none)."""
    if norm is not None and norm not in NORMS:
        raise ValueError(f"{fn}: norm must be one of {sorted(NORMS)} or None; got {norm!r}")
    return [] if norm is None else [NORMS[norm]()]


def mlp(hidden=(128,), classes=10, activation=layers.ReLU, weight_decay=0.0, init="he_normal",
        norm=None, dropout=0.0):
    """A softmax-cross-entropy MLP: ``Dense → [norm] → activation → [Dropout]`` per hidden width,
    then ``Dense``.

    ``hidden`` is a sequence of widths (``()`` gives softmax regression); ``norm``
    is ``"batch"`` (BatchNorm), ``"layer"`` (LayerNorm), ``"rms"`` (RMSNorm) or
    ``None`` (with BatchNorm the Dense layers before it have no bias, which the
    batch mean would cancel); ``dropout`` is the probability of dropping a hidden
    unit in train mode.

    Example:
      >>> net = mlp(hidden=(32,), norm="batch", dropout=0.1)
      >>> [layer.name for layer in net.layers]
      ['Dense', 'BatchNorm', 'ReLU', 'Dropout', 'Dense']
    """
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise ValueError(f"mlp: hidden must be a sequence of layer widths, e.g. (128,) or "
                         f"(1024, 1024); got {hidden!r}")
    drop = [layers.Dropout(dropout)] if dropout else []
    stack = []
    for width in hidden:
        # BatchNorm subtracts the batch mean of every unit: a bias before it would cancel
        dense = layers.Dense(width, init=init, use_bias=norm != "batch")
        stack += [dense, *_norm("mlp", norm), activation(), *drop]
    stack.append(layers.Dense(classes, init="glorot_normal"))
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


def residual_mlp(width=128, blocks=2, classes=10, norm="layer", dropout=0.0, weight_decay=0.0):
    """A pre-norm residual MLP: ``Dense(width)``, ``blocks`` residual blocks, norm, ``Dense``.

    Each block is ``x + Dense(ReLU(Dense(norm(x))))`` with both Dense layers
    ``width`` wide (and Dropout after the ReLU when ``dropout`` > 0): the
    feed-forward half of a transformer block. ``norm`` as for :func:`mlp`.

    Example:
      >>> net = residual_mlp(width=16, blocks=2)
      >>> [layer.name for layer in net.layers]
      ['Dense', 'Residual', 'Residual', 'LayerNorm', 'Dense']
    """
    check_int("residual_mlp", "blocks", blocks, 0)
    drop = [layers.Dropout(dropout)] if dropout else []
    block = Sequential([*_norm("residual_mlp", norm), layers.Dense(width, init="he_normal"),
                   layers.ReLU(), *drop, layers.Dense(width, init="he_normal")])
    stack = [layers.Dense(width, init="he_normal"), *[layers.Residual(block)] * blocks,
             *_norm("residual_mlp", norm), layers.Dense(classes, init="glorot_normal")]
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


def _image_shape(fn: str, input_shape, min_side: int, why: str):
    """``input_shape`` must be ``(height, width, channels)``, at least ``min_side`` high, wide."""
    if not (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3):
        raise ValueError(f"{fn}: input_shape must be (height, width, channels); got "
                         f"{input_shape!r}")
    h, w, _ = input_shape
    if min(h, w) < min_side:
        raise ValueError(f"{fn}: input_shape must be at least {min_side}×{min_side} for {why}; "
                         f"got {tuple(input_shape)}")


def cnn(input_shape=(28, 28, 1), classes=10, filters=(16, 32), weight_decay=0.0):
    """A LeNet-style softmax-cross-entropy CNN for small NHWC images.

    ``Conv2D(3×3, SAME) → ReLU → MaxPool2D(2) → Conv2D(3×3, SAME) → ReLU →
    AvgPool2D(2) → Flatten → Dense(classes)``. Each pooling halves the height and
    width (rounding down), so 28×28 gives 7×7 feature maps and 8×8 (scikit-learn
    digits) gives 2×2; ``input_shape`` (height, width, channels) must be at least 4×4.

    Example:
      >>> net = cnn((8, 8, 1), classes=10)
      >>> net.output_shape((8, 8, 1))
      (10,)
    """
    _image_shape("cnn", input_shape, 4, "two 2×2 poolings")
    if not (isinstance(filters, (tuple, list)) and len(filters) == 2):
        raise ValueError(f"cnn: filters must be a pair (first conv, second conv), e.g. "
                         f"(16, 32); got {filters!r}")
    stack = [
        layers.Conv2D(filters[0], 3, padding="SAME", init="he_normal"),
        layers.ReLU(),
        layers.MaxPool2D(2),
        layers.Conv2D(filters[1], 3, padding="SAME", init="he_normal"),
        layers.ReLU(),
        layers.AvgPool2D(2),
        layers.Flatten(),
        layers.Dense(classes, init="glorot_normal"),
    ]
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


def cifar_cnn(input_shape=(32, 32, 3), classes=10, filters=(32, 64), weight_decay=0.0):
    """A small VGG-style softmax-cross-entropy CNN for colour images, such as CIFAR-10's.

    Per entry ``f`` of ``filters``, one stage ``Conv2D(f, 3×3, SAME) → ReLU →
    Conv2D(f, 3×3, SAME) → ReLU → MaxPool2D(2)``; then ``Flatten → Dense(classes)``.
    Each stage halves the height and width (rounding down), so 32×32 inputs and the
    default two stages of 32 and 64 channels give 8×8×64 features; ``input_shape``
    (height, width, channels) must be at least ``2^stages`` wide and high.

    Example:
      >>> net = cifar_cnn((8, 8, 3), classes=10, filters=(4, 8))
      >>> len(net.layers), net.output_shape((8, 8, 3))
      (12, (10,))
    """
    if not (isinstance(filters, (tuple, list)) and filters):
        raise ValueError(f"cifar_cnn: filters must be a non-empty sequence of channel counts, "
                         f"one per stage, e.g. (32, 64); got {filters!r}")
    for f in filters:
        check_int("cifar_cnn", "filters entry", f)
    _image_shape("cifar_cnn", input_shape, 2 ** len(filters),
                 f"{len(filters)} stages of 2×2 pooling")
    stack = []
    for f in filters:
        stack += [layers.Conv2D(f, 3, padding="SAME", init="he_normal"), layers.ReLU(),
                  layers.Conv2D(f, 3, padding="SAME", init="he_normal"), layers.ReLU(),
                  layers.MaxPool2D(2)]
    stack += [layers.Flatten(), layers.Dense(classes, init="glorot_normal")]
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


CELLS = {"rnn": layers.RNN, "lstm": layers.LSTM, "gru": layers.GRU}


def char_rnn(vocab_size, cell="lstm", hidden=256, embed=64, num_layers=1, weight_decay=0.0):
    """A character-level language model: ``Embedding → cell × num_layers → Dense(vocab_size)``.

    Input: integer ids (batch, time); output: next-character logits (batch, time,
    vocab_size) at every position, trained with softmax cross-entropy against the
    ids shifted by one, averaged over every position (in nats per character).
    ``cell`` is "rnn", "lstm" or "gru", each ``hidden`` wide and returning every
    hidden state.

    Example:
      >>> net = char_rnn(65, cell="gru", hidden=32, embed=16)
      >>> [layer.name for layer in net.layers], net.output_shape((50,))
      (['Embedding', 'GRU', 'Dense'], (50, 65))
    """
    if cell not in CELLS:
        raise ValueError(f"char_rnn: cell must be one of {sorted(CELLS)}; got {cell!r}")
    check_int("char_rnn", "num_layers", num_layers)
    stack = [layers.Embedding(vocab_size, embed),
             *[CELLS[cell](hidden) for _ in range(num_layers)],
             layers.Dense(vocab_size, init="glorot_normal")]
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)


def gpt(vocab_size, context=64, d_model=128, num_heads=4, num_layers=4, *, tied=False,
        dropout=0.0, backward="standard", weight_decay=0.0):
    """A GPT: token and position embeddings, pre-LN transformer blocks, LayerNorm, a linear head.

    ``Embedding(vocab_size, d_model) → PositionEmbedding(context, d_model) →
    TransformerBlock × num_layers → LayerNorm → Dense(vocab_size, no bias)``, with
    causal attention and softmax cross-entropy at every position. ``tied=True``
    uses the token embedding, transposed, as the head (``layers.TiedEmbedding``
    around the rest: its gradient sums both uses). Input: ids (batch, time) with
    time ≤ context; output: logits (batch, time, vocab_size). Embeddings start as
    N(0, 0.02²), GPT-2's.

    Example:
      >>> net = gpt(65, context=32, d_model=16, num_heads=2, num_layers=2, tied=True)
      >>> [layer.name for layer in net.layers], net.output_shape((32,))
      (['TiedEmbedding'], (32, 65))
    """
    check_int("gpt", "num_layers", num_layers)
    middle = [layers.PositionEmbedding(context, d_model),
              *[layers.TransformerBlock(num_heads, dropout=dropout, backward=backward)
                for _ in range(num_layers)],
              layers.LayerNorm()]
    if tied:
        stack = [layers.TiedEmbedding(vocab_size, d_model, std=0.02,
                                      body=Sequential(middle))]
    else:
        stack = [layers.Embedding(vocab_size, d_model, std=0.02), *middle,
                 layers.Dense(vocab_size, use_bias=False, init="glorot_normal")]
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)
