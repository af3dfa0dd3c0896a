"""Check any hand-written backward, of a function or of a ``jax.custom_vjp`` rule, in one call.

``check_vjp(f, backward, *args)`` compares ``backward(dy, *args)`` with
``jax.vjp(f, *args)``; ``check_custom_vjp(fn, *args)`` compares the rule of a
``jax.custom_vjp`` function with autodiff of its primal ``fn.fun``. Both also
compare with central finite differences of the scalar

  J(args) = Σ dy ⊙ f(*args),   whose gradient ∂J/∂args is the VJP of ``dy``,

and return a :class:`~jaxbp.gradcheck_report.GradReport` with one row per
floating-point leaf of the arguments. Precision, tolerances, finite-difference
coordinates and kinks are those of :func:`jaxbp.gradcheck` (float64 by default,
with ``jax_enable_x64`` enabled for the check only).

Rows are named by ``f``'s parameter names and the pytree path inside the
argument: ``x``, ``params['W']``, ``layers[0]['b']``. Arguments beyond ``f``'s
named positional parameters (a ``*args``), or all of them where ``f`` has no
signature, are named by position: ``args[2]``, ``args[1]['W']``. Integer and
boolean leaves have no gradient and no row; their cotangent is not looked at
(``None`` is fine).

Example (y = tanh(x W): dz = dy ⊙ (1 − y²), dx = dz Wᵀ, dW = xᵀ dz):
  >>> import jax.numpy as jnp, numpy as np
  >>> from jaxbp import check_vjp
  >>> def f(x, W):
  ...     return jnp.tanh(x @ W)
  >>> def f_backward(dy, x, W):
  ...     dz = dy * (1 - f(x, W) ** 2)
  ...     return dz @ W.T, x.T @ dz
  >>> rng = np.random.default_rng(0)
  >>> report = check_vjp(f, f_backward, rng.normal(size=(4, 3)), rng.normal(size=(3, 2)))
  >>> report.ok, [r.path for r in report.rows]
  (True, ['x', 'W'])
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from .gradcheck import (
    TOLERANCES,
    _cast,
    _fd_index,
    _global_atol,
    _leaf_rows,
    _notes,
    _precision,
    finite_differences,
)
from .gradcheck_report import GradReport
from .layers.base import check_int, count_non_finite, dtype_name

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def check_vjp(
    f, backward, *args, dy=None, dtype="float64", seed: int = 0, fd_max_coords: int = 32
) -> GradReport:
    """Check ``backward(dy, *args)`` against ``jax.vjp(f, *args)`` and finite differences.

    For every floating-point leaf θ of the arguments the row compares
    ``backward``'s cotangent with autodiff's ∂J/∂θ, ``J = Σ dy ⊙ f(*args)``
    (``max|manual − autodiff| ≤ rtol·max|autodiff| + 100·ε·G``), and with central
    finite differences of J at up to ``fd_max_coords`` coordinates.
    Every cotangent's structure and shapes are checked before any comparison.

    Args:
      f: a pure function of pytrees of arrays returning an array or a pytree of
        floating-point arrays; ``jax.jit`` must be able to trace it.
      backward: ``backward(dy, *args)`` returns one cotangent per argument, a tuple
        as long as ``args``, each with its argument's pytree structure and shapes
        (anything, ``None`` included, for an integer argument or leaf).
      *args: the point at which to check; floating leaves are cast to ``dtype``.
      dy: the output cotangent, with the structure and shapes of ``f``'s output;
        by default standard normal, drawn from ``jax.random.key(seed)``.
      dtype: "float64" (default) or "float32" (warns: finite differences are
        unreliable there), as for :func:`jaxbp.gradcheck`.
      seed: seeds ``dy`` and the choice of finite-difference coordinates.
      fd_max_coords: finite differences check every coordinate of leaves this
        small and this many seeded random coordinates of larger ones; 0: none.

    Returns:
      A :class:`GradReport`: ``report.ok``, ``print(report)``, ``report.row("x")``.

    Example (y = x ⊙ x, so dx = 2 x ⊙ dy; the planted bug drops the 2):
      >>> import numpy as np
      >>> from jaxbp import check_vjp
      >>> x = np.array([1.0, -2.0, 0.5])
      >>> check_vjp(lambda x: x * x, lambda dy, x: (2 * x * dy,), x).ok
      True
      >>> check_vjp(lambda x: x * x, lambda dy, x: (x * dy,), x).row("x").status
      'FAIL'
    """
    dtype, seed = _options("check_vjp", f, args, dtype, seed, fd_max_coords)
    if not callable(backward):
        raise ValueError(f"check_vjp: backward must be a function backward(dy, *args); got "
                         f"{type(backward).__name__}")
    notes = _notes(TOLERANCES[dtype], dtype, fd_max_coords, seed)

    def manual(cotangent, *primals):
        try:
            return backward(cotangent, *primals)
        except Exception as e:
            raise ValueError(f"check_vjp: backward raised {type(e).__name__}: {e}") from e

    title = f"check_vjp: f={_name(f)} backward={_name(backward)}"
    return _check("check_vjp", title, f, (manual, "backward"), args, _arg_names(f, len(args)),
                  dy, dtype, seed, fd_max_coords, notes)


def check_custom_vjp(
    fn, *args, dy=None, dtype="float64", seed: int = 0, fd_max_coords: int = 32
) -> GradReport:
    """Check a ``jax.custom_vjp`` rule against autodiff of its primal ``fn.fun``.

    The manual column is ``jax.vjp(fn, *args)`` (which runs the custom rule), the
    autodiff column ``jax.vjp(fn.fun, *args)``; finite differences are of the
    primal, as in :func:`check_vjp`. Arguments named in ``fn.nondiff_argnums``
    are held fixed and get no row (they may be any Python objects).

    Args:
      fn: a function decorated with ``jax.custom_vjp`` whose rule is defined
        (``fn.defvjp(fwd, bwd)``).
      *args, dy, dtype, seed, fd_max_coords: as for :func:`check_vjp`.

    Returns:
      A :class:`GradReport`, one row per floating leaf of the differentiated arguments.

    Example (the rule of y = sin x is dx = cos x ⊙ dy):
      >>> import jax, jax.numpy as jnp
      >>> from jaxbp import check_custom_vjp
      >>> @jax.custom_vjp
      ... def sin(x):
      ...     return jnp.sin(x)
      >>> sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, dy: (jnp.cos(x) * dy,))
      >>> check_custom_vjp(sin, jnp.linspace(-1.0, 1.0, 5)).ok
      True
    """
    if not isinstance(fn, jax.custom_vjp):
        raise ValueError(f"check_custom_vjp: fn must be a jax.custom_vjp function; got "
                         f"{_name(fn)} ({type(fn).__name__}); for a function and a "
                         "hand-written backward use jaxbp.check_vjp(f, backward, *args)")
    if fn.fwd is None or fn.bwd is None:
        raise ValueError(f"check_custom_vjp: {_name(fn)} has no rule to check; define it with "
                         f"{_name(fn)}.defvjp(fwd, bwd)")
    dtype, seed = _options("check_custom_vjp", fn, args, dtype, seed, fd_max_coords)
    notes = _notes(TOLERANCES[dtype], dtype, fd_max_coords, seed)
    names = _arg_names(fn.fun, len(args))
    fixed = sorted(i for i in fn.nondiff_argnums if i < len(args))
    free = [i for i in range(len(args)) if i not in fixed]
    if fixed:
        notes.append(f"nondiff_argnums: {', '.join(names[i] for i in fixed)} held fixed (no rows)")

    def bind(g):
        """``g`` as a function of the differentiated arguments only."""

        def bound(*diff):
            full = list(args)
            for i, value in zip(free, diff, strict=True):
                full[i] = value
            return g(*full)

        return bound

    def manual(cotangent, *primals):
        try:
            return jax.vjp(bind(fn), *primals)[1](cotangent)
        except Exception as e:
            raise ValueError(f"check_custom_vjp: the custom_vjp rule of {_name(fn)} raised "
                             f"{type(e).__name__}: {e}") from e

    title = f"check_custom_vjp: fn={_name(fn)} (its custom_vjp rule vs autodiff of fn.fun)"
    return _check("check_custom_vjp", title, bind(fn.fun), (manual, "the custom_vjp rule"),
                  [args[i] for i in free], [names[i] for i in free], dy, dtype, seed,
                  fd_max_coords, notes)


# ----------------------------------------------------------------------------- helpers
def _options(where, f, args, dtype, seed, fd_max_coords):
    """The checked dtype's name and the seed as an int, after checking every option."""
    if not callable(f):
        raise ValueError(f"{where}: f must be a function; got {type(f).__name__}")
    if not args:
        raise ValueError(f"{where}: give the arguments to check at after the function(s), "
                         "e.g. check_vjp(f, backward, x, W); got none")
    check_int(where, "fd_max_coords", fd_max_coords, 0)
    check_int(where, "seed", seed, 0)
    return dtype_name(where, dtype, TOLERANCES), int(seed)


