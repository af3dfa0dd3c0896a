"""The layer contract shared by every layer in jaxbp.

A layer is an immutable, hashable description (a frozen dataclass holding only
hyperparameters) with four pure functions:

    init(key, input_shape, dtype)          -> (params, state, output_shape)
    check(params, state, x, ctx)           -> None (a ValueError for bad input)
    forward(params, state, x, ctx)         -> (y, new_state, residuals)
    backward(params, residuals, dy)        -> (dparams, dx)

``input_shape`` and ``output_shape`` exclude the leading batch axis. ``params``
and ``state`` are plain pytrees: a dict of arrays for a leaf layer (``{}`` where
it has none), a list with one entry per child for ``Sequential``. ``state``
holds what the forward pass updates but gradients never flow through (BatchNorm's
running statistics); ``ctx`` is a :class:`Context` carrying the train/eval flag
and a PRNG key. ``dparams`` has exactly the structure and shapes of ``params``.
``residuals`` is a NamedTuple naming what the forward pass stores for the
backward pass; state never reaches ``backward``. ``dy`` is ∂L/∂y with the shape
of ``y``; ``dx`` is ∂L/∂x with the shape of ``x`` (inputs may be tuples of
arrays, and then ``dx`` is the matching tuple).

``forward`` and ``backward`` are the math only: a container (``Sequential``,
``Residual``, the model) calls ``check`` once, at trace time, before each
child's ``forward`` through :func:`call`, which also puts the child's nested
path (``layers[3].body.layers[1]``) in front of any error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Context(NamedTuple):
    """What a forward pass needs besides params, state and input.

    ``train`` (a Python bool, static under jit) selects batch statistics and
    dropout; ``key`` is a PRNG key or ``None``. ``ctx.at(i)`` gives child ``i``
    its own reproducible key, so the manual and the autodiff paths draw the same
    dropout masks from the same key.
    """

    train: bool = False
    key: object = None

    def at(self, i: int) -> Context:
        return self if self.key is None else self._replace(key=jax.random.fold_in(self.key, i))


class Layer:
    """Base class: a frozen dataclass subclass implements init/check/forward/backward.

    ``decay_keys`` names the parameters that weight decay applies to (weight
    matrices and kernels, never biases or normalisation scales). ``stateful``:
    the layer has state that ``forward`` updates; ``stochastic``: in train mode
    its ``forward`` needs ``ctx.key``.
    """

    decay_keys: ClassVar[tuple[str, ...]] = ()
    stateful: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def init(self, key, input_shape, dtype=None):
        """Parameterless, stateless default: shape unchanged."""
        del key, dtype
        return {}, {}, tuple(input_shape)

    def check(self, params, state, x, ctx) -> None:
        """Parameterless, stateless default: ``params`` and ``state`` are ``{}``, x an array."""
        check_parameterless(self.name, params, x)
        check_params(self.name, state, {}, "state")

    def check_input_values(self, x) -> None:
        """A ValueError for input values outside the layer's domain (concrete ``x``; default: none).

        Shapes and dtypes are ``check``'s; values can only be checked where they
        are known, so a model calls this on its input before it jits
        (``Embedding``: ids in [0, vocab_size)).
        """

    def forward(self, params, state, x, ctx):
        raise NotImplementedError

    def backward(self, params, residuals, dy):
        raise NotImplementedError

    def decayed(self, params):
        """Bools in the structure of ``params``: which leaves weight decay applies to."""
        return {k: k in self.decay_keys for k in params}

    def empty_state(self):
        """The state of a stateless layer (``{}``; a list of them for containers)."""
        return {}

    def param_paths(self, params, path: str):
        """Strings in the structure of ``params``: each leaf's nested name, e.g. ``layers[2].W``."""
        return {k: f"{path}.{k}" for k in params}

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
        )
        return f"{self.name}({fields})"


