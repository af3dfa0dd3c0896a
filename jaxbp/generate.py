"""Text from a character-level model, one character at a time.

For a network of the :func:`jaxbp.models.char_rnn` shape (``Embedding``, then
``RNN``, ``LSTM`` or ``GRU`` layers, then ``Dense``), one position costs one
step of each recurrent layer, carrying its state (h, or (h, c) for the LSTM)
from position to position instead of re-reading the whole text:

    e_t = W_emb[id_t]                        (batch, embed)
    carry_l, _ = layer_l.step(p_l, carry_l, x_t Wx_l + b_l),  x_t = e_t or h_{l−1}
    z_t = h_L W + b                          (batch, vocab_size), the next character's logits

A GPT (:func:`jaxbp.models.gpt`) has no carry but a context of C positions. Each
position runs ``net.forward`` on a window of C ids that holds the text so far,
left-aligned (later entries are padding), or its last C ids once it is longer,
and reads the logits after the n ids the window holds:

    z = forward(window)[n − 1]               (vocab_size,), n = min(length of the text, C)

The attention is causal, so the padding after position n − 1 cannot reach
those logits: they are the logits of the text's last min(length, C) ids alone.
n is an array, read with a dynamic index, so one program serves every position
and every prompt length.

Sampling feeds the prompt in (through the steps, or into the window), then
draws each next character from ``softmax(z / temperature)``
(``jax.random.categorical``) and feeds it back. The whole generation is one
jitted program with a ``lax.scan`` over the generated positions, so its size
does not grow with ``length``, and another ``temperature`` or ``key`` reuses it.

Example:
  >>> import jax
  >>> from jaxbp import models, text
  >>> vocab = text.CharVocab.from_text("abc")
  >>> net = models.char_rnn(vocab.size, cell="gru", hidden=8, embed=4)
  >>> params = net.init(jax.random.key(0), (1,))
  >>> out = sample(net, params, vocab, "ab", 10, temperature=0.8, key=jax.random.key(1))
  >>> len(out), out[:2], set(out) <= set("abc")
  (12, 'ab', True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .layers import (
    GRU,
    LSTM,
    RNN,
    Context,
    Dense,
    Embedding,
    LayerNorm,
    PositionEmbedding,
    Sequential,
    TiedEmbedding,
    TransformerBlock,
)
from .layers.base import check_int, check_real, is_key, per_feature


def gpt_context(net) -> int | None:
    """The context of a :func:`jaxbp.models.gpt` network, or None for any other.

    A GPT is Embedding → PositionEmbedding → TransformerBlocks → LayerNorm →
    Dense, or a TiedEmbedding around PositionEmbedding → TransformerBlocks →
    LayerNorm; its context is the PositionEmbedding's.

    Example:
      >>> from jaxbp import models
      >>> gpt = models.gpt(5, context=8, d_model=4, num_heads=1, num_layers=1, tied=True)
      >>> gpt_context(gpt), gpt_context(models.char_rnn(5, hidden=4, embed=2))
      (8, None)
    """
    layers = getattr(net, "layers", None)
    if layers is None or not layers or not isinstance(layers[0], Embedding):
        return None
    if isinstance(layers[0], TiedEmbedding):
        if len(layers) != 1 or not isinstance(layers[0].body, Sequential):
            return None
        middle = layers[0].body.layers
    elif len(layers) >= 4 and isinstance(layers[-1], Dense):
        middle = layers[1:-1]
    else:
        return None
    ok = (len(middle) >= 2 and isinstance(middle[0], PositionEmbedding)
          and isinstance(middle[-1], LayerNorm)
          and all(isinstance(layer, TransformerBlock) for layer in middle[1:-1]))
    return middle[0].context if ok else None


def check_char_model(net, where: str = "generate") -> None:
    """A ValueError unless ``net`` is a character model :func:`sample` can run.

    That is Embedding → recurrent layers → Dense, in that order, the recurrent
    layers returning every step (``return_sequences=True``), as
    :func:`jaxbp.models.char_rnn` builds them, or a GPT (:func:`gpt_context`).
    """
    layers = getattr(net, "layers", None)
    names = [type(layer).__name__ for layer in layers] if layers is not None else None
    recurrent = (layers is not None and len(layers) >= 3 and isinstance(layers[0], Embedding)
                 and isinstance(layers[-1], Dense)
                 and all(isinstance(layer, (RNN, LSTM, GRU)) and layer.return_sequences
                         for layer in layers[1:-1]))
    if not recurrent and gpt_context(net) is None:
        raise ValueError(f"{where}: net must be a character model: Embedding, then RNN, LSTM or "
                         f"GRU layers returning every step, then Dense (models.char_rnn), or a "
                         f"GPT (models.gpt); got "
                         f"{names if names is not None else type(net).__name__}")


def _hidden(layer, carry):
    """The hidden state h_t a recurrent layer passes up: the carry itself, or h of (h, c)."""
    return carry[0] if isinstance(layer, LSTM) else carry


def _zero_carries(layers, batch: int, dtype):
    return tuple(layer.zero_carry(batch, dtype) for layer in layers[1:-1])


def _advance(layers, params, carries, ids):
    """One position for a batch of ids (batch,): ``(new carries, logits (batch, vocab_size))``."""
    ctx = Context()
    x, _, _ = layers[0].forward(params[0], {}, ids, ctx)  # (batch, embed)
    new = []
    for layer, p, carry in zip(layers[1:-1], params[1:-1], carries):
        carry, _ = layer.step(p, carry, x @ p["Wx"] + per_feature(p["b"], 2))
        new.append(carry)
        x = _hidden(layer, carry)
    logits, _, _ = layers[-1].forward(params[-1], {}, x, ctx)
    return tuple(new), logits


def _push(window, n, ids):
    """The window after the ids (batch,): written at n while it holds n < C ids, else
    appended after shifting out the oldest; ``(window, new n)``."""
    context = window.shape[1]
    full = n == context
    window = jnp.where(full, jnp.roll(window, -1, axis=1), window)
    at = jnp.where(full, context - 1, n)
    window = jax.lax.dynamic_update_index_in_dim(window, ids.astype(window.dtype), at, axis=1)
    return window, jnp.minimum(n + 1, context)


def _next_logits(net, params, window, n):
    """The logits (batch, vocab_size) after the first n ids of the window (batch, C)."""
    logits = net.forward(params, window)  # (batch, C, vocab_size), causal
    return jax.lax.dynamic_index_in_dim(logits, n - 1, axis=1, keepdims=False)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _windowed(net, params, ids, context: int):
    def step(carry, ids_t):
        window, n = _push(*carry, ids_t)
        return (window, n), _next_logits(net, params, window, n)

    start = (jnp.zeros((ids.shape[0], context), ids.dtype), jnp.int32(0))
    _, logits = jax.lax.scan(step, start, ids.T)
    return jnp.swapaxes(logits, 0, 1)


@functools.partial(jax.jit, static_argnums=0)
def _stepwise(layers, params, ids):
    dtype = params[0]["W"].dtype
    step = functools.partial(_advance, layers, params)
    _, logits = jax.lax.scan(step, _zero_carries(layers, ids.shape[0], dtype), ids.T)
    return jnp.swapaxes(logits, 0, 1)


def stepwise_logits(net, params, ids):
    """The logits (batch, time, vocab_size) of ``ids`` (batch, time), one step per position.

    Computed the way :func:`sample` computes them, position by position: for a
    recurrent model through each layer's ``step``, from the zero state, the same
    function as ``net.forward(params, ids)`` (eval mode); for a GPT of context C
    on the window of the last min(t + 1, C) ids, so that position t has the
    logits of ``net.forward(params, ids[:, max(0, t + 1 − C) : t + 1])`` at its last
    position, and ``time`` may exceed C.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp import models
      >>> net = models.char_rnn(5, cell="lstm", hidden=6, embed=3)
      >>> params = net.init(jax.random.key(0), (4,))
      >>> ids = jnp.array([[0, 4, 2, 1]])
      >>> bool(jnp.allclose(stepwise_logits(net, params, ids), net.forward(params, ids),
      ...                   atol=1e-6))
      True
    """
    check_char_model(net, "stepwise_logits")
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape[1] == 0:
        raise ValueError(f"stepwise_logits: ids must be an integer array (batch, time) with "
                         f"time >= 1; got shape {tuple(ids.shape)} of {ids.dtype}")
    net.layers[0].check_input_values(ids)
    context = gpt_context(net)
    if context is not None:
        jax.eval_shape(lambda p, x: net.forward(p, x), list(params), ids[:, :context])
        return _windowed(net, list(params), ids, context)
    return _stepwise(net.layers, list(params), ids)


def _draw(logits, key, greedy: bool, temperature):
    """Ids (batch,) from logits (batch, vocab_size): the arg-max, or drawn at temperature."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, logits / temperature.astype(logits.dtype), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(layers, params, prompt, key, length: int, greedy: bool, temperature):
    """The ``length`` ids after ``prompt`` (time,); one program for every key and temperature."""
    dtype = params[0]["W"].dtype
    step = functools.partial(_advance, layers, params)
    carries, logits = jax.lax.scan(step, _zero_carries(layers, 1, dtype), prompt[:, None])

    def draw(carry, key_t):
        carries, logits = carry  # logits (1, vocab_size): the next character's distribution
        ids = _draw(logits, key_t, greedy, temperature)
        return step(carries, ids), ids[0]

    _, ids = jax.lax.scan(draw, (carries, logits[-1]), jax.random.split(key, length))
    return ids


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate_windowed(net, params, window, n, key, length: int, greedy: bool, temperature):
    """The ``length`` ids after the n ids of ``window`` (1, C); one program for every
    prompt, key and temperature."""

    def draw(carry, key_t):
        window, n = carry
        ids = _draw(_next_logits(net, params, window, n), key_t, greedy, temperature)
        return _push(window, n, ids), ids[0]

    _, ids = jax.lax.scan(draw, (window, n), jax.random.split(key, length))
    return ids