def _name(f) -> str:
    """``f.__name__``; ``partial(g)`` for a ``functools.partial`` of ``g``; else ``repr(f)``."""
    if isinstance(f, functools.partial):
        return f"partial({_name(f.func)})"
    return getattr(f, "__name__", None) or repr(f)


def _arg_names(f, n: int) -> list[str]:
    """``f``'s positional parameter names for its first ``n`` arguments, else ``args[i]``."""
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # a builtin or other object without a signature
        params = ()
    named = [p.name for p in params if p.kind in _POSITIONAL]
    return [named[i] if i < len(named) else f"args[{i}]" for i in range(n)]


def _floating(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating)


def _check_args(where, args, names) -> None:
    """Every leaf a real (float, int or bool) array or number; floats finite."""
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tuple(args))[0]:
        path = names[kp[0].idx] + jax.tree_util.keystr(kp[1:])
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if not any(jnp.issubdtype(dtype, k) for k in (jnp.floating, jnp.integer, jnp.bool_)):
            raise ValueError(f"{where}: argument {path} must be an array of real numbers "
                             f"(float, int or bool); got {type(leaf).__name__} of dtype {dtype} "
                             "(close over other values with functools.partial)")
        bad = count_non_finite(np.asarray(leaf)) if jnp.issubdtype(dtype, jnp.floating) else 0
        if bad:
            raise ValueError(f"{where}: argument {path} has {bad} non-finite value(s) (NaN or "
                             "±inf); gradients are compared at finite inputs only")