class LayerError(ValueError):
    """A ValueError raised inside a nested layer: ``path`` says where, e.g. ``layers[3].body``."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path} {message}")
        self.path, self.message = path, message


_PATH: list[str] = []  # where the trace is now (trace time only)
_TAPS: list = []  # the active tap (gradcheck's), if any


def current_path() -> str:
    """The nested path of the layer being traced, e.g. ``layers[3].body.layers[1]``."""
    return ".".join(_PATH)


@contextlib.contextmanager
def at_path(where: str):
    """Trace a child at ``where``: its errors, and a tap's records, name the nested path."""
    _PATH.append(where)
    try:
        yield
    except LayerError as err:
        raise LayerError(f"{where}.{err.path}", err.message) from None
    except ValueError as err:
        raise LayerError(where, str(err)) from None
    finally:
        _PATH.pop()


@contextlib.contextmanager
def tapping(tap):
    """Run with ``tap`` receiving every child call (see :func:`call`); for gradcheck's blame."""
    _TAPS.append(tap)
    try:
        yield tap
    finally:
        _TAPS.pop()


def call(layer: Layer, where: str, params, state, x, ctx):
    """``layer.check`` then ``layer.forward``, traced at the nested path ``where``.

    An active tap may add a perturbation to ``x`` (so autodiff can read the
    signal ∂J/∂x at every nested layer's input).
    """
    with at_path(where):
        layer.check(params, state, x, ctx)
        if _TAPS:
            x = _TAPS[-1].enter(layer, current_path(), params, x)
        return layer.forward(params, state, x, ctx)


def call_backward(layer: Layer, where: str, params, residuals, dy):
    """``layer.backward`` at the nested path ``where``; an active tap records ``dx``."""
    with at_path(where):
        dparams, dx = layer.backward(params, residuals, dy)
        if _TAPS:
            _TAPS[-1].leave(layer, current_path(), dx)
    return dparams, dx


def is_key(key) -> bool:
    """One PRNG key: a typed key array of shape () or a raw uint32 key (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return dtype == jnp.uint32 and key.ndim == 1


def check_train_flag(layer: str, ctx) -> None:
    """A ValueError unless ``ctx`` is a :class:`Context` whose ``train`` is a Python bool."""
    if not isinstance(ctx, Context):
        raise ValueError(f"{layer}: ctx must be a jaxbp.layers.Context(train, key); got "
                         f"{type(ctx).__name__}")
    if not isinstance(ctx.train, (bool, np.bool_)):
        raise ValueError(f"{layer}: ctx.train must be a Python bool (it selects the program, so "
                         f"it is static under jit); got {type(ctx.train).__name__}")


def per_feature(v, ndim: int):
    """A per-feature vector (D,) as (1, …, 1, D), to scale every row of an ``ndim``-rank input."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def dtype_name(where: str, dtype, allowed) -> str:
    """The name of ``dtype`` (a dtype or its name) if it is one of ``allowed``; else a ValueError.

    ``None`` is refused (``np.dtype(None)`` would silently be float64). The one
    parser of a ``dtype`` argument.
    """
    try:
        name = jnp.dtype(dtype).name if dtype is not None else None
    except (TypeError, ValueError):  # not a dtype at all ("bogus")
        name = None
    if name not in allowed:
        raise ValueError(f"{where}: dtype must be {_one_of(list(allowed))}; got {dtype!r}")
    return name


def _one_of(names: list[str]) -> str:
    return f"{names[0]} or {names[1]}" if len(names) == 2 else f"one of {', '.join(names)}"


def default_float_dtype():
    """float64 when ``jax_enable_x64`` is on, else float32."""
    return jnp.result_type(float)


def check_array(layer: str, arg: str, x) -> None:
    """Raise a ValueError unless ``x`` is an array (JAX's or NumPy's, or a tracer) of numbers."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
        raise ValueError(
            f"{layer}: {arg} must be an array (jax.numpy or numpy); got {type(x).__name__}"
            + (" (convert it with jnp.asarray)" if isinstance(x, (list, tuple)) else "")
        )
    check_numeric(layer, arg, x)


def check_numeric(where: str, arg: str, x) -> None:
    """Raise a ValueError if array ``x`` holds no numbers (an object, string or key dtype)."""
    try:
        numeric = jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)
    except TypeError:
        numeric = False
    if not numeric:
        raise ValueError(f"{where}: {arg} must be an array of numbers (bool, int or float); got "
                         f"dtype {x.dtype}")


def check_rank(layer: str, arg: str, x, rank: int, layout: str) -> None:
    """Raise a ValueError unless ``x`` is an array with ``rank`` dimensions."""
    check_array(layer, arg, x)
    if x.ndim != rank:
        raise ValueError(
            f"{layer}: {arg} must have rank {rank} {layout}; got shape {tuple(x.shape)} "
            f"(rank {x.ndim})"
        )


def _scalar_of(value, kind) -> bool:
    """A concrete 0-d array (NumPy's or JAX's, not a tracer) whose dtype is of ``kind``."""
    dtype = getattr(value, "dtype", None)
    return (dtype is not None and np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer)
            and np.issubdtype(dtype, kind) and not np.issubdtype(dtype, np.bool_))


def is_int(value) -> bool:
    """An integer (a Python or NumPy int, or a 0-d integer array), but not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, numbers.Integral) or _scalar_of(value, np.integer)


