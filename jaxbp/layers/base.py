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
``Residual``, the model) checks each child's methods when it is built
(:func:`check_contract`), then calls its ``init``, ``check`` and ``forward``,
at trace time, through :func:`call_init` and :func:`call`, and its
``backward`` through :func:`call_backward`. They put the child's nested path
(``layers[3].body.layers[1]``) in front of any error, turn any other exception
raised inside the child into one line naming the path, the method and the
line it came from, and compare what ``backward`` returns with the params and
the input before anything else uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
import os
import traceback
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
    """Base class of every layer: a subclass writes ``forward`` and ``backward``.

    ``init`` and ``check`` default to a parameterless, stateless layer that
    keeps the input's shape. Write a layer as ``@dataclasses.dataclass(frozen=True)``
    holding only its hyperparameters: a model is a static argument of
    ``jax.jit``, so layers must be hashable, and a frozen dataclass hashes and
    compares by value (equal models share compiled code). A plain subclass works
    too, but hashes by identity: each new instance compiles its own programs.

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
        """``Dense(units=3, …)``: a dataclass's fields, or a plain class's public attributes."""
        if dataclasses.is_dataclass(self):  # named as the constructor's argument (init=…)
            items = [(f.metadata.get("argument", f.name), getattr(self, f.name))
                     for f in dataclasses.fields(self)]
        else:
            items = [(k, v) for k, v in getattr(self, "__dict__", {}).items()
                     if not k.startswith("_")]
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in items)})"


class LayerError(ValueError):
    """A ValueError raised inside a nested layer: ``path`` says where, e.g. ``layers[3].body``.

    Where the layer's own method raised another exception (a TypeError from a
    shape bug, an IndexError), that exception is this one's ``__context__``.
    """

    def __init__(self, path: str, message: str):
        super().__init__(f"{path} {message}" if path else message)  # ('': a layer on its own)
        self.path, self.message = path, message


_PATH: list[str] = []  # where the trace is now (trace time only)
_TAPS: list = []  # the active tap (gradcheck's), if any
_SEEN: dict[str, tuple] = {}  # nested path -> (abstract input, output shapes) of its last forward
_CHECKED: set[type] = set()  # the layer classes whose methods check_contract has accepted


def current_path() -> str:
    """The nested path of the layer being traced, e.g. ``layers[3].body.layers[1]``."""
    return ".".join(p for p in _PATH if p)  # ('' is a layer checked on its own)


@contextlib.contextmanager
def at_path(where: str):
    """Trace a child at ``where``: its errors, and a tap's records, name the nested path."""
    _PATH.append(where)
    try:
        yield
    except LayerError:
        raise  # (named by the innermost path already)
    except ValueError as err:
        raise LayerError(current_path(), str(err)) from None
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


# --------------------------------------------------------------------- the contract
class _Method(NamedTuple):
    takes: str  # the arguments a container passes
    returns: str  # what the container unpacks ("" for nothing)
    why: str  # why it must take them


_METHODS = {
    "init": _Method("(key, input_shape, dtype=None)", "(params, state, output_shape)",
                    "jaxbp passes the dtype"),
    "check": _Method("(params, state, x, ctx)", "", "jaxbp passes the state and a Context"),
    "forward": _Method("(params, state, x, ctx)", "(y, new_state, residuals)",
                       "jaxbp passes the state and a Context"),
    "backward": _Method("(params, residuals, dy)", "(dparams, dx)",
                        "jaxbp passes the residuals forward returned and ∂L/∂y"),
}
_REQUIRED = ("forward", "backward")  # the base's raise NotImplementedError


def _arity(text: str) -> int:
    """How many names ``(a, b, c)`` lists."""
    return text.count(",") + 1


def check_contract(where: str, layer) -> None:
    """A ValueError naming ``where`` (e.g. ``Sequential: layers[1]``) unless ``layer`` fits.

    A container's child must be a :class:`Layer` with its own ``forward`` and
    ``backward``, whose methods take what the container passes (checked once per
    class), and hashable (a model is a static argument of ``jax.jit``).
    """
    if not isinstance(layer, Layer):
        got = type(layer).__name__
        if all(callable(getattr(layer, name, None)) for name in _REQUIRED):
            got += (", which has forward and backward but does not subclass "
                    f"jaxbp.layers.Layer: write class {got}(jaxbp.layers.Layer)")
        raise ValueError(f"{where} must be a jaxbp layer; got {got}")
    if type(layer) not in _CHECKED:
        for name in _METHODS:
            _check_method(where, layer, name)
        _CHECKED.add(type(layer))
    try:
        hash(layer)
    except TypeError as err:
        raise ValueError(f"{where} {layer.name} is not hashable ({err}), and models are static "
                         f"arguments of jax.jit: make it @dataclasses.dataclass(frozen=True), "
                         f"with hashable fields (tuples, not lists)") from None


def _check_method(where: str, layer: Layer, name: str) -> None:
    """A ValueError unless ``layer.<name>`` is defined and takes what a container passes."""
    method, spec = getattr(layer, name, None), _METHODS[name]
    inherited = name in _REQUIRED and getattr(type(layer), name) is getattr(Layer, name)
    if inherited or not callable(method):
        raise ValueError(f"{where} {layer.name} must define {name}{spec.takes} -> "
                         f"{spec.returns}: every layer writes its own forward and backward")
    signature = inspect.signature(method)
    try:
        signature.bind(*[None] * _arity(spec.takes))
    except TypeError:
        raise ValueError(f"{where} {layer.name}.{name} must take {spec.takes}: {spec.why}; got "
                         f"{signature}") from None