def _output(where, out):
    """``out`` itself, after checking (at trace time) that it is a pytree of float arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(out)[0]
    if not leaves:
        raise ValueError(f"{where}: f must return an array or a pytree of floating-point arrays; "
                         f"got {out!r}")
    for kp, leaf in leaves:
        array = isinstance(leaf, (jax.Array, np.ndarray, np.generic, float))
        if not (array and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)):
            what = f"dtype {leaf.dtype}" if hasattr(leaf, "dtype") else type(leaf).__name__
            raise ValueError(f"{where}: f must return an array or a pytree of floating-point "
                             f"arrays; its output out{jax.tree_util.keystr(kp)} is {what}")
    return out


def _output_cotangent(where, dy, out, seed: int, dtype: str):
    """``dy`` checked against ``out`` (shapes) and cast, or a standard normal one."""
    keyed, tree = jax.tree_util.tree_flatten_with_path(out)
    if dy is None:
        keys = jax.random.split(jax.random.key(seed), len(keyed))
        return tree.unflatten([jax.random.normal(k, o.shape, o.dtype)
                               for k, (_, o) in zip(keys, keyed, strict=True)])
    try:
        given = tree.flatten_up_to(dy)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: dy must have the structure of f's output {tree}; got "
                         f"{jax.tree.structure(dy)} ({e})") from None
    for (kp, o), d in zip(keyed, given, strict=True):
        if np.shape(d) != o.shape:
            path = jax.tree_util.keystr(kp)
            raise ValueError(f"{where}: dy{path} must have the shape of f's output out{path} "
                             f"{o.shape}; got {np.shape(d)}")
    return _cast(tree.unflatten(given), dtype)


def _cotangents(where, who, cotangents, args, names) -> list:
    """The cotangent of every floating leaf of ``args``, after checking structure and shapes."""
    if not isinstance(cotangents, (tuple, list)) or len(cotangents) != len(args):
        got = (f"{len(cotangents)}" if isinstance(cotangents, (tuple, list))
               else f"a {type(cotangents).__name__}")
        raise ValueError(f"{where}: {who} must return a tuple of {len(args)} cotangent(s), one "
                         f"per argument ({', '.join(names)}); got {got}")
    out = []
    for name, arg, cotangent in zip(names, args, cotangents, strict=True):
        keyed, tree = jax.tree_util.tree_flatten_with_path(arg)
        if not any(_floating(leaf) for _, leaf in keyed):
            continue  # an integer argument: no gradient
        try:
            given = tree.flatten_up_to(cotangent)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {who} returned a cotangent of structure "
                             f"{jax.tree.structure(cotangent)} for {name} of structure {tree} "
                             f"({e})") from None
        for (kp, leaf), c in zip(keyed, given, strict=True):
            if not _floating(leaf):
                continue
            path = name + jax.tree_util.keystr(kp)
            if c is None or not (hasattr(c, "dtype") or isinstance(c, (int, float))):
                raise ValueError(f"{where}: {who} returned {type(c).__name__} for {path} of "
                                 f"shape {leaf.shape}; only integer leaves may have no cotangent")
            if np.shape(c) != leaf.shape:
                raise ValueError(f"{where}: {who} returned a cotangent of shape {np.shape(c)} "
                                 f"for {path} of shape {leaf.shape}")
            out.append(c)
    return out


def _dot(dy, out):
    """``Σ dy ⊙ out`` over every leaf."""
    return sum(jnp.sum(d * o) for d, o in zip(jax.tree.leaves(dy), jax.tree.leaves(out),
                                              strict=True))


def _check(where, title, f, rule, args, names, dy, dtype, seed, fd_max_coords, notes):
    """The report comparing ``rule = (manual(dy, *args), its name)`` with ``jax.vjp(f)``."""
    manual, who = rule
    _check_args(where, args, names)
    drawn = "given" if dy is not None else f"standard normal from jax.random.key({seed})"
    notes = [f"J = sum(dy * f(args)), dy {drawn}", *notes]
    tol = TOLERANCES[dtype]
    with _precision(dtype) as precision:
        args = _cast(tuple(args), dtype)
        keyed, tree = jax.tree_util.tree_flatten_with_path(args)
        leaves = [leaf for _, leaf in keyed]
        free = [n for n, leaf in enumerate(leaves) if _floating(leaf)]
        if not free:
            raise ValueError(f"{where}: no argument of f has floating-point leaves; integer "
                             "arguments have no gradient to check")

        def primal(theta):  # f of the floating leaves, the integer ones held fixed
            full = list(leaves)
            for n, value in zip(free, theta, strict=True):
                full[n] = value
            return f(*tree.unflatten(full))

        theta = [leaves[n] for n in free]
        dy = _output_cotangent(where, dy, jax.eval_shape(lambda t: _output(where, primal(t)),
                                                         theta), seed, dtype)
        m_leaves = jax.device_get(_cotangents(where, who, manual(dy, *args), args, names))

        @jax.jit
        def value_and_vjp(t, d):
            out, pullback = jax.vjp(primal, t)
            return _dot(d, out), pullback(d)[0]

        value = jax.jit(lambda t, d: _dot(d, primal(t)))
        gradient = jax.jit(jax.grad(lambda t, d: _dot(d, primal(t))))
        J, auto = jax.device_get(value_and_vjp(theta, dy))
        index = _fd_index(theta, fd_max_coords, seed)
        fd = finite_differences(lambda t: value(t, dy), theta, index, tol.fd_step)
        paths = [names[keyed[n][0][0].idx] + jax.tree_util.keystr(keyed[n][0][1:]) for n in free]
        rows = _leaf_rows(paths, m_leaves, auto, theta, index, fd, float(J), tol,
                          _global_atol(tol, auto), lambda t: gradient(t, dy))
    skipped = [names[kp[0].idx] + jax.tree_util.keystr(kp[1:])
               for n, (kp, _) in enumerate(keyed) if n not in free]
    if skipped:
        notes.append(f"integer leaves, no gradient and no row: {', '.join(skipped)}")
    return GradReport(
        title=title,
        dtype=dtype,
        precision=precision,
        loss=float(J),
        params=tuple(c.row for c in rows),
        signals=(),
        first_divergence=who if any(c.disagrees for c in rows) else None,
        notes=tuple(notes),
    )
