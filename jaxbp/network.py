"""``Sequential``: a stack of layers, a loss, and the hand-written backward walk."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .layers.base import Layer, check_memory, check_numeric, is_int, is_real
from .losses import Loss, values_known

_method_jit = functools.partial(jax.jit, static_argnums=0)


def _checks_arguments(jitted):
    """Check the arguments outside the trace, then call the jitted method.

    Arrays of objects or strings cannot enter ``jit`` (JAX raises a TypeError);
    they are refused here with a ValueError. Inside jit, labels and targets are
    abstract and cannot be range-checked; called directly (or under ``jax.grad``
    or ``jax.vmap``) they are concrete, and an out-of-range label or target raises
    a ValueError instead of silently giving a meaningless loss.
    """

    @functools.wraps(jitted)
    def method(self, params, x, *args, **kwargs):
        self._check_params(params)
        _check_numeric("input x", x)
        if args or "y" in kwargs:  # forward and forward_with_residuals take no y
            y = args[0] if args else kwargs["y"]
            _check_numeric("target y", y)
            self.validate_labels(params, x, y)
        return jitted(self, params, x, *args, **kwargs)

    method.jitted = jitted
    return method


def _check_numeric(arg: str, a) -> None:
    """A ValueError if array ``a`` holds no numbers (object, string or key dtypes)."""
    if hasattr(a, "dtype"):  # (not an array: the layer or loss refuses it, naming where)
        check_numeric("Sequential", arg, a)


def _is_float(dtype) -> bool:
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:
        return False


def _check_key(key) -> None:
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and jnp.ndim(key) == 1  # a legacy key, jax.random.PRNGKey
    if not (typed or raw):
        got = f"dtype {dtype}" if dtype is not None else type(key).__name__
        raise ValueError(f"Sequential.init: key must be a PRNG key, e.g. jax.random.key(0); "
                         f"got {got}")


def _prefixed(prefix: str, fn, *args):
    """Call ``fn(*args)``, prefixing any ValueError with where it happened."""
    try:
        return fn(*args)
    except ValueError as err:
        raise ValueError(f"{prefix} {err}") from None


@dataclasses.dataclass(frozen=True)
class Sequential:
    """A feed-forward network ``x → layers[0] → … → layers[-1] → loss``.

    The objective is ``J = L + λ/2 Σ ‖W‖_F²`` (λ = ``weight_decay``), the sum
    running over every layer's weight matrix or kernel, never its bias — the d2l
    objective ``J = L + s`` of tutorial 003.

    A ``Sequential`` is an immutable, hashable description: it holds no arrays.
    Parameters live in a plain pytree, a list with one dict per layer
    (``{"W": (in, out), "b": (out,)}`` for Dense, ``{}`` for parameterless
    layers), so users may build them by hand. ``forward``, ``loss``,
    ``manual_backward`` and ``manual_value_and_grad`` are jitted with the network
    as a static argument: equal networks share compiled code, and a second call
    with the same shapes never recompiles.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp import Sequential, layers, losses
      >>> net = Sequential([layers.Dense(3), layers.Tanh(), layers.Dense(2)],
      ...                  loss=losses.HalfSquaredError(), weight_decay=1e-3)
      >>> params = net.init(jax.random.key(0), input_shape=(4,))
      >>> x, y = jnp.ones((5, 4)), jnp.zeros((5, 2))
      >>> grads = net.manual_backward(params, x, y)
      >>> auto = jax.grad(net.loss)(params, x, y)
      >>> bool(jnp.allclose(grads[0]["W"], auto[0]["W"], atol=1e-6))
      True
    """

    layers: tuple[Layer, ...]
    loss_fn: Loss
    weight_decay: float = 0.0

    def __init__(self, layers: Sequence[Layer], loss: Loss, weight_decay: float = 0.0):
        layers = tuple(layers)
        if not layers:
            raise ValueError("Sequential: layers must contain at least one layer; got []")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise ValueError(
                    f"Sequential: layers[{i}] must be a jaxbp layer; got {type(layer).__name__}"
                )
        if not isinstance(loss, Loss):
            raise ValueError(f"Sequential: loss must be a jaxbp loss; got {type(loss).__name__}")
        if not is_real(weight_decay):
            raise ValueError(f"Sequential: weight_decay must be a real number, finite and >= 0; "
                             f"got {weight_decay!r} ({type(weight_decay).__name__})")
        weight_decay = float(weight_decay)
        if not 0 <= weight_decay < float("inf"):
            raise ValueError(
                f"Sequential: weight_decay must be finite and >= 0; got {weight_decay}"
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "loss_fn", loss)
        object.__setattr__(self, "weight_decay", weight_decay)

    # ------------------------------------------------------------------ shapes
    def _where(self, i: int) -> str:
        return f"layers[{i}]"

    def init(self, key, input_shape, dtype=None) -> list[dict]:
        """Initialise every layer; ``input_shape`` excludes the batch axis.

        ``dtype`` is a floating-point dtype (None: float64 under ``jax_enable_x64``,
        else float32): gradients are taken with respect to the params.
        """
        _check_key(key)
        if (isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__")
                or not all(is_int(s) for s in input_shape)):
            raise ValueError(f"Sequential.init: input_shape must be a tuple of ints (batch axis "
                             f"excluded), e.g. (64,) or (8, 8, 1); got {input_shape!r}")
        if dtype is not None:
            try:
                shown = jnp.dtype(dtype).name
            except TypeError:
                shown = repr(dtype)
            if not _is_float(dtype):
                raise ValueError(f"Sequential.init: dtype must be a floating-point dtype (e.g. "
                                 f"jnp.float32) or None; got {shown}")
        shape = tuple(int(s) for s in input_shape)
        # Shapes first (no FLOPs, no memory): an absurd network is an error, not a hang.
        abstract = jax.eval_shape(lambda k: self._init_layers(k, shape, dtype), key)
        leaves = jax.tree.leaves(abstract)
        count = sum(math.prod(a.shape) for a in leaves)
        nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
        check_memory("Sequential.init", f"{count} parameters", nbytes)
        return self._init_layers(key, shape, dtype)

    def _init_layers(self, key, shape, dtype):
        params = []
        for i, (layer, k) in enumerate(zip(self.layers, jax.random.split(key, len(self.layers)))):
            p, shape = _prefixed(self._where(i), layer.init, k, shape, dtype)
            params.append(p)
        return params

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The output shape (batch excluded) for ``input_shape``, computed without FLOPs."""
        params = jax.eval_shape(lambda k: self.init(k, input_shape), jax.random.key(0))
        out = jax.eval_shape(self.forward, params, jax.ShapeDtypeStruct((1, *input_shape), float))
        return tuple(out.shape[1:])

    def validate_labels(self, params, x, y) -> None:
        """``ValueError`` if labels or targets ``y`` do not suit the output for ``x``.

        Integer labels must lie in ``[0, classes)`` of a (batch, classes) output,
        probability targets must be >= 0 with rows summing to 1, binary targets lie
        in [0, 1] (each loss's ``check_target_values``). Checks values that are
        known — concrete arrays, also under ``jax.grad`` and ``jax.vmap`` — and
        costs no FLOPs; inside ``jit`` the values are unknown and go unchecked.
        ``fit`` and ``gradcheck`` call it before they start.
        """
        if type(self.loss_fn).check_target_values is Loss.check_target_values:
            return  # the loss takes any values
        if not hasattr(y, "dtype") or not values_known(y):
            return  # (a y that is not an array is the loss's to refuse)
        y_hat = jax.eval_shape(self.forward, params, x)  # cached trace, no FLOPs
        if len(y_hat.shape) == 2:
            _prefixed("loss", self.loss_fn.check_target_values, y_hat, y)

    def _check_params(self, params) -> None:
        if not isinstance(params, (list, tuple)) or len(params) != len(self.layers):
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(
                f"Sequential: params must be a list with one dict per layer "
                f"({len(self.layers)}); got {got}"
            )
        for i, (layer, p) in enumerate(zip(self.layers, params)):
            for k, v in p.items() if isinstance(p, dict) else ():
                dtype = getattr(v, "dtype", None)
                if dtype is not None and not _is_float(dtype):
                    raise ValueError(
                        f"{self._where(i)} {layer.name}: params[{k!r}] must be a floating-point "
                        f"array (gradients are taken with respect to it); got dtype {dtype}"
                    )

    # ----------------------------------------------------------------- forward
    def _forward(self, params, x):
        """Run every layer; return the output, each layer's input, each residuals."""
        self._check_params(params)
        inputs, residuals = [], []
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            x, res = _prefixed(f"{self._where(i)}", layer.forward, params[i], x)
            residuals.append(res)
        return x, inputs, residuals

    @_checks_arguments
    @_method_jit
    def forward(self, params, x):
        """The network's output ``y_hat`` for a batch ``x``."""
        return self._forward(params, x)[0]

    @_checks_arguments
    @_method_jit
    def forward_with_residuals(self, params, x):
        """The output and, per layer, a dict of its input ``x``, output ``y`` and residuals.

        For teaching: ``trace[0]["y"]`` of a Dense layer is its pre-activation
        ``z``, and ``trace[1]["y"]`` of the Sigmoid after it is ``a = σ(z)``.
        """
        y_hat, inputs, residuals = self._forward(params, x)
        outputs = inputs[1:] + [y_hat]
        trace = [
            {"x": xi, "y": yi, **res._asdict()}
            for xi, yi, res in zip(inputs, outputs, residuals)
        ]
        return y_hat, trace

    # -------------------------------------------------------------------- loss
    def weight_penalty(self, params):
        """``s = λ/2 Σ ‖W‖_F²`` over weight matrices and kernels (``J = L + s``; 0 when λ = 0)."""
        self._check_params(params)
        if self.weight_decay == 0.0:
            return 0.0
        total = 0.0
        for layer, p in zip(self.layers, params):
            for k in layer.decay_keys:
                if k in p:
                    total = total + jnp.sum(p[k] * p[k])
        return 0.5 * self.weight_decay * total

    def _data_loss(self, y_hat, y):
        """``(L, ∂L/∂y_hat)``, the gradient in ``y_hat``'s dtype (targets may be wider)."""
        L, dy_hat = _prefixed("loss", self.loss_fn.value_and_grad, y_hat, y)
        return L, dy_hat.astype(y_hat.dtype)

    @_checks_arguments
    @_method_jit
    def loss(self, params, x, y):
        """``J = L(forward(x), y) + λ/2 Σ ‖W‖²`` (a scalar)."""
        y_hat = self._forward(params, x)[0]
        return self._data_loss(y_hat, y)[0] + self.weight_penalty(params)

    @property
    def loss_with_manual_grad(self):
        """``loss`` whose ``jax.grad`` runs the manual backward (``jaxbp.with_manual_grad``)."""
        from .bridge import with_manual_grad  # bridge builds on Sequential's methods

        return with_manual_grad(self)

    # ---------------------------------------------------------------- backward
    def _walk_back(self, params, residuals, dy, start: int, stop: int, grads, signals):
        """Backpropagate ``dy`` from the output of layer ``stop − 1`` down to ``start``."""
        for i in reversed(range(start, stop)):
            layer = self.layers[i]
            dparams, dy = _prefixed(
                self._where(i), layer.backward, params[i], residuals[i - start], dy
            )
            if self.weight_decay != 0.0:
                dparams = {
                    k: g + self.weight_decay * params[i][k] if k in layer.decay_keys else g
                    for k, g in dparams.items()
                }
            # in each parameter's dtype, as jax.grad gives (mixed dtypes promote on the way)
            grads[i] = {k: g.astype(params[i][k].dtype) for k, g in dparams.items()}
            signals[i] = dy
        return dy

    def _manual(self, params, x, y, remat_every):
        n = len(self.layers)
        grads, signals = [None] * n, [None] * n
        if remat_every is None:
            y_hat, _, residuals = self._forward(params, x)
            L, dy = self._data_loss(y_hat, y)
            self._walk_back(params, residuals, dy, 0, n, grads, signals)
        else:
            if not is_int(remat_every) or remat_every < 1:
                raise ValueError(
                    f"Sequential.manual_backward: remat_every must be a positive int or None; "
                    f"got {remat_every!r}"
                )
            remat_every = int(remat_every)
            # Forward keeping only the input of every remat_every-th layer.
            self._check_params(params)
            checkpoints, a = {}, x
            for i, layer in enumerate(self.layers):
                if i % remat_every == 0:
                    checkpoints[i] = a
                a, _ = _prefixed(self._where(i), layer.forward, params[i], a)
            L, dy = self._data_loss(a, y)
            for start in reversed(range(0, n, remat_every)):
                stop = min(start + remat_every, n)
                segment = functools.partial(self._remat_segment, start, stop)
                # Recompute inside a conditional: XLA's common-subexpression pass
                # would otherwise merge the recomputation back into the first forward
                # pass (XLA:CPU drops optimization barriers before it), keeping every
                # residual alive. Both branches are the same segment, so the predicate
                # never changes the result; as dy is an operand, the segment runs only
                # after the layers above it are done.
                seg_grads, seg_signals, dy = jax.lax.cond(
                    jnp.isnan(L), segment, segment, params[start:stop], checkpoints[start], dy
                )
                grads[start:stop], signals[start:stop] = seg_grads, seg_signals
        if isinstance(params, tuple):
            grads = tuple(grads)  # the pytree of params, as jax.grad returns it
        return L + self.weight_penalty(params), grads, signals

    def _remat_segment(self, start: int, stop: int, seg_params, a, dy):
        """Recompute layers ``start … stop − 1`` from their stored input ``a``, then walk back.

        Returns the segment's gradients, its backpropagated signals and ``dy`` at its input.
        """
        params = [None] * start + list(seg_params)
        residuals = []
        for i in range(start, stop):
            a, res = _prefixed(self._where(i), self.layers[i].forward, params[i], a)
            residuals.append(res)
        grads, signals = [None] * stop, [None] * stop
        dy = self._walk_back(params, residuals, dy, start, stop, grads, signals)
        return grads[start:], signals[start:], dy

    @_checks_arguments
    @functools.partial(jax.jit, static_argnums=0, static_argnames="remat_every")
    def manual_value_and_grad(self, params, x, y, *, remat_every=None):
        """``(J, ∂J/∂params)`` by the hand-written backward pass.

        Runs the forward pass storing each layer's residuals, seeds
        ``dy = ∂L/∂y_hat`` from the loss's own hand-written gradient, then walks the
        layers in reverse calling each ``backward`` and adds ``λW`` to every
        decayed parameter. No autodiff is involved.

        ``remat_every=k`` stores only every k-th layer's input and recomputes the
        other residuals segment by segment during the backward walk: less memory
        for one extra forward pass (``jaxbp bench`` shows both; on a 16×512 MLP,
        k = 4 cuts XLA's temporary memory about 4× for about 1.3× the time). Each
        segment runs inside a ``lax.cond``; XLA:CPU runs some convolution
        gradients slowly inside control flow, so remat suits dense stacks best there.
        """
        J, grads, _ = self._manual(params, x, y, remat_every)
        return J, grads

    @_checks_arguments
    @functools.partial(jax.jit, static_argnums=0, static_argnames="remat_every")
    def manual_backward(self, params, x, y, *, remat_every=None):
        """``∂J/∂params`` by the hand-written backward pass (same pytree as params)."""
        return self._manual(params, x, y, remat_every)[1]

    @_checks_arguments
    @_method_jit
    def manual_backward_with_signals(self, params, x, y):
        """``(grads, dxs)`` where ``dxs[i] = ∂J/∂(input of layers[i])``.

        The per-layer backpropagated signals are what a gradient check compares
        to locate the first layer whose backward is wrong.
        """
        _, grads, signals = self._manual(params, x, y, None)
        return grads, signals
