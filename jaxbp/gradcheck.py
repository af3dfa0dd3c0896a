"""Gradient checks that say where a hand-written backward is wrong.

``gradcheck(net, params, x, y)`` compares ``net.manual_backward`` with
``jax.grad(net.loss)`` and with central finite differences, per parameter leaf,
and compares every backpropagated signal ∂J/∂(input of layer i) with autodiff's
to name the first layer, counting from the output, whose backward disagrees.
``check_layer(layer, input_shape)`` does the same for one layer against
``jax.vjp``. Both return a :class:`~jaxbp.gradcheck_report.GradReport`.

Precision: the check runs in float64 by default, enabling ``jax_enable_x64``
only inside the call (``jax.enable_x64``) and restoring the previous setting.
Inputs are cast to the checked dtype. Matrix products run at
``jax.default_matmul_precision("highest")`` inside the check, so TF32 on GPUs
cannot blur float32 comparisons.

Tolerances (per row; ``scale = max|autodiff|`` of the row, ``G`` the largest
``|autodiff|`` entry of the table, ε the dtype's machine epsilon):

  manual vs autodiff   max|manual − autodiff| ≤ rtol·scale + 100·ε·G
                       rtol = 1e-10 (float64), 1e-4 (float32)
  finite differences   ∂J/∂θ_i ≈ (J(θ + h e_i) − J(θ − h e_i)) / (2h), h = ε^(1/3)
                       (6.1e-6 float64, 4.9e-3 float32); it must match autodiff within
                       fd_rtol·scale + 100·ε·(|J| + 1)/h, fd_rtol = 1e-6 (float64), 1e-2
                       (float32). Leaves with at most ``fd_max_coords`` entries are
                       checked at every coordinate; larger ones at ``fd_max_coords``
                       distinct coordinates drawn by ``numpy.random.default_rng([seed,
                       leaf number])`` (reproducible).

Kinks: where finite differences disagree but manual = autodiff, the autodiff
derivative is evaluated at θ ± h e_i. If those one-sided derivatives differ and
bracket the finite difference, the step crossed a kink (ReLU at 0, a max-pool
tie, a hinge at its margin) and the row says "kink" instead of failing. In
float32, unexplained finite-difference disagreements are reported as
"fd-noisy" and do not fail the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .gradcheck_report import GradReport, Row
from .layers.base import (
    Context,
    Layer,
    call,
    call_backward,
    check_int,
    check_real,
    count_non_finite,
    dtype_name,
    is_int,
    tapping,
)
from .layers.combinators import Sequential
from .network import Model

_CHECKED = ""  # check_layer's path: a layer on its own (its children's paths start at it)

_KINK_PROBES = 8  # mismatching coordinates examined per leaf for a kink


@dataclasses.dataclass(frozen=True)
class _Tolerances:
    rtol: float  # manual vs autodiff, relative to max|autodiff| of the row
    fd_rtol: float  # finite differences vs autodiff, same scale
    eps: float  # machine epsilon
    fd_can_fail: bool  # False: unexplained finite-difference gaps are only "fd-noisy"

    @property
    def fd_step(self) -> float:
        return float(np.cbrt(self.eps))


TOLERANCES = {
    "float64": _Tolerances(1e-10, 1e-6, float(np.finfo(np.float64).eps), fd_can_fail=True),
    "float32": _Tolerances(1e-4, 1e-2, float(np.finfo(np.float32).eps), fd_can_fail=False),
}

FLOAT32_WARNING = (
    "float32 check: finite differences are unreliable in float32 (rounding noise ~ε/h); "
    "their disagreements are reported as fd-noisy, not failures. Prefer the float64 default."
)


def _check_batch(fn: str, x) -> None:
    if np.ndim(x) == 0 or np.shape(x)[0] < 1:
        raise ValueError(
            f"{fn}: x must have a leading batch axis with at least 1 sample; got shape "
            f"{np.shape(x)}"
        )
    bad = count_non_finite(x)
    if bad:  # they would make every gradient NaN and the check blame the loss
        raise ValueError(f"{fn}: x has {bad} non-finite value(s) (NaN or ±inf) among its "
                         f"{np.size(x)}; gradients are compared at finite inputs only")


@contextlib.contextmanager
def _precision(dtype: str):
    """Enable (float64) or disable (float32) x64 for the check only; yield a description.

    Matmuls and convolutions run at "highest" precision inside the check: on GPUs and
    TPUs the default may use TF32 or bfloat16 passes for float32, whose rounding
    (about 1e-3 relative) would swamp the differences the check looks for.
    """
    before = bool(jax.config.jax_enable_x64)
    want = dtype == "float64"
    if want == before:
        line = f"{dtype} (jax_enable_x64 is {'on' if before else 'off'}; unchanged)"
    else:
        state = "enabled" if want else "disabled"
        line = f"{dtype} (jax_enable_x64 {state} for this check only; previous setting restored)"
    with jax.enable_x64(want), jax.default_matmul_precision("highest"):
        yield line


def _cast(tree, dtype: str):
    """Floating leaves to ``dtype``; integer leaves to the current default int width."""

    def cast(a):
        a = np.asarray(a)
        return jnp.asarray(a, dtype) if np.issubdtype(a.dtype, np.floating) else jnp.asarray(a)

    return jax.tree.map(cast, tree)


def fd_coordinates(sizes, max_coords: int, seed: int) -> list[np.ndarray]:
    """Per leaf, the flat indices finite differences check.

    Every index of a leaf with at most ``max_coords`` entries; otherwise
    ``max_coords`` distinct indices drawn by ``numpy.random.default_rng([seed, leaf])``,
    sorted. ``max_coords=0`` checks nothing.
    """
    out = []
    for leaf, size in enumerate(sizes):
        if size <= max_coords:
            out.append(np.arange(size))
        else:
            rng = np.random.default_rng([seed, leaf])
            out.append(np.sort(rng.choice(size, max_coords, replace=False)))
    return out


def finite_differences(J, theta, index, step: float) -> list[np.ndarray]:
    """Central differences of a scalar ``J(θ)`` at the flat coordinates ``index[leaf]``.

    ``(J(θ + h e_i) − J(θ − h e_i)) / ((θ_i + h) − (θ_i − h))``, the denominator being
    the step floating point actually took (``θ_i ± h`` rounded to the leaf's dtype).
    Where that step is zero (``h`` below the dtype's resolution at ``θ_i``) the
    entry is NaN. Returns one array per leaf, ``len(index[leaf])`` long. ``J``
    should be jitted: its 2k calls then share one compiled program (and
    ``net.loss`` is usually compiled already).

    Example (``J = Σ θ²``, so ∂J/∂θ_i = 2θ_i):
      >>> import numpy as np
      >>> theta = {"w": np.array([1.0, -2.0, 3.0])}
      >>> fd = finite_differences(lambda t: np.sum(t["w"] ** 2), theta, [[0, 2]], 1e-4)
      >>> np.round(fd[0], 6).tolist()
      [2.0, 6.0]
    """
    leaves, treedef = jax.tree.flatten(theta)
    check_real("finite_differences", "step", step, 0, strict=True)
    if len(index) != len(leaves):
        raise ValueError(f"finite_differences: index must list the coordinates of each of "
                         f"theta's {len(leaves)} leaves; got {len(index)} lists")
    for n, idx in enumerate(index):
        size = np.size(leaves[n])
        if len(idx) and not (0 <= np.min(idx) and np.max(idx) < size):
            raise ValueError(f"finite_differences: index[{n}] must hold flat indices in "
                             f"[0, {size}) for leaf {n} of shape {np.shape(leaves[n])}; got "
                             f"values in [{np.min(idx)}, {np.max(idx)}]")
    host = [np.asarray(v) for v in leaves]
    out = []
    for n, idx in enumerate(index):
        base, values = host[n], np.empty(len(idx))
        for j, i in enumerate(idx):
            hi, lo = base.copy(), base.copy()
            hi.flat[i] += step  # in the leaf's dtype
            lo.flat[i] -= step
            J_hi = float(J(treedef.unflatten([*leaves[:n], hi, *leaves[n + 1 :]])))
            J_lo = float(J(treedef.unflatten([*leaves[:n], lo, *leaves[n + 1 :]])))
            taken = float(hi.flat[i] - lo.flat[i])
            values[j] = (J_hi - J_lo) / taken if taken else np.nan
        out.append(values)
    return out


# ----------------------------------------------------------------------------- network
class _Tap:
    """Sees every nested layer call at trace time (``jaxbp.layers.base.tapping``).

    Records each layer's input and, in backward order, the ``dx`` its backward
    returns; adds ``perturb[path]`` to a layer's input, so that the gradient with
    respect to a zero perturbation is autodiff's signal ∂J/∂(that input).
    """

    def __init__(self, perturb=None):
        self.perturb = perturb or {}
        self.layers, self.inputs, self.signals = {}, {}, {}

    def enter(self, layer, path, params, x):
        self.layers[path], self.inputs[path] = layer, x
        return jax.tree.map(jnp.add, x, self.perturb[path]) if path in self.perturb else x

    def leave(self, layer, path, dx):
        self.signals[path] = dx


def _floating(x) -> bool:
    return all(jnp.issubdtype(v.dtype, jnp.floating) for v in jax.tree.leaves(x))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _network_compute(net, train, params, state, x, y, key):
    ctx = Context(train, key)
    with tapping(_Tap()) as tap:
        _, manual, _, _ = net._manual(params, state, x, y, ctx, None)
    J, auto = jax.value_and_grad(lambda p: net._objective(p, state, x, y, ctx)[0])(params)
    y_hat = net._run(params, state, x, ctx)[0]
    paths = [p for p, v in tap.inputs.items() if _floating(v)]

    def data_loss(perturb):
        """The data loss with a perturbation added to each nested layer's input and to ŷ."""
        with tapping(_Tap(perturb)):
            out = net._run(params, state, x, ctx)[0]
        return net.loss_fn.value(out + perturb["loss"], y)

    zeros = {p: jax.tree.map(jnp.zeros_like, tap.inputs[p]) for p in paths}
    auto_signals = jax.grad(data_loss)({**zeros, "loss": jnp.zeros_like(y_hat)})
    manual_signals = {p: tap.signals[p] for p in tap.signals if p in zeros}
    manual_signals["loss"] = net.loss_fn.value_and_grad(y_hat, y)[1]
    return J, manual, manual_signals, auto, auto_signals


def _network_order(net, train, params, state, x, y, key):
    """The nested paths in backward order, with each path's layer (one abstract trace)."""
    with tapping(_Tap()) as tap:
        jax.eval_shape(lambda p, s, a, t, k: net._manual(p, s, a, t, Context(train, k), None),
                       params, state, x, y, key)
    return list(tap.signals), tap.layers


@functools.partial(jax.jit, static_argnums=(0, 1))
def _network_loss(net, train, params, state, x, y, key):
    return net._objective(params, state, x, y, Context(train, key))[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _network_autodiff(net, train, params, state, x, y, key):
    return jax.grad(lambda p: net._objective(p, state, x, y, Context(train, key))[0])(params)


# ------------------------------------------------------------------------------- layer
def _layer_J(layer, ctx, state, theta, dy):
    params, x = theta
    return jnp.sum(dy * layer.forward(params, state, x, ctx)[0])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layer_compute(layer, train, params, state, x, dy, key):
    ctx = Context(train, key)
    _, _, residuals = call(layer, _CHECKED, params, state, x, ctx)
    manual = call_backward(layer, _CHECKED, params, residuals, dy)  # (its results checked)
    _, pullback = jax.vjp(lambda p, a: layer.forward(p, state, a, ctx)[0], params, x)
    return _layer_J(layer, ctx, state, (params, x), dy), manual, pullback(dy)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layer_value(layer, train, state, theta, dy, key):
    return _layer_J(layer, Context(train, key), state, theta, dy)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layer_autodiff(layer, train, state, theta, dy, key):
    return jax.grad(lambda t: _layer_J(layer, Context(train, key), state, t, dy))(theta)


# ------------------------------------------------------------------------- comparison
def _path(keypath, prefix: str) -> str:
    out = prefix
    for k in keypath:
        if isinstance(k, jax.tree_util.SequenceKey):
            out += f"[{k.idx}]"
        elif isinstance(k, jax.tree_util.DictKey):
            out += f".{k.key}" if out else str(k.key)
        else:
            out += jax.tree_util.keystr((k,))
    return out


def _cosine(m, a) -> float:
    nm, na = np.linalg.norm(m), np.linalg.norm(a)
    if nm == 0 and na == 0:
        return 1.0
    if nm == 0 or na == 0:
        return 0.0
    return float(np.clip(np.vdot(m, a) / (nm * na), -1.0, 1.0))


@dataclasses.dataclass
class _Compared:
    """Everything a row needs; ``disagrees`` is manual ≠ autodiff (what blame uses)."""

    row: Row
    disagrees: bool


def _fd_verdict(a, disagrees, fd, tol):
    """``(status, detail)`` from the finite differences, or None when they change nothing."""
    index, values, fd_tol, explain = fd
    gap = np.abs(a.ravel()[index] - values)  # autodiff is the exact derivative of the forward
    off = gap > fd_tol
    if disagrees or not off.any():
        return None
    probes = zip(index[off][:_KINK_PROBES], values[off][:_KINK_PROBES], strict=True)
    if all(explain(i, v, fd_tol) for i, v in probes):
        return "kink", (
            f"finite differences cross a kink at {int(off.sum())} coordinate(s) "
            "(the one-sided autodiff derivatives differ); manual = autodiff"
        )
    if not tol.fd_can_fail:
        gap_text = f"finite differences disagree with autodiff by {gap.max():.2e}"
        return "fd-noisy", f"{gap_text} (float32: unreliable)"
    return "FAIL", (
        f"manual = autodiff, but both disagree with finite differences by {gap.max():.2e}: "
        "is the forward pass differentiable as written?"
    )


def _compare(path, manual, auto, tol, atol, fd=None) -> _Compared:
    """One row. ``fd`` is ``(index, values, fd_tol, explain)`` or None."""
    m, a = np.asarray(manual, np.float64), np.asarray(auto, np.float64)
    shape = tuple(int(s) for s in a.shape)
    norms = {"manual_norm": float(np.linalg.norm(m)), "autodiff_norm": float(np.linalg.norm(a))}
    if m.shape != a.shape:
        detail = f"manual gradient has shape {m.shape}, expected {shape}"
        inf = float("inf")
        row = Row(path, shape, **norms, max_abs_err=inf, rel_err=inf, cosine=0.0, fd_coords=0,
                  fd_rel_err=None, status="FAIL", detail=detail)  # fmt: skip
        return _Compared(row, True)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    denom = max(scale, np.finfo(np.float64).tiny)
    err = float(np.max(np.abs(m - a))) if a.size else 0.0
    finite = bool(np.all(np.isfinite(m)) and np.all(np.isfinite(a)))
    disagrees = not (finite and err <= tol.rtol * scale + atol)
    status, detail = ("FAIL", f"manual ≠ autodiff (rel err {err / denom:.2e})") if disagrees else (
        "ok", "")  # fmt: skip
    fd_coords, fd_rel = 0, None
    if fd is not None:  # a NaN difference (θ ± h rounded to θ) checks nothing: left out
        usable = np.isfinite(fd[1])
        fd = (fd[0][usable], fd[1][usable], *fd[2:])
    if fd is not None and fd[0].size:
        index, values = fd[0], fd[1]
        fd_coords = int(index.size)
        fd_rel = float(np.max(np.abs(m.ravel()[index] - values)) / denom)
        verdict = _fd_verdict(a, disagrees, fd, tol)
        if verdict:
            status, detail = verdict
        elif disagrees and np.all(np.abs(a.ravel()[index] - values) <= fd[2]):
            detail += "; finite differences side with autodiff"
    row = Row(path, shape, **norms, max_abs_err=err, rel_err=err / denom,
              cosine=_cosine(m.ravel(), a.ravel()), fd_coords=fd_coords, fd_rel_err=fd_rel,
              status=status, detail=detail)  # fmt: skip
    return _Compared(row, disagrees)


def _kink_explainer(grad_at, theta, leaf: int, tol):
    """``explain(i, fd_value, fd_tol)``: does a kink within ±h of coordinate i explain fd?"""
    leaves, treedef = jax.tree.flatten(theta)
    h = tol.fd_step

    def explain(i, fd_value, fd_tol) -> bool:
        one_sided = []
        for s in (1.0, -1.0):
            flat = np.array(leaves[leaf]).reshape(-1)  # a copy
            flat[i] += s * h
            shifted = jnp.asarray(flat.reshape(np.shape(leaves[leaf])))
            moved = treedef.unflatten([*leaves[:leaf], shifted, *leaves[leaf + 1 :]])
            g = jax.tree.leaves(grad_at(moved))[leaf]
            one_sided.append(float(np.asarray(g).ravel()[i]))
        lo, hi = min(one_sided), max(one_sided)
        return hi - lo > fd_tol and lo - fd_tol <= fd_value <= hi + fd_tol

    return explain


def _leaf_rows(paths, manual, auto, theta, index, fd_values, J, tol, atol, grad_at):
    """Rows for the leaves of ``theta`` (finite differences split back per leaf)."""
    fd_tol_abs = 100 * tol.eps * (abs(J) + 1) / tol.fd_step
    rows = []
    for leaf, (path, m, a) in enumerate(zip(paths, manual, auto, strict=True)):
        vals = fd_values[leaf]
        scale = float(np.max(np.abs(np.asarray(a)))) if np.size(a) else 0.0
        fd_tol = tol.fd_rtol * scale + fd_tol_abs
        explain = _kink_explainer(grad_at, theta, leaf, tol)
        rows.append(_compare(path, m, a, tol, atol, (index[leaf], vals, fd_tol, explain)))
    return rows


def _global_atol(tol, autos) -> float:
    g = max((float(np.max(np.abs(np.asarray(a)))) for a in autos if np.size(a)), default=0.0)
    return 100 * tol.eps * g


def _fd_index(theta, fd_max_coords: int, seed: int):
    return fd_coordinates([np.size(v) for v in jax.tree.leaves(theta)], fd_max_coords, seed)


def _notes(tol, dtype, fd_max_coords, seed):
    notes = [
        f"tolerance: max|manual - autodiff| <= {tol.rtol:g}*max|autodiff| + 100*eps*G per row "
        "(G: the largest |autodiff| entry of the table)",
        f"finite differences: central, h = {tol.fd_step:.2g}; every coordinate of leaves with "
        f"<= {fd_max_coords} entries, else {fd_max_coords} drawn with seed {seed}",
    ]
    if dtype == "float32":
        warnings.warn(FLOAT32_WARNING, UserWarning, stacklevel=3)
        notes.append(FLOAT32_WARNING)
    return notes


def gradcheck(
    net, params, x, y, *, state=None, key=None, train=False, dtype="float64",
    fd_max_coords: int = 32, seed: int = 0
) -> GradReport:
    """Check ``net.manual_backward`` against ``jax.grad(net.loss)`` and finite differences.

    Args:
      net: a model, ``jaxbp.Sequential(layers, loss=...)``.
      params: its parameter pytree (one entry per layer, nested for nested blocks).
      x: inputs (batch, ...); y: targets or integer labels.
      state, key, train: as every call of the model takes them (BatchNorm's state,
        Dropout's key; ``train=True`` checks the training-mode function, with
        batch statistics and the masks ``key`` draws).
      dtype: "float64" (default; x64 is enabled for the check only) or "float32"
        (warns: finite differences are unreliable there).
      fd_max_coords: finite differences check every coordinate of leaves this small,
        and this many seeded random coordinates of larger leaves; 0 turns them off.
      seed: seeds the choice of finite-difference coordinates.

    Returns:
      A :class:`GradReport`: ``report.ok``, ``print(report)``, ``report.to_dict()``.
      Rows are named by nested layer paths (``layers[1].body.layers[0].W``);
      ``report.first_divergence`` names the first layer, counting from the output
      and descending into nested blocks, whose backward disagrees with autodiff.

    Example:
      >>> from jaxbp import gradcheck, models
      >>> report = gradcheck(*models.worked_example())
      >>> report.ok, report.row("layers[2].W").rel_err < 1e-12
      (True, True)
    """
    if not isinstance(net, Model):
        raise ValueError(
            "gradcheck checks a model (jaxbp.Sequential(layers, loss=...)); for one layer use "
            "jaxbp.check_layer(layer, input_shape), for a function and its backward "
            f"jaxbp.check_vjp(f, backward, *args); got {type(net).__name__}"
        )
    dtype = dtype_name("gradcheck", dtype, TOLERANCES)
    check_int("gradcheck", "fd_max_coords", fd_max_coords, 0)
    check_int("gradcheck", "seed", seed, 0)
    seed = int(seed)
    _check_batch("gradcheck", x)
    tol = TOLERANCES[dtype]
    notes = _notes(tol, dtype, fd_max_coords, seed)
    with _precision(dtype) as precision:
        params, x, y, state = _cast((list(params), x, y, state), dtype)
        net._check_mode(state, key, train)
        train = bool(train)
        # out-of-range labels: the loss's ValueError, not a FAIL
        net.validate_labels(params, x, y, state=state, key=key, train=train)
        data = (state, x, y, key)
        J, manual, m_sig, auto, a_sig = jax.device_get(
            _network_compute(net, train, params, *data))
        order, nested = _network_order(net, train, params, *data)
        J = float(J)
        index = _fd_index(params, fd_max_coords, seed)
        fd = finite_differences(lambda p: _network_loss(net, train, p, *data), params, index,
                                tol.fd_step)
        paths = jax.tree.leaves(net.body.param_paths(params, ""))
        manual_leaves = jax.tree.leaves(manual)
        if len(manual_leaves) != len(paths):
            raise ValueError(
                f"gradcheck: manual_backward returned {len(manual_leaves)} leaves "
                f"({jax.tree.structure(manual)}); params have {len(paths)} "
                f"({jax.tree.structure(params)})"
            )
        auto_leaves = jax.tree.leaves(auto)
        atol = _global_atol(tol, auto_leaves)

        def grad_at(p):
            return _network_autodiff(net, train, p, *data)

        param_rows = _leaf_rows(
            paths, manual_leaves, auto_leaves, params, index, fd, J, tol, atol, grad_at
        )
    order = ["loss"] + order  # from the output down
    sig_atol = _global_atol(tol, jax.tree.leaves(a_sig))
    signal_rows = {  # (none for an integer input, such as Embedding's ids)
        p: _compare("loss.dy_hat" if p == "loss" else f"{p}.dx", _leaf(m_sig[p]), _leaf(a_sig[p]),
                    tol, sig_atol)
        for p in order if p in a_sig
    }
    return GradReport(
        title=_describe(net),
        dtype=dtype,
        precision=precision,
        loss=J,
        params=tuple(c.row for c in param_rows),
        signals=tuple(signal_rows[p].row for p in order if p in signal_rows),
        first_divergence=_blame(net, nested, order, param_rows, signal_rows),
        notes=tuple(notes),
    )


def _leaf(signal):
    """A signal as one array (the leaves of a tuple input concatenated)."""
    leaves = jax.tree.leaves(signal)
    return leaves[0] if len(leaves) == 1 else np.concatenate([np.ravel(v) for v in leaves])


def _blame(net, nested, order, param_rows, signal_rows) -> str | None:
    """The first place, from the output down, where manual and autodiff disagree.

    ``order`` lists the nested layer paths in backward order (a block after the
    layers inside it); a layer is blamed for a wrong ``dx`` or a wrong gradient of
    its own params.
    """
    if signal_rows["loss"].disagrees:
        return f"loss ({net.loss_fn.name})"
    for path in order[1:]:
        mine = [c for c in param_rows if c.row.path.rsplit(".", 1)[0] == path]
        mine += [signal_rows[path]] if path in signal_rows else []
        if any(c.disagrees for c in mine):
            return f"{path} ({nested[path].name})"
    bad = [c.row.path for c in param_rows if c.disagrees]  # params of a layer never called
    return f"{bad[0].rsplit('.', 1)[0]}" if bad else None


def _short(layer) -> str:
    """``Dense(2)``, ``Sigmoid``: the layer's name and its first hyperparameter, on one line."""
    if isinstance(layer, Sequential):
        return f"Sequential[{' -> '.join(map(_short, layer.layers))}]"
    fields = dataclasses.fields(layer) if dataclasses.is_dataclass(layer) else ()
    if not fields:
        return layer.name
    first = getattr(layer, fields[0].name)
    return f"{layer.name}({_short(first) if isinstance(first, Layer) else repr(first)})"


def _one_line(layer) -> str:
    """``repr(layer)`` if it fits on a line, else its short form (a long block's repr wraps)."""
    text = repr(layer)
    return text if "\n" not in text else _short(layer)


def _describe(net) -> str:
    stack = " -> ".join(_short(layer) for layer in net.layers)
    decay = f", weight_decay={net.weight_decay:g}" if getattr(net, "weight_decay", 0) else ""
    return f"Sequential[{stack}] + {net.loss_fn!r}{decay}"


def check_layer(
    layer,
    input_shape,
    *,
    batch: int = 3,
    seed: int = 0,
    dtype="float64",
    params=None,
    state=None,
    x=None,
    dy=None,
    train: bool = False,
    key=None,
    fd_max_coords: int = 32,
) -> GradReport:
    """Check one layer's ``backward`` against ``jax.vjp`` of its ``forward``.

    The scalar checked by finite differences is ``J = Σ dy ⊙ forward(params, x)``,
    whose gradient is exactly the vector-Jacobian product ``backward`` computes.
    Rows: one per parameter (``W``, ``b``, ...) and ``dx``. ``train`` and ``key``
    make the context (train mode, Dropout's key); ``state`` defaults to the
    layer's initial state.

    Args:
      layer: a jaxbp layer.
      input_shape: the input shape without the batch axis.
      batch: batch size of the random input.
      seed: seeds params (``layer.init``), ``x`` and ``dy`` (standard normal) and
        the finite-difference coordinates.
      dtype, fd_max_coords: as for :func:`gradcheck`.
      params, state, x, dy: use these instead of random or initial ones.

    Example:
      >>> from jaxbp import check_layer, layers
      >>> check_layer(layers.Dense(3), (4,)).ok
      True
    """
    dtype = dtype_name("check_layer", dtype, TOLERANCES)
    check_int("check_layer", "fd_max_coords", fd_max_coords, 0)
    check_int("check_layer", "seed", seed, 0)
    seed = int(seed)
    check_int("check_layer", "batch", batch)
    if np.ndim(input_shape) != 1 or not all(is_int(s) and s >= 1 for s in input_shape):
        raise ValueError(
            "check_layer: input_shape must be a sequence of positive ints (batch axis excluded); "
            f"got {input_shape!r}"
        )
    input_shape = tuple(int(s) for s in input_shape)
    if x is not None:
        _check_batch("check_layer", x)
    tol = TOLERANCES[dtype]
    notes = _notes(tol, dtype, fd_max_coords, seed)
    with _precision(dtype) as precision:
        k_init, k_x, k_dy = jax.random.split(jax.random.key(seed), 3)
        first, initial, _ = layer.init(k_init, tuple(input_shape), jnp.dtype(dtype))
        params = first if params is None else params
        state = initial if state is None else state
        if x is None:
            x = jax.random.normal(k_x, (batch, *input_shape), jnp.dtype(dtype))
        params, state, x = _cast((params, state, x), dtype)
        train, ctx = bool(train), Context(bool(train), key)
        y = jax.eval_shape(lambda p, a: call(layer, _CHECKED, p, state, a, ctx)[0], params, x)
        if dy is None:
            dy = jax.random.normal(k_dy, y.shape, jnp.dtype(dtype))
        elif np.shape(dy) != y.shape:
            raise ValueError(f"check_layer: dy must have the shape of {layer.name}'s output "
                             f"{y.shape}; got {np.shape(dy)}")
        dy = _cast(dy, dtype)
        theta = (params, x)
        J, (m_params, m_dx), (a_params, a_dx) = jax.device_get(
            _layer_compute(layer, train, params, state, x, dy, key))
        index = _fd_index(theta, fd_max_coords, seed)
        fd = finite_differences(lambda t: _layer_value(layer, train, state, t, dy, key), theta,
                                index, tol.fd_step)
        keyed = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [_path(kp, "") for kp, _ in keyed] + ["dx"]
        manual_leaves = [*jax.tree.leaves(m_params), m_dx]
        if len(manual_leaves) != len(paths):
            raise ValueError(
                f"check_layer: {layer.name}.backward returned dparams "
                f"{jax.tree.structure(m_params)}; params are {jax.tree.structure(params)}"
            )
        auto_leaves = [*jax.tree.leaves(a_params), a_dx]

        def grad_at(t):
            return _layer_autodiff(layer, train, state, t, dy, key)

        rows = _leaf_rows(
            paths,
            manual_leaves,
            auto_leaves,
            theta,
            index,
            fd,
            float(J),
            tol,
            _global_atol(tol, auto_leaves),
            grad_at,
        )
    bad = any(c.disagrees for c in rows)
    return GradReport(
        title=f"{_one_line(layer)} on input {(np.shape(x))}",
        dtype=dtype,
        precision=precision,
        loss=float(J),
        params=tuple(c.row for c in rows[:-1]),
        signals=(rows[-1].row,),
        first_divergence=_one_line(layer) if bad else None,
        notes=tuple(notes),
    )
