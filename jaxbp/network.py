"""``Model``: a body layer, a loss, and the hand-written backward walk.

``jaxbp.Sequential(layers, loss=...)`` builds one. The model owns the objective
``J = L + λ/2 Σ ‖W‖²``, ``jit``, rematerialisation and the checks of arguments
that cannot be made inside a trace (label ranges, object arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from .layers.base import (
    Context,
    Layer,
    call,
    call_backward,
    check_contract,
    check_memory,
    check_numeric,
    check_real,
    is_int,
    is_key,
)
from .layers.combinators import Sequential
from .losses import Loss, concrete_values, values_known

_MODE = ("state", "key", "train")
_jit = functools.partial(jax.jit, static_argnums=0, static_argnames=("train",))
_jit_remat = functools.partial(jax.jit, static_argnums=0, static_argnames=("train", "remat_every"))


def _checks_arguments(jitted):
    """Check the arguments outside the trace, then call the jitted method.

    Arrays of objects or strings cannot enter ``jit`` (JAX raises a TypeError);
    they are refused here with a ValueError, as are a missing ``state`` for a
    network with state and a ``key`` that is not a PRNG key. Inside jit, labels
    and targets are abstract and cannot be range-checked; called directly (or
    under ``jax.grad`` or ``jax.vmap``) they are concrete, and an out-of-range
    label or target raises a ValueError instead of silently giving a
    meaningless loss.
    """

    @functools.wraps(jitted)
    def method(self, params, x, *args, state=None, key=None, train=False, **kwargs):
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            _check_numeric(f"params{jax.tree_util.keystr(path)}", leaf)
        for leaf in jax.tree.leaves(x):
            _check_numeric("input x", leaf)
        if all(values_known(leaf) for leaf in jax.tree.leaves(x)):  # (unknown inside jit)
            self.body.check_input_values(jax.tree.map(concrete_values, x))
        self._check_mode(state, key, train)
        mode = {"state": state, "key": key, "train": bool(train)}
        if args or "y" in kwargs:  # forward and forward_with_residuals take no y
            y = args[0] if args else kwargs["y"]
            _check_numeric("target y", y)
            self.validate_labels(params, x, y, **mode)
        return jitted(self, params, x, *args, **mode, **kwargs)

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


def _check_key(where: str, key) -> None:
    if not is_key(key):
        dtype = getattr(key, "dtype", None)
        got = f"dtype {dtype}" if dtype is not None else type(key).__name__
        raise ValueError(f"{where}: key must be a PRNG key, e.g. jax.random.key(0); got {got}")


def _shape_tree(shape):
    """``shape`` as a tuple of ints, or a tuple of such trees (a tuple input); None if neither."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        return None
    shape = tuple(shape)
    if all(is_int(s) for s in shape):
        return tuple(int(s) for s in shape)
    trees = [_shape_tree(s) for s in shape]
    return None if not trees or None in trees else tuple(trees)


def _prefixed(prefix: str, fn, *args):
    """Call ``fn(*args)``, prefixing any ValueError with where it happened."""
    try:
        return fn(*args)
    except ValueError as err:
        raise ValueError(f"{prefix} {err}") from None




