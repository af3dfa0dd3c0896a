"""Losses with hand-written gradients.

A loss is a frozen dataclass with

    value(y_hat, y)          -> scalar L, averaged over the batch
    value_and_grad(y_hat, y) -> (L, dy_hat)   with dy_hat = ∂L/∂y_hat, shape of y_hat

``y_hat`` is the network's output, (batch, K). The per-sample definitions are
written in each docstring; every value is the mean of that over the batch, so
every gradient carries a factor 1/batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .layers.base import check_array, check_real


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _check_output(loss: str, y_hat, y, rank: int = 2) -> None:
    check_array(loss, "network output y_hat", y_hat)
    check_array(loss, "target y", y)
    if y_hat.ndim != rank:
        raise ValueError(
            f"{loss}: network output y_hat must have rank {rank} (batch, outputs); got "
            f"shape {tuple(y_hat.shape)}"
        )
    if y_hat.shape[0] == 0:
        raise ValueError(f"{loss}: the batch is empty (output shape {tuple(y_hat.shape)}); "
                         "the loss averages over at least one sample")
    if y_hat.shape[-1] == 0:
        raise ValueError(f"{loss}: the network output has no units (shape "
                         f"{tuple(y_hat.shape)}); a loss needs at least one output per sample")


def _check_same_shape(loss: str, y_hat, y) -> None:
    if tuple(y.shape) != tuple(y_hat.shape):
        raise ValueError(
            f"{loss}: target y must have the shape of the network output "
            f"{tuple(y_hat.shape)}; got {tuple(y.shape)}"
        )


def check_labels(loss: str, y_hat, y) -> None:
    """Integer labels: shape (batch,), values in [0, K) when they are concrete."""
    batch, classes = y_hat.shape
    if tuple(y.shape) != (batch,):
        raise ValueError(
            f"{loss}: integer labels y must have shape ({batch},) for output "
            f"{tuple(y_hat.shape)}; got {tuple(y.shape)}"
        )
    if _is_concrete(y) and y.size:
        labels = np.asarray(y)  # on the host: jnp reductions would be staged inside a trace
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"{loss}: integer labels must lie in [0, {classes}) for {classes} classes; "
                f"got values in [{lo}, {hi}]"
            )


def _is_integer(y) -> bool:
    return jnp.issubdtype(y.dtype, jnp.integer)


def one_hot_mask(labels, classes: int, dtype):
    """``mask[n, k] = 1 if labels[n] == k`` — fused by XLA, never stored."""
    return (labels[:, None] == jnp.arange(classes)[None, :]).astype(dtype)


class Loss:
    takes_labels = False  # True: accepts integer class labels (batch,) as targets

    @property
    def name(self) -> str:
        return type(self).__name__

    def value(self, y_hat, y):
        return self.value_and_grad(y_hat, y)[0]

    def value_and_grad(self, y_hat, y):
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields)
        return f"{self.name}({fields})"


@dataclasses.dataclass(frozen=True, repr=False)
class HalfSquaredError(Loss):
    """Per sample ``E = Σ_k ½(t_k − o_k)²`` (the tutorials' E_total).

    Gradient: ``∂L/∂o = (o − t) / batch``, shape (batch, K).
    """

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        _check_same_shape(self.name, y_hat, y)
        batch = y_hat.shape[0]
        r = y_hat - y
        return 0.5 * jnp.sum(r * r) / batch, r / batch


@dataclasses.dataclass(frozen=True, repr=False)
class MeanSquaredError(Loss):
    """Per sample ``(1/K) Σ_k (o_k − t_k)²``.

    Gradient: ``∂L/∂o = 2(o − t) / (batch·K)``, shape (batch, K).
    """

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        _check_same_shape(self.name, y_hat, y)
        n = y_hat.size
        r = y_hat - y
        return jnp.sum(r * r) / n, (2.0 / n) * r


@dataclasses.dataclass(frozen=True, repr=False)
class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of softmax(logits): per sample ``logsumexp(z) − Σ_k t_k z_k``.

    ``y`` is either integer labels (batch,) or targets (batch, K) whose rows are
    probabilities (one-hot included, integer or float). Stable for logits of any
    magnitude: the max is subtracted before exponentiating.

    Fused gradient (softmax and cross-entropy together):
    ``∂L/∂z = (softmax(z)·Σ_k t_k − t) / batch = (softmax(z) − t) / batch`` for
    rows of t that sum to 1; shape (batch, K).
    """

    takes_labels = True

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        batch, classes = y_hat.shape
        if _is_integer(y) and y.ndim == 1:
            check_labels(self.name, y_hat, y)
            t = one_hot_mask(y, classes, y_hat.dtype)
            t_sum = 1.0  # one label per row
        elif y.ndim == 2 and tuple(y.shape) == tuple(y_hat.shape):
            t = y.astype(y_hat.dtype) if _is_integer(y) else y  # integer one-hot rows too
            t_sum = jnp.sum(t, axis=1, keepdims=True)  # 1 for probability rows
        else:
            raise ValueError(
                f"{self.name}: y must be integer labels ({batch},) or probability targets "
                f"{tuple(y_hat.shape)}; got shape {tuple(y.shape)} with dtype {y.dtype}"
            )
        shifted = y_hat - jnp.max(y_hat, axis=1, keepdims=True)
        e = jnp.exp(shifted)
        s = jnp.sum(e, axis=1, keepdims=True)
        log_z = jnp.log(s)  # logsumexp(z) − max(z)
        value = (jnp.sum(log_z * t_sum) - jnp.sum(t * shifted)) / batch
        return value, (e / s * t_sum - t) / batch


@dataclasses.dataclass(frozen=True, repr=False)
class SigmoidBinaryCrossEntropy(Loss):
    """Binary cross-entropy of σ(logits): per sample ``Σ_k softplus(z_k) − t_k z_k``.

    That equals ``−t log σ(z) − (1 − t) log(1 − σ(z))`` but never overflows:
    ``softplus(z) = max(z, 0) + log1p(e^{−|z|})``. Targets ``t ∈ [0, 1]`` have the
    shape of the logits (batch, K).

    Gradient: ``∂L/∂z = (σ(z) − t) / batch``, shape (batch, K).
    """

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        if _is_integer(y):
            y = y.astype(y_hat.dtype)
        _check_same_shape(self.name, y_hat, y)
        batch = y_hat.shape[0]
        softplus = jnp.maximum(y_hat, 0) + jnp.log1p(jnp.exp(-jnp.abs(y_hat)))
        value = jnp.sum(softplus - y * y_hat) / batch
        return value, (jax.nn.sigmoid(y_hat) - y) / batch


@dataclasses.dataclass(frozen=True, repr=False)
class Hinge(Loss):
    """Multiclass SVM loss (CS231n): per sample ``Σ_{j≠y} max(0, s_j − s_y + Δ)``.

    ``y`` is integer labels (batch,). With ``m_j = s_j − s_y + Δ`` and the
    indicator ``1[m_j > 0]`` (0 exactly at the margin, the subgradient autodiff
    takes for this code):

      ∂L/∂s_j = 1[m_j > 0] / batch                 for j ≠ y
      ∂L/∂s_y = −Σ_{j≠y} 1[m_j > 0] / batch
    """

    margin: float = 1.0
    takes_labels = True

    def __post_init__(self):
        object.__setattr__(self, "margin", check_real("Hinge", "margin", self.margin, 0.0))

    def value_and_grad(self, y_hat, y):
        _check_output(self.name, y_hat, y)
        if not _is_integer(y):
            raise ValueError(
                f"{self.name}: y must be integer labels of shape ({y_hat.shape[0]},); got "
                f"dtype {y.dtype} with shape {tuple(y.shape)}"
            )
        check_labels(self.name, y_hat, y)
        batch, classes = y_hat.shape
        is_label = one_hot_mask(y, classes, y_hat.dtype)
        s_y = jnp.sum(y_hat * is_label, axis=1, keepdims=True)
        m = y_hat - s_y + self.margin
        active = (m > 0) & (is_label == 0)
        value = jnp.sum(jnp.where(active, m, 0)) / batch
        a = active.astype(y_hat.dtype)
        ds = (a - is_label * jnp.sum(a, axis=1, keepdims=True)) / batch
        return value, ds
