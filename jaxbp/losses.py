"""Losses with hand-written gradients.

A loss is a frozen dataclass with

    value(y_hat, y)          -> scalar L, averaged over every position
    value_and_grad(y_hat, y) -> (L, dy_hat)   with dy_hat = ∂L/∂y_hat, shape of y_hat

``y_hat`` is the network's output, (…, K) of rank >= 2: K outputs at each of the
N = prod(…) positions, e.g. (batch, K), or (batch, time, vocab) for a sequence
model. Targets have the shape (…, K), integer labels the shape (…). The
per-position definitions are written in each docstring; every value is the mean
of that over the N positions (the batch and every other leading axis), so every
gradient carries a factor 1/N. Each loss writes its math on rows, (N, K)
outputs; :func:`over_positions` flattens (…, K) to those rows and reshapes the
gradient back.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .layers.base import check_array, check_real, count_non_finite, is_int


def concrete_values(a) -> np.ndarray | None:
    """The values of array ``a`` on the host, or ``None`` where they are unknown.

    Known: a concrete array; the primal under ``jax.grad``; under ``jax.vmap`` of
    concrete arrays, the batched array, mapped axes first (every entry of it is a
    value some example sees). Unknown: inside ``jax.jit``, ``lax.scan`` and the like.
    """
    a, axes = _unwrap(a)
    if a is None:
        return None
    values = np.asarray(a)
    for k, axis in enumerate(reversed(axes)):  # innermost vmap first
        values = np.moveaxis(values, k + axis, k)
    return values


def values_known(a) -> bool:
    """Whether ``concrete_values(a)`` would find the values (no transfer to the host)."""
    return _unwrap(a)[0] is not None


def _unwrap(a):
    """``(array, mapped axes)`` under the tracers around ``a``; ``(None, [])`` if unknown."""
    axes = []
    while isinstance(a, jax.core.Tracer):
        value = a.to_concrete_value()
        if value is None:  # a vmap tracer carries the batched array and its mapped axis
            if not hasattr(a, "batch_dim"):
                return None, []  # abstract: inside jit
            value, axis = getattr(a, "val", None), a.batch_dim
            if value is None or not (axis is None or isinstance(axis, int)):
                return None, []
            if axis is not None:
                axes.append(axis)
        a = value
    return a, axes


def _check_output(loss: str, y_hat, y) -> None:
    check_array(loss, "network output y_hat", y_hat)
    check_array(loss, "target y", y)
    if y_hat.ndim < 2:
        raise ValueError(
            f"{loss}: network output y_hat must have rank >= 2 (batch, ..., outputs); got "
            f"shape {tuple(y_hat.shape)}"
        )
    if y_hat.shape[0] == 0:
        raise ValueError(f"{loss}: the batch is empty (output shape {tuple(y_hat.shape)}); "
                         "the loss averages over at least one sample")
    if math.prod(y_hat.shape[:-1]) == 0:
        raise ValueError(f"{loss}: the output has no positions (shape {tuple(y_hat.shape)}); "
                         "the loss averages over at least one position")
    if y_hat.shape[-1] == 0:
        raise ValueError(f"{loss}: the network output has no units (shape "
                         f"{tuple(y_hat.shape)}); a loss needs at least one output per sample")


def _check_same_shape(loss: str, y_hat, y) -> None:
    if tuple(y.shape) != tuple(y_hat.shape):
        raise ValueError(
            f"{loss}: target y must have the shape of the network output "
            f"{tuple(y_hat.shape)}; got {tuple(y.shape)}"
        )


def check_labels(loss: str, y_hat, y, ignore_label=None) -> None:
    """Integer labels: shape (…) of an output (…, K), values in [0, K) where they are known.

    ``ignore_label`` (if not None) is allowed too. Inside ``jax.jit`` the values
    are abstract and go unchecked: a label outside [0, K) then selects no class.
    """
    *positions, classes = y_hat.shape
    if tuple(y.shape) != tuple(positions):
        raise ValueError(
            f"{loss}: integer labels y must have shape {tuple(positions)} for output "
            f"{tuple(y_hat.shape)}; got {tuple(y.shape)}"
        )
    labels = concrete_values(y)  # on the host: jnp reductions would be staged inside a trace
    if labels is not None and ignore_label is not None:
        labels = labels[labels != ignore_label]
    if labels is not None and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"{loss}: integer labels must lie in [0, {classes}) for {classes} classes; "
                f"got values in [{lo}, {hi}]"
            )


def _check_finite_targets(loss: str, what: str, t: np.ndarray) -> None:
    bad = count_non_finite(t) if jnp.issubdtype(t.dtype, jnp.inexact) else 0
    if bad:
        raise ValueError(f"{loss}: {what} hold {bad} non-finite value(s) (NaN or ±inf)")


def check_probability_rows(loss: str, y) -> None:
    """Probability targets (…, K): entries >= 0, each row (position) summing to 1, where known.

    The tolerance on a row sum is ``max(√eps, 4·K·eps)`` of the targets' float
    dtype (0 for integer targets). Inside ``jax.jit`` the values go unchecked.
    """
    t = concrete_values(y)
    if t is None or t.size == 0:
        return
    _check_finite_targets(loss, "probability targets", t)
    negative = np.count_nonzero(t < 0)
    if negative:
        raise ValueError(f"{loss}: probability targets must be >= 0; got {negative} negative "
                         f"value(s), the least {t.min()}")
    classes = t.shape[-1]
    eps = float(jnp.finfo(t.dtype).eps) if jnp.issubdtype(t.dtype, jnp.floating) else 0.0
    tol = max(eps**0.5, 4 * classes * eps)
    sums = t.sum(axis=-1, dtype=np.float64)
    if np.any(np.abs(sums - 1) > tol):
        raise ValueError(
            f"{loss}: each row of probability targets must sum to 1 (within {tol:.1e}); got "
            f"row sums in [{sums.min():.6g}, {sums.max():.6g}]"
        )


def check_unit_interval(loss: str, y) -> None:
    """Binary targets: every value in [0, 1], where known (unchecked inside ``jax.jit``)."""
    t = concrete_values(y)
    if t is None or t.size == 0:
        return
    _check_finite_targets(loss, "targets", t)
    lo, hi = t.min(), t.max()
    if lo < 0 or hi > 1:
        raise ValueError(f"{loss}: targets must lie in [0, 1] (probabilities of class 1); got "
                         f"values in [{lo}, {hi}]")


def _is_integer(y) -> bool:
    return jnp.issubdtype(y.dtype, jnp.integer)


def one_hot_mask(labels, classes: int, dtype):
    """``mask[n, k] = 1 if labels[n] == k`` for labels (N,) — fused by XLA, never stored."""
    return (labels[:, None] == jnp.arange(classes)[None, :]).astype(dtype)


def over_positions(rows, y_hat, y):
    """``rows(o, t)``, a loss's math on (N, K) outputs, applied to outputs (…, K).

    ``y_hat`` (…, K) becomes rows ``o`` (N, K) with N = prod(…); targets (…, K)
    become (N, K) and integer labels (…) become (N,). ``rows`` returns the mean
    over its N rows and the gradient (N, K), which is reshaped back to (…, K).
    Shapes are the caller's to check first. Rank 2 passes through unchanged.
    """
    if y_hat.ndim == 2:
        return rows(y_hat, y)
    o = jnp.reshape(y_hat, (-1, y_hat.shape[-1]))
    t = jnp.reshape(y, (o.shape[0], *y.shape[y_hat.ndim - 1:]))
    value, grad = rows(o, t)
    return value, jnp.reshape(grad, y_hat.shape)


class Loss:
    takes_labels = False  # True: accepts integer class labels (…) as targets

    @property
    def name(self) -> str:
        return type(self).__name__

    def value(self, y_hat, y):
        return self.value_and_grad(y_hat, y)[0]

    def value_and_grad(self, y_hat, y):
        raise NotImplementedError

    def check_target_values(self, y_hat, y) -> None:
        """``ValueError`` if the known values of ``y`` lie outside the loss's domain.

        ``y_hat`` needs only ``shape`` and ``dtype``. Values inside ``jax.jit`` are
        unknown and go unchecked; a loss without a restricted domain checks nothing.
        """

    def __repr__(self) -> str:
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields
                           if getattr(self, f.name) is not None)  # (an option left unset)
        return f"{self.name}({fields})"


@dataclasses.dataclass(frozen=True, repr=False)
class HalfSquaredError(Loss):
    """Per position ``E = Σ_k ½(t_k − o_k)²`` (the tutorials' E_total).

    Targets have the shape of the output (…, K). Gradient:
    ``∂L/∂o = (o − t) / N`` for N positions, shape (…, K).
    """

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        _check_same_shape(self.name, y_hat, y)
        return over_positions(self._rows, y_hat, y)

    def _rows(self, o, t):
        n = o.shape[0]
        r = o - t
        return 0.5 * jnp.sum(r * r) / n, r / n


@dataclasses.dataclass(frozen=True, repr=False)
class MeanSquaredError(Loss):
    """Per position ``(1/K) Σ_k (o_k − t_k)²``: the mean over every entry of (…, K).

    Targets have the shape of the output (…, K). Gradient:
    ``∂L/∂o = 2(o − t) / (N·K)`` for N positions, shape (…, K).
    """

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        _check_same_shape(self.name, y_hat, y)
        return over_positions(self._rows, y_hat, y)

    def _rows(self, o, t):
        n = o.size  # N·K
        r = o - t
        return jnp.sum(r * r) / n, (2.0 / n) * r


@dataclasses.dataclass(frozen=True, repr=False)
class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of softmax(logits): per position ``logsumexp(z) − Σ_k t_k z_k``.

    For logits (…, K), ``y`` is either integer labels (…) in [0, K) or targets
    (…, K) whose rows are probabilities: entries >= 0 summing to 1 (one-hot
    included, integer or float). Known values are checked (a ValueError
    otherwise); inside ``jax.jit`` they are not, and a label outside [0, K)
    selects no class. Stable for logits of any magnitude: the max is subtracted
    before exponentiating.

    Fused gradient (softmax and cross-entropy together), for N positions:
    ``∂L/∂z = (softmax(z)·Σ_k t_k − t) / N = (softmax(z) − t) / N`` for rows of t
    that sum to 1; shape (…, K).

    Args:
      ignore_label: an integer label (e.g. −1, PyTorch's ``ignore_index``) whose
        positions are left out — padding in a batch of sequences. Then N counts
        only the other positions (the mean over the counted ones), the ignored
        positions' gradient is 0, and a batch with nothing counted has L = 0.
        Integer labels only.
    """

    ignore_label: int | None = None
    takes_labels = True

    def __post_init__(self):
        if self.ignore_label is not None:
            if not is_int(self.ignore_label):
                raise ValueError(f"SoftmaxCrossEntropy: ignore_label must be an int or None; "
                                 f"got {self.ignore_label!r}")
            object.__setattr__(self, "ignore_label", int(self.ignore_label))

    def check_target_values(self, y_hat, y) -> None:
        if _is_integer(y) and y.ndim == len(y_hat.shape) - 1:
            check_labels(self.name, y_hat, y, self.ignore_label)
        elif tuple(y.shape) == tuple(y_hat.shape):
            check_probability_rows(self.name, y)

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        self.check_target_values(y_hat, y)
        if not ((_is_integer(y) and y.ndim == y_hat.ndim - 1)
                or tuple(y.shape) == tuple(y_hat.shape)):
            raise ValueError(
                f"{self.name}: y must be integer labels {tuple(y_hat.shape[:-1])} or "
                f"probability targets {tuple(y_hat.shape)}; got shape {tuple(y.shape)} with "
                f"dtype {y.dtype}"
            )
        if self.ignore_label is not None and y.ndim == y_hat.ndim:
            raise ValueError(f"{self.name}: ignore_label applies to integer labels "
                             f"{tuple(y_hat.shape[:-1])}; got probability targets of shape "
                             f"{tuple(y.shape)}")
        return over_positions(self._rows, y_hat, y)

    def _rows(self, z, y):
        n, classes = z.shape
        if y.ndim == 1 and self.ignore_label is not None:  # labels, some positions left out
            counted = (y != self.ignore_label).astype(z.dtype)[:, None]  # (N, 1)
            t = one_hot_mask(y, classes, z.dtype) * counted
            t_sum = counted
            n = jnp.maximum(jnp.sum(counted), 1)  # the mean over the counted positions
        elif y.ndim == 1:  # integer labels (N,)
            t = one_hot_mask(y, classes, z.dtype)
            t_sum = 1.0  # one label per row
        else:  # targets (N, K)
            t = y.astype(z.dtype) if _is_integer(y) else y  # integer one-hot rows too
            t_sum = jnp.sum(t, axis=1, keepdims=True)  # 1 for probability rows
        shifted = z - jnp.max(z, axis=1, keepdims=True)
        e = jnp.exp(shifted)
        s = jnp.sum(e, axis=1, keepdims=True)
        log_z = jnp.log(s)  # logsumexp(z) − max(z)
        value = (jnp.sum(log_z * t_sum) - jnp.sum(t * shifted)) / n
        return value, (e / s * t_sum - t) / n


@dataclasses.dataclass(frozen=True, repr=False)
class SigmoidBinaryCrossEntropy(Loss):
    """Binary cross-entropy of σ(logits): per position ``Σ_k softplus(z_k) − t_k z_k``.

    That equals ``−t log σ(z) − (1 − t) log(1 − σ(z))``, computed as
    ``t·softplus(−z) + (1 − t)·softplus(z)`` with ``jax.nn.softplus``: it never
    overflows, loses nothing to cancellation for t ∈ {0, 1}, and its autodiff
    gradient is ``σ(z) − t`` everywhere, ``z = 0`` included. Targets ``t ∈ [0, 1]``
    have the shape of the logits (…, K); known values outside [0, 1] raise a
    ValueError (inside ``jax.jit`` they go unchecked).

    Gradient: ``∂L/∂z = (σ(z) − t) / N`` for N positions, shape (…, K).
    """

    def check_target_values(self, y_hat, y) -> None:
        if tuple(y.shape) == tuple(y_hat.shape):
            check_unit_interval(self.name, y)

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        if _is_integer(y):
            y = y.astype(y_hat.dtype)
        _check_same_shape(self.name, y_hat, y)
        self.check_target_values(y_hat, y)
        return over_positions(self._rows, y_hat, y)

    def _rows(self, z, t):
        n = z.shape[0]
        per_unit = t * jax.nn.softplus(-z) + (1 - t) * jax.nn.softplus(z)
        value = jnp.sum(per_unit) / n
        return value, (jax.nn.sigmoid(z) - t) / n


@dataclasses.dataclass(frozen=True, repr=False)
class Hinge(Loss):
    """Multiclass SVM loss (CS231n): per position ``Σ_{j≠y} max(0, s_j − s_y + Δ)``.

    For scores (…, K), ``y`` is integer labels (…) in [0, K), checked where known
    (inside ``jax.jit`` a label outside the range selects no class). With
    ``m_j = s_j − s_y + Δ``, the indicator ``1[m_j > 0]`` (0 exactly at the
    margin, the subgradient autodiff takes for this code) and N positions:

      ∂L/∂s_j = 1[m_j > 0] / N                 for j ≠ y
      ∂L/∂s_y = −Σ_{j≠y} 1[m_j > 0] / N
    """

    margin: float = 1.0
    takes_labels = True

    def __post_init__(self):
        object.__setattr__(self, "margin", check_real("Hinge", "margin", self.margin, 0.0))

    def check_target_values(self, y_hat, y) -> None:
        if _is_integer(y):
            check_labels(self.name, y_hat, y)

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        if not _is_integer(y):
            raise ValueError(
                f"{self.name}: y must be integer labels of shape {tuple(y_hat.shape[:-1])}; "
                f"got dtype {y.dtype} with shape {tuple(y.shape)}"
            )
        self.check_target_values(y_hat, y)
        return over_positions(self._rows, y_hat, y)

    def _rows(self, s, y):
        n, classes = s.shape
        is_label = one_hot_mask(y, classes, s.dtype)
        s_y = jnp.sum(s * is_label, axis=1, keepdims=True)
        m = s - s_y + self.margin
        active = (m > 0) & (is_label == 0)
        value = jnp.sum(jnp.where(active, m, 0)) / n
        a = active.astype(s.dtype)
        ds = (a - is_label * jnp.sum(a, axis=1, keepdims=True)) / n
        return value, ds