@dataclasses.dataclass(frozen=True, repr=False)
class Model:
    """A network ``x → body → loss``: what ``jaxbp.Sequential(layers, loss=...)`` returns.

    The objective is ``J = L + λ/2 Σ ‖W‖_F²`` (λ = ``weight_decay``), the sum
    running over every weight matrix or kernel of every nested layer, never a
    bias or a normalisation scale — the d2l objective ``J = L + s`` of
    tutorial 003.

    A model is an immutable, hashable description: it holds no arrays. The
    body is a :class:`~jaxbp.layers.Sequential` (a single layer is wrapped in
    one), so params are a plain pytree, a list with one entry per layer
    (``{"W": (in, out), "b": (out,)}`` for Dense, ``{}`` for parameterless
    layers, a nested list for a nested ``Sequential``), and users may build them
    by hand. Every call is jitted with the model as a static argument: equal
    models share compiled code, and a second call with the same shapes never
    recompiles.

    Networks with state (BatchNorm) or randomness (Dropout) take the same
    keyword-only ``state=``, ``key=`` and ``train=`` (default False: eval mode)
    in every call, with the same meaning, so ``net.manual_backward(params, x, y,
    state=s, key=k, train=True)`` and ``jax.grad(net.loss)(params, x, y,
    state=s, key=k, train=True)`` differentiate the same function;
    ``net.manual_step`` also returns the updated state.

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

    body: Sequential
    loss_fn: Loss
    weight_decay: float = 0.0

    def __init__(self, body: Layer, loss: Loss, weight_decay: float = 0.0):
        check_contract("Model: body", body)
        if not isinstance(body, Sequential):
            body = Sequential([body])
        if not isinstance(loss, Loss):
            raise ValueError(f"Sequential: loss must be a jaxbp loss; got {type(loss).__name__}")
        weight_decay = check_real("Sequential", "weight_decay", weight_decay, 0)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "loss_fn", loss)
        object.__setattr__(self, "weight_decay", weight_decay)

    def __repr__(self) -> str:
        """The body (one layer a line when long), then the loss and the weight decay."""
        body = textwrap.indent(repr(self.body), "  ")
        return (f"Model(\n{body},\n  loss={self.loss_fn!r},\n"
                f"  weight_decay={self.weight_decay!r},\n)")

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The top-level layers (the body's children)."""
        return self.body.layers

    @property
    def stateful(self) -> bool:
        """Whether some layer has state (then every call needs ``state=``)."""
        return self.body.stateful

    # ------------------------------------------------------------------ shapes
    def init(self, key, input_shape, dtype=None):
        """Initialise every layer's params; ``input_shape`` excludes the batch axis.

        ``dtype`` is a floating-point dtype (None: float64 under ``jax_enable_x64``,
        else float32): gradients are taken with respect to the params.
        """
        return self._init(key, input_shape, dtype)[0]

    def init_state(self, key, input_shape, dtype=None):
        """The initial state (BatchNorm: running mean 0, variance 1) for the same arguments.

        A list with one entry per layer, ``{}`` for layers without state.
        """
        return self._init(key, input_shape, dtype)[1]

    def _init(self, key, input_shape, dtype):
        _check_key("Sequential.init", key)
        shape = _shape_tree(input_shape)
        if shape is None:
            raise ValueError(f"Sequential.init: input_shape must be a tuple of ints (batch axis "
                             f"excluded), e.g. (64,) or (8, 8, 1); got {input_shape!r} (a tuple "
                             f"input takes a tuple of shapes, e.g. ((16, 8), (32,)))")
        if dtype is not None:
            try:
                shown = jnp.dtype(dtype).name
            except TypeError:
                shown = repr(dtype)
            if not _is_float(dtype):
                raise ValueError(f"Sequential.init: dtype must be a floating-point dtype (e.g. "
                                 f"jnp.float32) or None; got {shown}")
        # Shapes first (no FLOPs, no memory): an absurd network is an error, not a hang.
        abstract = jax.eval_shape(lambda k: self.body.init(k, shape, dtype)[:2], key)
        leaves = jax.tree.leaves(abstract)
        count = sum(math.prod(a.shape) for a in leaves)
        nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
        check_memory("Sequential.init", f"{count} parameters and state entries", nbytes)
        return self.body.init(key, shape, dtype)

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The output shape (batch excluded) for ``input_shape``, computed without FLOPs."""
        shapes = []

        def init(k):
            params, state, shape = self._init(k, input_shape, None)
            shapes.append(tuple(shape))  # (a Python tuple: eval_shape returns only arrays)
            return params, state

        jax.eval_shape(init, jax.random.key(0))
        return shapes[0]

    def _check_mode(self, state, key, train) -> None:
        """``state``, ``key`` and ``train`` as every call takes them (see the class docstring)."""
        if not isinstance(train, (bool, np.bool_)):
            raise ValueError(f"Sequential: train must be True or False; got {train!r}")
        if key is not None:
            _check_key("Sequential", key)
        if state is None and self.stateful:
            raise ValueError("Sequential: this network has state (running statistics); pass "
                             "state=net.init_state(key, input_shape), then each step's new state")
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            _check_numeric(f"state{jax.tree_util.keystr(path)}", leaf)

    def validate_labels(self, params, x, y, *, state=None, key=None, train=False) -> None:
        """``ValueError`` if labels or targets ``y`` do not suit the output for ``x``.

        Integer labels must lie in ``[0, classes)`` of a (…, classes) output,
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
        y_hat = jax.eval_shape(  # cached trace, no FLOPs
            functools.partial(self.forward.jitted, self, state=state, key=key, train=train),
            params, x)
        if len(y_hat.shape) >= 2:
            _prefixed("loss", self.loss_fn.check_target_values, y_hat, y)

    # ----------------------------------------------------------------- forward
    def _checked_state(self, params, state, x, ctx):
        """``state`` (the empty one for ``None``) after the body's own check of its arguments."""
        if state is None:
            state = self.body.empty_state()
        self.body.check(params, state, x, ctx)
        return state

    def _run(self, params, state, x, ctx):
        """The body's forward: ``(y_hat, new_state, residuals)``."""
        state = self._checked_state(params, state, x, ctx)
        return self.body.forward(params, state, x, ctx)

    @_checks_arguments
    @_jit
    def forward(self, params, x, *, state=None, key=None, train=False):
        """The network's output ``y_hat`` for a batch ``x``."""
        return self._run(params, state, x, Context(train, key))[0]

    @_checks_arguments
    @_jit
    def forward_with_state(self, params, x, *, state=None, key=None, train=False):
        """``(y_hat, new_state)``: the output and the state the forward pass leaves."""
        return self._run(params, state, x, Context(train, key))[:2]

    @_checks_arguments
    @_jit
    def forward_with_residuals(self, params, x, *, state=None, key=None, train=False):
        """The output and, per top-level layer, a dict of its input, output and residuals.

        For teaching: ``trace[0]["y"]`` of a Dense layer is its pre-activation
        ``z``, and ``trace[1]["y"]`` of the Sigmoid after it is ``a = σ(z)``. A
        layer's named residuals appear under their names; a nested block's list
        of residuals under ``"residuals"``.
        """
        ctx, trace = Context(train, key), []
        state = self._checked_state(params, state, x, ctx)
        for i, layer in enumerate(self.layers):
            y, _, res = call(layer, f"layers[{i}]", params[i], state[i], x, ctx.at(i))
            named = res._asdict() if hasattr(res, "_asdict") else {"residuals": res}
            trace.append({"x": x, "y": y, **named})
            x = y
        return x, trace

    # -------------------------------------------------------------------- loss
    def weight_penalty(self, params):
        """``s = λ/2 Σ ‖W‖_F²`` over weight matrices and kernels (``J = L + s``; 0 when λ = 0)."""
        self.body.check(params, self.body.empty_state(), None, Context())
        if self.weight_decay == 0.0:
            return 0.0
        squares = jax.tree.map(lambda p, d: jnp.sum(p * p) if d else 0.0,
                               params, self.body.decayed(params))
        return 0.5 * self.weight_decay * sum(jax.tree.leaves(squares))

    def _data_loss(self, y_hat, y):
        """``(L, ∂L/∂y_hat)``, the gradient in ``y_hat``'s dtype (targets may be wider)."""
        L, dy_hat = _prefixed("loss", self.loss_fn.value_and_grad, y_hat, y)
        return L, dy_hat.astype(y_hat.dtype)

    @_checks_arguments
    @_jit
    def loss(self, params, x, y, *, state=None, key=None, train=False):
        """``J = L(forward(x), y) + λ/2 Σ ‖W‖²`` (a scalar)."""
        return self._objective(params, state, x, y, Context(train, key))[0]

    @_checks_arguments
    @_jit
    def loss_and_state(self, params, x, y, *, state=None, key=None, train=False):
        """``(J, new_state)``: for ``jax.value_and_grad(net.loss_and_state, has_aux=True)``."""
        return self._objective(params, state, x, y, Context(train, key))

    def _objective(self, params, state, x, y, ctx):
        y_hat, new_state, _ = self._run(params, state, x, ctx)
        return self._data_loss(y_hat, y)[0] + self.weight_penalty(params), new_state

    @property
    def loss_with_manual_grad(self):
        """``loss`` whose ``jax.grad`` runs the manual backward (``jaxbp.with_manual_grad``)."""
        from .bridge import with_manual_grad  # bridge builds on the model's methods

        return with_manual_grad(self)

    # ---------------------------------------------------------------- backward
    def _walk_back(self, params, residuals, dy, start: int, stop: int, grads, signals):
        """Backpropagate ``dy`` from the output of layer ``stop − 1`` down to ``start``."""
        for i in reversed(range(start, stop)):
            grads[i], dy = call_backward(self.layers[i], f"layers[{i}]", params[i],
                                         residuals[i - start], dy)
            signals[i] = dy
        return dy

    def _finish(self, params, grads):
        """Add ``λW`` to every decayed leaf; each gradient in its parameter's dtype."""
        if isinstance(params, tuple):
            grads = tuple(grads)  # the pytree of params, as jax.grad returns it
        if self.weight_decay != 0.0:
            grads = jax.tree.map(lambda g, p, d: g + self.weight_decay * p if d else g,
                                 grads, params, self.body.decayed(params))
        return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def _manual(self, params, state, x, y, ctx, remat_every):
        n = len(self.layers)
        grads, signals = [None] * n, [None] * n
        if remat_every is None:
            y_hat, new_state, residuals = self._run(params, state, x, ctx)
            L, dy = self._data_loss(y_hat, y)
            self._walk_back(params, residuals, dy, 0, n, grads, signals)
        else:
            if not is_int(remat_every) or remat_every < 1:
                raise ValueError(
                    f"Sequential.manual_backward: remat_every must be a positive int or None; "
                    f"got {remat_every!r}"
                )
            remat_every = int(remat_every)
            state = self._checked_state(params, state, x, ctx)
            # Forward keeping only the input of every remat_every-th layer.
            checkpoints, a, new_state = {}, x, []
            for i, layer in enumerate(self.layers):
                if i % remat_every == 0:
                    checkpoints[i] = a
                a, s, _ = call(layer, f"layers[{i}]", params[i], state[i], a, ctx.at(i))
                new_state.append(s)
            L, dy = self._data_loss(a, y)
            for start in reversed(range(0, n, remat_every)):
                stop = min(start + remat_every, n)
                segment = functools.partial(self._remat_segment, start, stop, ctx)
                # Recompute inside a conditional: XLA's common-subexpression pass
                # would otherwise merge the recomputation back into the first forward
                # pass (XLA:CPU drops optimization barriers before it), keeping every
                # residual alive. Both branches are the same segment, so the predicate
                # never changes the result; as dy is an operand, the segment runs only
                # after the layers above it are done.
                seg_grads, seg_signals, dy = jax.lax.cond(
                    jnp.isnan(L), segment, segment, params[start:stop], state[start:stop],
                    checkpoints[start], dy
                )
                grads[start:stop], signals[start:stop] = seg_grads, seg_signals
        return L + self.weight_penalty(params), self._finish(params, grads), new_state, signals

    def _remat_segment(self, start: int, stop: int, ctx, seg_params, seg_state, a, dy):
        """Recompute layers ``start … stop − 1`` from their stored input ``a``, then walk back.

        Returns the segment's gradients, its backpropagated signals and ``dy`` at its input.
        Dropout draws the same masks again: each layer's key is ``ctx.at(i)``.
        """
        params = [None] * start + list(seg_params)
        residuals = []
        for i in range(start, stop):
            a, _, res = call(self.layers[i], f"layers[{i}]", params[i], seg_state[i - start], a,
                             ctx.at(i))
            residuals.append(res)
        grads, signals = [None] * stop, [None] * stop
        dy = self._walk_back(params, residuals, dy, start, stop, grads, signals)
        return grads[start:], signals[start:], dy

    @_checks_arguments
    @_jit_remat
    def manual_value_and_grad(self, params, x, y, *, state=None, key=None, train=False,
                              remat_every=None):
        """``(J, ∂J/∂params)`` by the hand-written backward pass.

        Runs the forward pass storing each layer's residuals, seeds
        ``dy = ∂L/∂y_hat`` from the loss's own hand-written gradient, then walks the
        layers in reverse calling each ``backward`` and adds ``λW`` to every
        decayed parameter. No autodiff is involved.

        ``remat_every=k`` stores only every k-th layer's input and recomputes the
        other residuals segment by segment during the backward walk: less memory
        for one extra forward pass (``jaxbp bench`` measures both). Each segment
        runs inside a ``lax.cond``; XLA:CPU runs some convolution gradients
        slowly inside control flow, so remat suits dense stacks best there.
        """
        J, grads, _, _ = self._manual(params, state, x, y, Context(train, key), remat_every)
        return J, grads

    @_checks_arguments
    @_jit_remat
    def manual_step(self, params, x, y, *, state=None, key=None, train=False, remat_every=None):
        """``(J, ∂J/∂params, new_state)``: one training step's value, gradient and state.

        The jitted way to carry BatchNorm's running statistics from step to step:
        ``J, grads, state = net.manual_step(params, x, y, state=state, key=k,
        train=True)``. Its ``(J, grads)`` are ``manual_value_and_grad``'s.
        """
        J, grads, new_state, _ = self._manual(params, state, x, y, Context(train, key),
                                              remat_every)
        return J, grads, new_state

    @_checks_arguments
    @_jit_remat
    def manual_backward(self, params, x, y, *, state=None, key=None, train=False,
                        remat_every=None):
        """``∂J/∂params`` by the hand-written backward pass (same pytree as params)."""
        return self._manual(params, state, x, y, Context(train, key), remat_every)[1]

    @_checks_arguments
    @_jit
    def manual_backward_with_signals(self, params, x, y, *, state=None, key=None, train=False):
        """``(grads, signals)`` where ``signals[i] = ∂J/∂(input of layers[i])``.

        The per-layer backpropagated signals (δ of the tutorials); ``signals[0]``
        is ∂J/∂x. ``gradcheck`` compares every nested layer's signal to locate
        the first layer whose backward is wrong.
        """
        _, grads, _, signals = self._manual(params, state, x, y, Context(train, key), None)
        return grads, signals