def sample(net, params, vocab, prompt: str, length: int, *, temperature=1.0, key,
           greedy: bool = False) -> str:
    """``prompt`` followed by ``length`` characters the model generates after it.

    Each character is drawn from ``softmax(z / temperature)`` of the logits ``z``
    after everything before it (a GPT's after the last C characters, C its
    context; ``jax.random.categorical``); a temperature below 1 sharpens the
    distribution, above 1 flattens it. ``greedy=True`` takes the most
    likely character instead (``argmax z``, deterministic; ``temperature`` and
    ``key`` are then unused).

    Args:
      net: a network of the :func:`jaxbp.models.char_rnn` shape or a GPT
        (:func:`jaxbp.models.gpt`).
      params: its parameters.
      vocab: the :class:`jaxbp.text.CharVocab` it was trained with (its size is the
        Embedding's ``vocab_size``).
      prompt: a non-empty str of characters in ``vocab``.
      length: how many characters to generate, an int >= 0.
      temperature: a finite number > 0.
      key: a PRNG key, e.g. ``jax.random.key(0)``.
      greedy: take the arg-max character at every position.

    Raises:
      ValueError: ``net`` is not a character model, ``vocab`` or ``params`` do not
        fit it (the error names the layer), the prompt is empty or holds characters
        outside ``vocab`` (named), ``length`` < 0, ``temperature`` <= 0, or ``key``
        is not a PRNG key.

    Example:
      >>> import jax
      >>> from jaxbp import models, text
      >>> vocab = text.CharVocab.from_text("ab")
      >>> net = models.char_rnn(vocab.size, cell="rnn", hidden=4, embed=2)
      >>> params = net.init(jax.random.key(0), (1,))
      >>> params[-1]["W"] = 0 * params[-1]["W"]     # logits = b: always "b" (id 1)
      >>> params[-1]["b"] = jax.numpy.array([0.0, 30.0])
      >>> sample(net, params, vocab, "a", 5, key=jax.random.key(0))
      'abbbbb'
    """
    check_char_model(net, "sample")
    embedding, outputs = net.layers[0], net.output_shape((1,))[-1]
    if embedding.vocab_size != vocab.size or outputs != vocab.size:
        raise ValueError(f"sample: the vocabulary has {vocab.size} characters but the network "
                         f"reads {embedding.vocab_size} ids and predicts {outputs}; use the "
                         f"vocabulary it was trained with")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"sample: prompt must be a non-empty str (the model needs a character "
                         f"to start from); got {prompt!r}")
    check_int("sample", "length", length, 0)
    temperature = check_real("sample", "temperature", temperature, 0, strict=True)
    if not is_key(key):
        raise ValueError(f"sample: key must be a PRNG key, e.g. jax.random.key(0); got "
                         f"{type(key).__name__}")
    unknown = sorted(set(prompt) - set(vocab.chars))
    if unknown:
        raise ValueError(f"sample: the prompt holds {len(unknown)} character(s) outside the "
                         f"vocabulary of {vocab.size}: {', '.join(map(repr, unknown))}")
    ids = vocab.encode(prompt)
    params = list(params)
    context = gpt_context(net)
    if context is None:
        jax.eval_shape(lambda p, x: net.forward(p, x), params, ids[None])  # the layers' checks
        new = _generate(net.layers, params, jnp.asarray(ids), key, int(length), bool(greedy),
                        np.float32(temperature))
    else:  # the prompt's last `context` ids, left-aligned in the window
        window = np.zeros((1, context), ids.dtype)
        n = min(len(ids), context)
        window[0, :n] = ids[len(ids) - n:]
        jax.eval_shape(lambda p, x: net.forward(p, x), params, window)  # the layers' checks
        new = _generate_windowed(net, params, jnp.asarray(window), np.int32(n), key,
                                 int(length), bool(greedy), np.float32(temperature))
    return prompt + vocab.decode(np.asarray(new))