def is_real(value) -> bool:
    """A real number (Python, NumPy or a 0-d integer or float array), but not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return (isinstance(value, numbers.Real) or _scalar_of(value, np.integer)
            or _scalar_of(value, np.floating))


def count_non_finite(x) -> int:
    """Entries of array ``x`` that are NaN or ±inf, counted where ``x`` lives (host or device)."""
    if isinstance(x, np.ndarray):
        return int(x.size - np.count_nonzero(np.isfinite(x)))
    return int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))


def check_int(where: str, arg: str, value, minimum: int = 1) -> None:
    """Raise a ValueError naming ``where`` and ``arg`` unless ``value`` is an int ≥ ``minimum``."""
    if not is_int(value) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{where}: {arg} must be {expected}; got {value!r}")


def check_params(layer: str, params, expected: dict, what: str = "params") -> None:
    """Raise a ValueError unless ``params`` has exactly the keys and shapes of ``expected``.

    ``expected`` maps each key to ``(shape, layout)``; ``None`` in a shape matches
    any size, e.g. ``{"W": ((None, 4), "(in, units)"), "b": ((4,), "(units,)")}``.
    """
    if not isinstance(params, dict) or set(params) != set(expected):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        if not expected:
            noun = "parameters" if what == "params" else what
            raise ValueError(f"{layer}: {what} must be {{}} (the layer has no {noun}); got {got}")
        raise ValueError(f"{layer}: {what} must have the keys {sorted(expected)}; got {got}")
    for name, (shape, layout) in expected.items():
        check_array(layer, f"{what}[{name!r}]", params[name])
        if what == "params" and not jnp.issubdtype(params[name].dtype, jnp.floating):
            raise ValueError(f"{layer}: params[{name!r}] must be a floating-point array "
                             f"(gradients are taken with respect to it); got dtype "
                             f"{params[name].dtype}")
        got = tuple(params[name].shape)
        if len(got) != len(shape) or any(e not in (None, g) for e, g in zip(shape, got)):
            want = str(tuple("*" if e is None else e for e in shape)).replace("'*'", "*")
            raise ValueError(
                f"{layer}: {what}[{name!r}] must have shape {layout} = {want}; got {got}"
            )


def check_parameterless(layer: str, params, x) -> None:
    """A parameterless layer's forward: ``params`` must be ``{}`` and ``x`` an array."""
    check_params(layer, params, {})
    check_array(layer, "input x", x)


def check_real(where: str, arg: str, value, minimum: float | None = None, *,
               strict: bool = False) -> float:
    """``value`` as a float; a ValueError unless it is a finite real number ≥ ``minimum``.

    ``strict``: > ``minimum``. The one check of every real-valued argument (a rate, an
    ε, a margin, a weight decay).
    """
    ok = is_real(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{where}: {arg} must be a finite number{bound}; got {value!r}")
    return float(value)


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(where: str, what: str, nbytes: int) -> None:
    """A ValueError naming ``where`` if ``nbytes`` exceed the physical memory.

    Called with an estimate before allocating, so that an absurd size is an error
    rather than a machine swapping or hanging.
    """
    memory = memory_bytes()
    if memory is not None and nbytes > memory:
        raise ValueError(f"{where}: {what} would need {nbytes / 2**30:.3g} GiB, more than the "
                         f"{memory / 2**30:.3g} GiB of memory this machine has")
