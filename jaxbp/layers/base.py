"""The layer contract shared by every layer in jaxbp.

A layer is an immutable, hashable description (a frozen dataclass holding only
hyperparameters) with three pure functions:

    init(key, input_shape)          -> (params, output_shape)
    forward(params, x)              -> (y, residuals)
    backward(params, residuals, dy) -> (dparams, dx)

``input_shape`` and ``output_shape`` exclude the leading batch axis. ``params`` is
a dict of arrays (``{}`` for parameterless layers); ``dparams`` has exactly the
same keys and shapes. ``residuals`` is a NamedTuple naming what the forward pass
stores for the backward pass. ``dy`` is ∂L/∂y and has the shape of ``y``; ``dx``
is ∂L/∂x and has the shape of ``x``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


class Layer:
    """Base class: a frozen dataclass subclass implements init/forward/backward.

    ``decay_keys`` names the parameters that weight decay applies to (weight
    matrices and kernels, never biases).
    """

    decay_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def init(self, key, input_shape, dtype=None):
        """Parameterless default: no params, shape unchanged."""
        del key, dtype
        return {}, tuple(input_shape)

    def forward(self, params, x):
        raise NotImplementedError

    def backward(self, params, residuals, dy):
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
        )
        return f"{self.name}({fields})"


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


def check_params(layer: str, params, expected: dict) -> None:
    """Raise a ValueError unless ``params`` has exactly the keys and shapes of ``expected``.

    ``expected`` maps each key to ``(shape, layout)``; ``None`` in a shape matches
    any size, e.g. ``{"W": ((None, 4), "(in, units)"), "b": ((4,), "(units,)")}``.
    """
    if not isinstance(params, dict) or set(params) != set(expected):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        if not expected:
            raise ValueError(f"{layer}: params must be {{}} (the layer has no parameters); "
                             f"got {got}")
        raise ValueError(f"{layer}: params must have the keys {sorted(expected)}; got {got}")
    for name, (shape, layout) in expected.items():
        check_array(layer, f"params[{name!r}]", params[name])
        got = tuple(params[name].shape)
        if len(got) != len(shape) or any(e not in (None, g) for e, g in zip(shape, got)):
            want = str(tuple("*" if e is None else e for e in shape)).replace("'*'", "*")
            raise ValueError(
                f"{layer}: params[{name!r}] must have shape {layout} = {want}; got {got}"
            )


def check_parameterless(layer: str, params, x) -> None:
    """A parameterless layer's forward: ``params`` must be ``{}`` and ``x`` an array."""
    check_params(layer, params, {})
    check_array(layer, "input x", x)


def check_real(where: str, arg: str, value, minimum: float | None = None) -> float:
    """``value`` as a float; a ValueError unless it is a finite real number (≥ ``minimum``)."""
    if not is_real(value) or not math.isfinite(value) or (minimum is not None and value < minimum):
        expected = "a finite number" if minimum is None else f"a finite number >= {minimum}"
        raise ValueError(f"{where}: {arg} must be {expected}; got {value!r}")
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