def _run(layer: Layer, name: str, *args):
    """``layer.<name>(*args)``; any exception but a ValueError becomes a one-line LayerError.

    The line names the nested path, the method, the exception and the innermost
    line of the traceback in the file defining the method (the user's own line,
    not JAX's frames below it).
    """
    method = getattr(layer, name)
    try:
        return method(*args)
    except ValueError:
        raise
    except Exception as err:
        lines = str(err).strip().splitlines()
        text = f": {lines[0]}" if lines else ""
        raise LayerError(current_path(), f"{layer.name}.{name} raised {type(err).__name__}"
                                         f"{text}{_origin(err, method)}") from None


def _origin(err: Exception, method) -> str:
    """`` (at FILE:LINE)``: the innermost frame of ``err`` in ``method``'s file; '' if none."""
    code = getattr(method, "__code__", None)
    if code is None:
        return ""
    lines = [line for frame, line in traceback.walk_tb(err.__traceback__)
             if frame.f_code.co_filename == code.co_filename]
    return f" (at {code.co_filename}:{lines[-1]})" if lines else ""


def _returned(layer: Layer, name: str, out):
    """``out`` if it is the tuple ``layer.<name>`` must return; else a ValueError saying so."""
    returns = _METHODS[name].returns
    if not (isinstance(out, tuple) and len(out) == _arity(returns)):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise ValueError(f"{layer.name}.{name} must return {returns}; got {got}")
    return out


def _shapes(tree):
    """The shape of every leaf of ``tree``, in its structure."""
    return jax.tree.map(np.shape, tree)


def call_init(layer: Layer, where: str, key, input_shape, dtype):
    """``layer.init`` at the nested path ``where``: ``(params, state, output_shape)``."""
    with at_path(where):
        return _returned(layer, "init", _run(layer, "init", key, input_shape, dtype))


def call(layer: Layer, where: str, params, state, x, ctx):
    """``layer.check`` then ``layer.forward``, traced at the nested path ``where``.

    An active tap may add a perturbation to ``x`` (so autodiff can read the
    signal ∂J/∂x at every nested layer's input). The shapes of the input and the
    output are kept, by path, for :func:`call_backward`'s check of ``dx``.
    """
    with at_path(where):
        _run(layer, "check", params, state, x, ctx)
        if _TAPS:
            x = _TAPS[-1].enter(layer, current_path(), params, x)
        out = _returned(layer, "forward", _run(layer, "forward", params, state, x, ctx))
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), x)
        _SEEN[current_path()] = (abstract, _shapes(out[0]))
        return out


def call_backward(layer: Layer, where: str, params, residuals, dy):
    """``layer.backward`` at the nested path ``where``, its results checked; a tap records ``dx``.

    ``dparams`` must have the structure and shapes of ``params``, ``dx`` those of
    the input of the forward traced at ``where`` (when its output had ``dy``'s
    shapes; ``None`` for an integer input, such as ids), so that a wrong shape
    is named here rather than by XLA in the layer below.
    """
    with at_path(where):
        dparams, dx = _returned(layer, "backward",
                                _run(layer, "backward", params, residuals, dy))
        _check_dparams(layer, params, dparams)
        seen = _SEEN.get(current_path())
        if seen is not None and _shapes(dy) == seen[1]:  # (else its forward ran elsewhere)
            _check_dx(layer, dx, seen[0])
        if _TAPS:
            _TAPS[-1].leave(layer, current_path(), dx)
    return dparams, dx


def _check_dparams(layer: Layer, params, dparams) -> None:
    """A ValueError unless ``dparams`` has the structure and, leaf by leaf, shapes of ``params``.

    Under a tap only the structure: gradcheck reports a parameter gradient of
    the wrong shape as a failing row of its table.
    """
    want, got = jax.tree.structure(params), jax.tree.structure(dparams)
    if got != want:
        raise ValueError(f"{layer.name}.backward returned dparams of structure {got}; params "
                         f"have {want}")
    if _TAPS:
        return
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(dparams)[0],
                            jax.tree.leaves(params)):
        if np.shape(g) != np.shape(p):
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{layer.name}.backward returned dparams{name} of shape "
                             f"{np.shape(g)}; params{name} has shape {np.shape(p)}")


def _check_dx(layer: Layer, dx, x) -> None:
    """A ValueError unless ``dx`` has the structure and shapes of the (abstract) input ``x``.

    ``None`` stands for the gradient of a leaf that is not floating-point (ids have none).
    """
    leaves, got = jax.tree_util.tree_flatten_with_path(dx, is_leaf=lambda v: v is None)
    if got != jax.tree.structure(x):
        raise ValueError(f"{layer.name}.backward returned dx of structure {got}; the input has "
                         f"{jax.tree.structure(x)}")
    for (path, d), a in zip(leaves, jax.tree.leaves(x)):
        name = jax.tree_util.keystr(path)
        if d is None and jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{layer.name}.backward returned dx{name} None; the input{name} "
                             f"has shape {a.shape} and is floating-point")
        if d is not None and np.shape(d) != a.shape:
            raise ValueError(f"{layer.name}.backward returned dx{name} of shape {np.shape(d)}; "
                             f"the input{name} has shape {a.shape}")


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
