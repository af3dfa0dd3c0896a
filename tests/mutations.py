"""A catalogue of plausible wrong backward passes, to measure gradcheck's power.

Each mutation is a test-only subclass of a layer, loss or network whose backward
has one classic bug; its forward is untouched, so autodiff of the mutated
network is still the true gradient. ``MUTATIONS`` pairs each with a network it
silently runs in (no shape error), the mode gradcheck checks it in (eval, or train
mode with BatchNorm's state and Dropout's key) and what ``gradcheck`` must report:
the first divergence from the output, a nested layer path such as
``layers[1].layers[0].body.layers[3] (DenseWNotTransposed)``, and the exact set of
failing rows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp import Sequential, layers, losses, models
from jaxbp.layers.base import call_backward, per_feature
from jaxbp.layers.batchnorm import BatchNormEvalResiduals, BatchNormResiduals
from jaxbp.layers.dropout import DropoutIdentityResiduals
from jaxbp.layers.pool import AvgPoolResiduals
from jaxbp.network import Model


# ------------------------------------------------------------------------- layers
class SigmoidMissingDerivative(layers.Sigmoid):
    """Forgets the σ' factor: dx = dy instead of dy ⊙ y(1 − y)."""

    def backward(self, params, residuals, dy):
        return {}, dy


class DenseWNotTransposed(layers.Dense):
    """dx = dy W instead of dy Wᵀ: runs silently when W is square."""

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        return dparams, dy @ params["W"]


class DenseBiasNotSummed(layers.Dense):
    """db = dy[0]: the bias gradient of one sample, not summed over the batch."""

    def backward(self, params, residuals, dy):
        dparams, dx = super().backward(params, residuals, dy)
        return {**dparams, "b": dy[0]}, dx


class DenseUpdatedWeights(layers.Dense):
    """Backpropagates dx through already-updated weights ``W − lr·dW``.

    The bug the worked example warns about: updating the output layer before
    computing the hidden layers' gradients, which need the original weights.
    """

    lr: ClassVar[float] = 0.5

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        return dparams, dy @ (params["W"] - self.lr * dparams["W"]).T


class ReLUMaskFromOutput(layers.ReLU):
    """Masks with ``y ≥ 0`` computed from the output ``y = relu(x)``.

    ``y > 0`` would be the same as ``x > 0``, but the output is never negative,
    so ``y ≥ 0`` keeps every unit: the gradient leaks through dead units.
    """

    def backward(self, params, residuals, dy):  # (ReLU's forward stores y)
        return {}, jnp.where(residuals.y >= 0, dy, 0)


class ReLUMaskFromGradient(layers.ReLU):
    """Masks with the incoming gradient's sign, ``dy > 0``, instead of ``x > 0``."""

    def backward(self, params, residuals, dy):
        return {}, jnp.where(dy > 0, dy, 0)


class MaxPoolToEveryElement(layers.MaxPool2D):
    """Sends each window's dy to every element of the window, not only to its arg-max."""

    def backward(self, params, residuals, dy):
        box = layers.AvgPool2D(self.window, self.stride, self.padding)
        _, dx = box.backward({}, AvgPoolResiduals(x=residuals.x), dy)
        return {}, dx * (self.window[0] * self.window[1])  # box sum, not box mean


class MaxPoolOffsetTransposed(layers.MaxPool2D):
    """Reads each window's arg-max offset column-major: dy of a pick at (m, k) goes to (k, m)."""

    def backward(self, params, residuals, dy):
        kw = self.window[1]
        first = residuals.first
        return super().backward(params, residuals._replace(first=first % kw * kw + first // kw),
                                dy)


class ConvKernelNotFlipped(layers.Conv2D):
    """dx correlates dy with W itself instead of the spatially flipped kernel."""

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        flipped = {**params, "W": lax.rev(params["W"], (0, 1))}  # super() flips it back
        return dparams, super().backward(flipped, residuals, dy)[1]


class ConvStrideIgnored(layers.Conv2D):
    """dx treats dy as if the stride were 1 (no dilation), padded at the end to fit x.

    Each gradient lands at the wrong input position; the shapes still agree.
    """

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        x = residuals.x
        pads, out = self._geometry(x.shape[1:3])
        k = self.kernel_size
        pad = [(k[d] - 1 - pads[d][0], x.shape[1 + d] - out[d] + pads[d][0]) for d in range(2)]
        dx = lax.conv_general_dilated(
            dy,
            lax.rev(params["W"], (0, 1)),
            (1, 1),
            pad,
            dimension_numbers=("NHWC", "HWOI", "NHWC"),
        )
        return dparams, dx


class TanhDerivativeNotSquared(layers.Tanh):
    """tanh' = 1 − y instead of 1 − y²."""

    def backward(self, params, residuals, dy):
        return {}, dy * (1 - residuals.y)


class ELUAlphaForgotten(layers.ELU):
    """dx = dy ⊙ eˣ for x ≤ 0: the α of α eˣ left out."""

    def backward(self, params, residuals, dy):
        _, dx = super().backward(params, residuals, dy)
        return {}, jnp.where(residuals.x > 0, dx, dx / self.alpha)


class LeakyReLUSlopeForgotten(layers.LeakyReLU):
    """dx = 0 for x < 0, as for ReLU: the negative side's slope dropped."""

    def backward(self, params, residuals, dy):
        return {}, jnp.where(residuals.x >= 0, dy, 0)


class GELUExactDerivativeForTanhForm(layers.GELU):
    """The tanh form's forward with the exact form's derivative Φ(x) + x φ(x)."""

    def backward(self, params, residuals, dy):
        return layers.GELU(approximate=False).backward(params, residuals, dy)


class SoftplusDerivativeMirrored(layers.Softplus):
    """dx = dy ⊙ σ(−x) instead of dy ⊙ σ(x)."""

    def backward(self, params, residuals, dy):
        return {}, dy * jax.nn.sigmoid(-residuals.x)


class SoftmaxJacobianDiagonalOnly(layers.Softmax):
    """Only the Jacobian's diagonal: dx = y ⊙ dy, without the − y Σ_j dy_j y_j term."""

    def backward(self, params, residuals, dy):
        return {}, residuals.y * dy


class AvgPoolNotDivided(layers.AvgPool2D):
    """Sends each window's dy to all of its elements without dividing by the window size."""

    def backward(self, params, residuals, dy):
        _, dx = super().backward(params, residuals, dy)
        return {}, dx * (self.window[0] * self.window[1])


class ConvWeightGradientFlipped(layers.Conv2D):
    """dW is the correlation of x with dy, spatially flipped as if it were dx's kernel."""

    def backward(self, params, residuals, dy):
        dparams, dx = super().backward(params, residuals, dy)
        return {**dparams, "W": lax.rev(dparams["W"], (0, 1))}, dx


class ConvBiasNotSummedOverSpace(layers.Conv2D):
    """db sums dy over the batch at the first output position only, not over space."""

    def backward(self, params, residuals, dy):
        dparams, dx = super().backward(params, residuals, dy)
        return {**dparams, "b": jnp.sum(dy[:, 0, 0, :], axis=0)}, dx


class LayerNormVarianceTermDropped(layers.LayerNorm):
    """dx = rstd·(dx̂ − mean(dx̂)): forgets that x also moves the row's variance."""

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        dx_hat = dy * per_feature(params["scale"], dy.ndim)
        return dparams, residuals.rstd * (dx_hat - jnp.mean(dx_hat, axis=-1, keepdims=True))


class RMSNormTreatedAsConstant(layers.RMSNorm):
    """dx = rrms·dx̂: treats the row's root mean square as a constant."""

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        return dparams, residuals.rrms * dy * per_feature(params["scale"], dy.ndim)


class LayerNormMeanTermDropped(layers.LayerNorm):
    """dx = rstd·(dx̂ − x̂ ⊙ mean(dx̂ ⊙ x̂)): forgets that x also moves the row's mean."""

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        x, mean, rstd = residuals
        x_hat = (x - mean) * rstd
        dx_hat = dy * per_feature(params["scale"], dy.ndim)
        return dparams, rstd * (dx_hat - x_hat * jnp.mean(dx_hat * x_hat, axis=-1, keepdims=True))


class BatchNormVarianceTermDropped(layers.BatchNorm):
    """Train mode dx = (γ·rstd/M)(M·dy − Σdy): the − x̂ ⊙ Σ(dy ⊙ x̂) term left out.

    That term is the path through the batch variance σ²_B, which every x of the
    channel moves; without it only the batch mean's path is differentiated.
    """

    def backward(self, params, residuals, dy):
        dparams, dx = super().backward(params, residuals, dy)
        if isinstance(residuals, BatchNormResiduals):
            m, nd = math.prod(dy.shape[:-1]), dy.ndim
            gain = params["scale"] * residuals.rstd
            dx = per_feature(gain / m, nd) * (m * dy - per_feature(dparams["offset"], nd))
        return dparams, dx


class BatchNormTrainBackwardAlways(layers.BatchNorm):
    """The train-mode formula in eval mode too: differentiates through batch statistics
    that the eval forward never computed (it used the running ones, constants)."""

    def backward(self, params, residuals, dy):
        return super().backward(params, BatchNormResiduals(*residuals), dy)


class BatchNormEvalBackwardAlways(layers.BatchNorm):
    """The eval-mode formula dx = γ·rstd·dy in train mode too: the batch mean and
    variance, functions of x, are treated as constants."""

    def backward(self, params, residuals, dy):
        return super().backward(params, BatchNormEvalResiduals(*residuals), dy)


class DropoutNotRescaled(layers.Dropout):
    """dx = where(keep, dy, 0): the mask applied, but not the forward's 1/(1 − rate)."""

    def backward(self, params, residuals, dy):
        if isinstance(residuals, DropoutIdentityResiduals):
            return {}, dy
        return {}, jnp.where(residuals.keep, dy, 0)


class ResidualSkipGradientDropped(layers.Residual):
    """dx = body dx only: forgets that x also reaches the output through the skip path."""

    def backward(self, params, residuals, dy):
        return call_backward(self.body, "body", params, residuals, dy)


class DenseAveragedOverPositions(layers.Dense):
    """dW and db summed over the batch but averaged over the other leading axes.

    On (batch, time, in) inputs the time steps share W, so their contributions
    add up like the samples'; dividing by the sequence length applies the loss's
    mean twice. On (batch, in) inputs it is right, so it hides in sequence models.
    """

    def backward(self, params, residuals, dy):
        dparams, dx = super().backward(params, residuals, dy)
        positions = math.prod(dy.shape[1:-1])
        return {k: g / positions for k, g in dparams.items()}, dx


# ------------------------------------------------------------------------- losses
class HalfSquaredErrorDoubled(losses.HalfSquaredError):
    """The ½ of ``½(o − t)²`` doubled in the gradient: 2(o − t)/batch instead of (o − t)/batch."""

    def value_and_grad(self, y_hat, y):
        value, grad = super().value_and_grad(y_hat, y)
        return value, 2.0 * grad


class SoftmaxCrossEntropyNoBatchMean(losses.SoftmaxCrossEntropy):
    """softmax(z) − t without the 1/batch of the batch-mean loss."""

    def value_and_grad(self, y_hat, y):
        value, grad = super().value_and_grad(y_hat, y)
        return value, y_hat.shape[0] * grad


class MeanSquaredErrorMissingTwo(losses.MeanSquaredError):
    """(o − t)/(batch·K): the 2 of the square's derivative left out."""

    def value_and_grad(self, y_hat, y):
        value, grad = super().value_and_grad(y_hat, y)
        return value, grad / 2


class SigmoidBinaryCrossEntropyWithoutSigmoid(losses.SigmoidBinaryCrossEntropy):
    """(z − t)/batch: the logits taken for probabilities, σ forgotten."""

    def value_and_grad(self, y_hat, y):
        value, _ = super().value_and_grad(y_hat, y)
        return value, (y_hat - y) / y_hat.shape[0]


class HingeLabelScoreHeldConstant(losses.Hinge):
    """∂L/∂s_y = 0: the label's own score treated as a constant in every margin."""

    def value_and_grad(self, y_hat, y):
        value, grad = super().value_and_grad(y_hat, y)
        return value, jnp.where(jax.nn.one_hot(y, y_hat.shape[1]) > 0, 0, grad)


# ------------------------------------------------------------------------ network
class ModelNoDecayGradient(Model):
    """The objective has λ/2 Σ‖W‖², but the gradient leaves out the λW term.

    ``_manual`` is the hand-written backward every manual method (and gradcheck)
    runs; the layers' own backward passes are right.
    """

    def _manual(self, params, state, x, y, ctx, remat_every):
        J, grads, new_state, signals = super()._manual(params, state, x, y, ctx, remat_every)
        grads = jax.tree.map(lambda g, p, d: g - self.weight_decay * p if d else g,
                             grads, params, self.body.decayed(params))
        return J, grads, new_state, signals


def without_decay_gradient(net):
    return ModelNoDecayGradient(net.body, net.loss_fn, net.weight_decay)


# ------------------------------------------------------------------------- cases
def dense_case(stack, loss, in_features, batch, weight_decay=0.0, seed=0, int_labels=False):
    """(net, params, x, y) with random float64 params, inputs and targets."""
    net = Sequential(stack, loss=loss, weight_decay=weight_decay)
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = net.init(k_init, (in_features,), jnp.float64)
    x = jax.random.normal(k_x, (batch, in_features), jnp.float64)
    (classes,) = net.output_shape((in_features,))
    if int_labels:
        y = jax.random.randint(k_y, (batch,), 0, classes)
    else:
        y = jax.random.uniform(k_y, (batch, classes), jnp.float64)
    return net, params, x, y


def replace_layer(net, i, layer):
    stack = list(net.layers)
    stack[i] = layer
    return Sequential(stack, loss=net.loss_fn, weight_decay=net.weight_decay)


def replace_loss(net, loss):
    return Sequential(net.layers, loss=loss, weight_decay=net.weight_decay)


def _replace_in(layer, steps, new):
    """``layer`` with the nested layer at ``steps`` ("layers[i]", "body", ...) replaced."""
    if not steps:
        return new
    step, rest = steps[0], steps[1:]
    if step == "body":
        return dataclasses.replace(layer, body=_replace_in(layer.body, rest, new))
    i = int(re.fullmatch(r"layers\[(\d+)\]", step).group(1))
    children = list(layer.layers)
    children[i] = _replace_in(children[i], rest, new)
    return layers.Sequential(children)


def replace_at(net, path, layer):
    """``net`` with the layer at the nested path ``path`` (e.g. ``layers[1].body.layers[2]``,
    as gradcheck names it) replaced by ``layer``."""
    body = _replace_in(net.body, path.split("."), layer)
    return Sequential(body.layers, loss=net.loss_fn, weight_decay=net.weight_decay)


def running_state(net, input_shape, seed=0):
    """``net``'s state with random running statistics (means ~ N(0, 0.3²), variances in
    [0.5, 2]) in place of the initial zeros and ones, built by NumPy."""
    shapes = jax.eval_shape(lambda k: net.init_state(k, input_shape, jnp.float64),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "mean":
            return 0.3 * rng.normal(size=s.shape)
        return rng.uniform(0.5, 2.0, size=s.shape)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _tanh3(weight_decay=0.0):
    """3 → 3 → 3 → 2 tanh MLP with MSE; every hidden W is square."""
    stack = [layers.Dense(3), layers.Tanh(), layers.Dense(3), layers.Tanh(), layers.Dense(2)]
    return dense_case(stack, losses.MeanSquaredError(), 3, 4, weight_decay)


def _sigmoid_hse():
    stack = [layers.Dense(3), layers.Sigmoid(), layers.Dense(2), layers.Sigmoid()]
    return dense_case(stack, losses.HalfSquaredError(), 2, 4)


def _relu_ce():
    stack = [layers.Dense(6), layers.ReLU(), layers.Dense(3)]
    return dense_case(stack, losses.SoftmaxCrossEntropy(), 4, 5, int_labels=True)


def _cnn():
    """6×6×2 images: Conv(3, 3×3) → Tanh → MaxPool(2) → Conv(2, 2×2, stride 2) → Flatten → Dense."""
    stack = [
        layers.Conv2D(3, 3, padding=1),
        layers.Tanh(),
        layers.MaxPool2D(2),
        layers.Conv2D(2, 2, stride=2, padding=1),
        layers.Flatten(),
        layers.Dense(3),
    ]
    net = Sequential(stack, loss=losses.SoftmaxCrossEntropy())
    k_init, k_x, k_y = jax.random.split(jax.random.key(1), 3)
    params = net.init(k_init, (6, 6, 2), jnp.float64)
    x = jax.random.normal(k_x, (2, 6, 6, 2), jnp.float64)
    return net, params, x, jax.random.randint(k_y, (2,), 0, 3)


def _activation(activation):
    """3 → 4 → 3 MLP with ``activation`` in the middle and softmax cross-entropy."""
    stack = [layers.Dense(4), activation, layers.Dense(3)]
    return dense_case(stack, losses.SoftmaxCrossEntropy(), 3, 6, seed=2, int_labels=True)


def _cnn_avg():
    """``_cnn`` with average pooling in place of max pooling."""
    net, params, x, y = _cnn()
    return replace_layer(net, 2, layers.AvgPool2D(2)), params, x, y


def _sigmoid_bce():
    stack = [layers.Dense(3), layers.Tanh(), layers.Dense(2)]
    return dense_case(stack, losses.SigmoidBinaryCrossEntropy(), 3, 4)


def _relu_hinge():
    stack = [layers.Dense(6), layers.ReLU(), layers.Dense(3)]
    return dense_case(stack, losses.Hinge(), 4, 5, seed=3, int_labels=True)


def _norm(norm):
    """3 → 4 → 3 MLP with ``norm`` after the first Dense, then Tanh; softmax cross-entropy."""
    stack = [layers.Dense(4), norm, layers.Tanh(), layers.Dense(3)]
    return dense_case(stack, losses.SoftmaxCrossEntropy(), 3, 6, seed=4, int_labels=True)


def numpy_case(net, input_shape, batch, seed, classes=3):
    """``(params, x, labels)`` drawn by NumPy (eager jax.random and init calls would compile
    kernels): W ~ N(0, 1/fan_in), every vector (biases, scales, offsets) ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: net.init(k, input_shape, jnp.float64), jax.random.key(0))

    def draw(a):
        fan_in = math.prod(a.shape[:-1]) if a.ndim > 1 else 1
        return rng.normal(size=a.shape) / np.sqrt(fan_in)

    params = jax.tree.map(draw, shapes)
    x = rng.normal(size=(batch, *input_shape))
    return params, x, rng.integers(0, classes, size=(batch, *input_shape[:-1]))


def _residual_mlp(weight_decay=0.0):
    """Dense(4) → Residual(Dense(4) → Tanh → Dense(4)) → Tanh → Dense(3), softmax-CE."""
    block = layers.Sequential([layers.Dense(4), layers.Tanh(), layers.Dense(4)])
    stack = [layers.Dense(4), layers.Residual(block), layers.Tanh(), layers.Dense(3)]
    net = Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)
    return (net, *numpy_case(net, (3,), batch=5, seed=5))


def sequence_blocks(weight_decay=0.0):
    """Two pre-norm residual blocks nested in a Sequential, on (batch, time, features) inputs.

    Paths (gradcheck's names)::

      layers[0]                        Dense(4)               (3, 2, 3) → (3, 2, 4)
      layers[1]                        Sequential
      layers[1].layers[0]              Residual
      layers[1].layers[0].body         Sequential([LayerNorm, Dense(4), Tanh, Dense(4)])
      layers[1].layers[1]              Residual
      layers[1].layers[1].body         Sequential([BatchNorm, Dense(4), Tanh, Dropout(0.5),
                                                   Dense(4)])
      layers[2]                        RMSNorm
      layers[3]                        Dense(3)               → softmax-CE on (3, 2) labels
    """
    block0 = layers.Sequential([layers.LayerNorm(), layers.Dense(4), layers.Tanh(),
                                layers.Dense(4)])
    block1 = layers.Sequential([layers.BatchNorm(), layers.Dense(4), layers.Tanh(),
                                layers.Dropout(0.5), layers.Dense(4)])
    stack = [layers.Dense(4), layers.Sequential([layers.Residual(block0), layers.Residual(block1)]),
             layers.RMSNorm(), layers.Dense(3)]
    net = Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=weight_decay)
    return (net, *numpy_case(net, (2, 3), batch=3, seed=6))


def _rows(prefix, names):
    return {f"{prefix}.{name}" for name in names.split()}


# The rows of sequence_blocks below each of its nested layers, from the output down
# (what a wrong dx at that layer makes wrong too).
_SEQ_INPUT = _rows("layers[0]", "dx W b")
_SEQ_BLOCK0 = (_rows("layers[1].layers[0].body.layers[3]", "dx W b")
               | _rows("layers[1].layers[0].body.layers[2]", "dx")
               | _rows("layers[1].layers[0].body.layers[1]", "dx W b")
               | _rows("layers[1].layers[0].body.layers[0]", "dx scale offset")
               | _rows("layers[1].layers[0].body", "dx") | _rows("layers[1].layers[0]", "dx"))
_SEQ_BELOW_BLOCK1 = _SEQ_BLOCK0 | _rows("layers[1]", "dx") | _SEQ_INPUT
_SEQ_BN_DX = _rows("layers[1].layers[1].body.layers[0]", "dx") | _rows(
    "layers[1].layers[1].body", "dx") | _rows("layers[1].layers[1]", "dx")
_BN = "layers[1].layers[1].body.layers[0]"
# BatchNorm's train-mode dx sums to 0 over each channel (the batch mean's path), so a wrong
# signal above a correct BatchNorm never reaches the bias of the Dense that ends block 0: its
# gradient Σ dy sees only the skip path.
_SEQ_BLOCK0_B = _rows("layers[1].layers[0].body.layers[3]", "b")

_CNN_BELOW_3 = frozenset({f"layers[{j}].dx" for j in range(4)} | {"layers[0].W", "layers[0].b"})


def _worked_example():
    with jax.enable_x64(True):
        return models.worked_example(jnp.float64)


EVERY = "all"  # stands for every row of the report


@dataclasses.dataclass(frozen=True)
class Mutation:
    """A correct case, how to break it, and what gradcheck must then report."""

    name: str
    case: Callable[[], tuple]  # () -> (net, params, x, y), correct
    mutate: Callable[[Model], Model]
    blame: str  # expected report.first_divergence
    failing: frozenset[str] | str  # expected failing rows, or EVERY
    mode: str | None = None  # None: gradcheck's defaults; "train" / "eval": with state and key

    def gradcheck_mode(self, net, x):
        """gradcheck's ``state``, ``key`` and ``train`` for this mutation's case."""
        if self.mode is None:
            return {}
        return {"state": running_state(net, tuple(x.shape[1:])), "key": jax.random.key(7),
                "train": self.mode == "train"}


def _below(i, rows=("W", "b")):
    """Row names of the layers below ``i`` when every one of them has W and b."""
    return {f"layers[{j}].dx" for j in range(i + 1)} | {
        f"layers[{j}].{k}" for j in range(0, i, 2) for k in rows
    }


MUTATIONS = [
    Mutation(
        "missing sigma'",
        _sigmoid_hse,
        lambda net: replace_layer(net, 1, SigmoidMissingDerivative()),
        "layers[1] (SigmoidMissingDerivative)",
        frozenset(_below(1)),
    ),
    Mutation(
        "W instead of W^T",
        _tanh3,
        lambda net: replace_layer(net, 2, DenseWNotTransposed(3)),
        "layers[2] (DenseWNotTransposed)",
        frozenset(_below(2)),
    ),
    Mutation(
        "bias not summed over the batch",
        _tanh3,
        lambda net: replace_layer(net, 4, DenseBiasNotSummed(2)),
        "layers[4] (DenseBiasNotSummed)",
        frozenset({"layers[4].b"}),
    ),
    Mutation(
        "lambda*W left out",
        lambda: _tanh3(weight_decay=0.1),
        without_decay_gradient,
        "layers[4] (Dense)",
        frozenset({"layers[0].W", "layers[2].W", "layers[4].W"}),
    ),
    Mutation(
        "1/2 factor doubled",
        _sigmoid_hse,
        lambda net: replace_loss(net, HalfSquaredErrorDoubled()),
        "loss (HalfSquaredErrorDoubled)",
        EVERY,
    ),
    Mutation(
        "hidden gradients with updated output weights",
        _worked_example,
        lambda net: replace_layer(net, 2, DenseUpdatedWeights(2)),
        "layers[2] (DenseUpdatedWeights)",
        frozenset(_below(2)),
    ),
    Mutation(
        "ReLU mask from the output (y >= 0)",
        _relu_ce,
        lambda net: replace_layer(net, 1, ReLUMaskFromOutput()),
        "layers[1] (ReLUMaskFromOutput)",
        frozenset(_below(1)),
    ),
    Mutation(
        "ReLU mask from the gradient (dy > 0)",
        _relu_ce,
        lambda net: replace_layer(net, 1, ReLUMaskFromGradient()),
        "layers[1] (ReLUMaskFromGradient)",
        frozenset(_below(1)),
    ),
    Mutation(
        "softmax-CE gradient missing 1/batch",
        _relu_ce,
        lambda net: replace_loss(net, SoftmaxCrossEntropyNoBatchMean()),
        "loss (SoftmaxCrossEntropyNoBatchMean)",
        EVERY,
    ),
    Mutation(
        "max-pool gradient sent to every element of the window",
        _cnn,
        lambda net: replace_layer(net, 2, MaxPoolToEveryElement(2)),
        "layers[2] (MaxPoolToEveryElement)",
        _CNN_BELOW_3 - {"layers[3].dx"},
    ),
    Mutation(
        "max-pool arg-max offset read column-major",
        _cnn,
        lambda net: replace_layer(net, 2, MaxPoolOffsetTransposed(2)),
        "layers[2] (MaxPoolOffsetTransposed)",
        _CNN_BELOW_3 - {"layers[3].dx"},
    ),
    Mutation(
        "conv kernel not flipped in dx",
        _cnn,
        lambda net: replace_layer(net, 3, ConvKernelNotFlipped(2, 2, stride=2, padding=1)),
        "layers[3] (ConvKernelNotFlipped)",
        _CNN_BELOW_3,
    ),
    Mutation(
        "conv stride ignored in dx",
        _cnn,
        lambda net: replace_layer(net, 3, ConvStrideIgnored(2, 2, stride=2, padding=1)),
        "layers[3] (ConvStrideIgnored)",
        _CNN_BELOW_3,
    ),
    Mutation(
        "conv dW flipped",
        _cnn,
        lambda net: replace_layer(net, 3, ConvWeightGradientFlipped(2, 2, stride=2, padding=1)),
        "layers[3] (ConvWeightGradientFlipped)",
        frozenset({"layers[3].W"}),
    ),
    Mutation(
        "conv db not summed over space",
        _cnn,
        lambda net: replace_layer(net, 0, ConvBiasNotSummedOverSpace(3, 3, padding=1)),
        "layers[0] (ConvBiasNotSummedOverSpace)",
        frozenset({"layers[0].b"}),
    ),
    Mutation(
        "average-pool gradient not divided by the window size",
        _cnn_avg,
        lambda net: replace_layer(net, 2, AvgPoolNotDivided(2)),
        "layers[2] (AvgPoolNotDivided)",
        _CNN_BELOW_3 - {"layers[3].dx"},
    ),
    Mutation(
        "tanh' = 1 - y",
        _tanh3,
        lambda net: replace_layer(net, 3, TanhDerivativeNotSquared()),
        "layers[3] (TanhDerivativeNotSquared)",
        frozenset(_below(3)),
    ),
    Mutation(
        "ELU alpha forgotten",
        lambda: _activation(layers.ELU(1.3)),
        lambda net: replace_layer(net, 1, ELUAlphaForgotten(1.3)),
        "layers[1] (ELUAlphaForgotten)",
        frozenset(_below(1)),
    ),
    Mutation(
        "leaky ReLU slope forgotten",
        lambda: _activation(layers.LeakyReLU(0.1)),
        lambda net: replace_layer(net, 1, LeakyReLUSlopeForgotten(0.1)),
        "layers[1] (LeakyReLUSlopeForgotten)",
        frozenset(_below(1)),
    ),
    Mutation(
        "GELU tanh form with the exact derivative",
        lambda: _activation(layers.GELU(approximate=True)),
        lambda net: replace_layer(net, 1, GELUExactDerivativeForTanhForm(approximate=True)),
        "layers[1] (GELUExactDerivativeForTanhForm)",
        frozenset(_below(1)),
    ),
    Mutation(
        "softplus' = sigma(-x)",
        lambda: _activation(layers.Softplus()),
        lambda net: replace_layer(net, 1, SoftplusDerivativeMirrored()),
        "layers[1] (SoftplusDerivativeMirrored)",
        frozenset(_below(1)),
    ),
    Mutation(
        "softmax Jacobian diagonal only",
        lambda: _activation(layers.Softmax()),
        lambda net: replace_layer(net, 1, SoftmaxJacobianDiagonalOnly()),
        "layers[1] (SoftmaxJacobianDiagonalOnly)",
        frozenset(_below(1)),
    ),
    Mutation(
        "MSE gradient missing its 2",
        _tanh3,
        lambda net: replace_loss(net, MeanSquaredErrorMissingTwo()),
        "loss (MeanSquaredErrorMissingTwo)",
        EVERY,
    ),
    Mutation(
        "sigmoid cross-entropy gradient without the sigmoid",
        _sigmoid_bce,
        lambda net: replace_loss(net, SigmoidBinaryCrossEntropyWithoutSigmoid()),
        "loss (SigmoidBinaryCrossEntropyWithoutSigmoid)",
        EVERY,
    ),
    Mutation(
        "hinge gradient holds the label's score constant",
        _relu_hinge,
        lambda net: replace_loss(net, HingeLabelScoreHeldConstant()),
        "loss (HingeLabelScoreHeldConstant)",
        EVERY,
    ),
    Mutation(
        "LayerNorm backward without the variance term",
        lambda: _norm(layers.LayerNorm()),
        lambda net: replace_layer(net, 1, LayerNormVarianceTermDropped()),
        "layers[1] (LayerNormVarianceTermDropped)",
        frozenset(_below(1)),
    ),
    Mutation(
        "RMSNorm backward with the RMS held constant",
        lambda: _norm(layers.RMSNorm()),
        lambda net: replace_layer(net, 1, RMSNormTreatedAsConstant()),
        "layers[1] (RMSNormTreatedAsConstant)",
        frozenset(_below(1)),
    ),
    # --- nested blocks, (batch, time, features) inputs, state and dropout keys
    Mutation(
        "W instead of W^T inside a residual block",
        _residual_mlp,
        lambda net: replace_at(net, "layers[1].body.layers[2]", DenseWNotTransposed(4)),
        "layers[1].body.layers[2] (DenseWNotTransposed)",
        frozenset(_rows("layers[1].body.layers[2]", "dx") | _rows("layers[1].body.layers[1]", "dx")
                  | _rows("layers[1].body.layers[0]", "dx W b") | _rows("layers[1].body", "dx")
                  | _rows("layers[1]", "dx") | _rows("layers[0]", "dx W b")),
    ),
    Mutation(
        "residual skip gradient dropped",
        _residual_mlp,
        lambda net: replace_at(net, "layers[1]", ResidualSkipGradientDropped(net.layers[1].body)),
        "layers[1] (ResidualSkipGradientDropped)",
        frozenset(_rows("layers[1]", "dx") | _rows("layers[0]", "dx W b")),
    ),
    Mutation(
        "nested residual skip gradient dropped",
        sequence_blocks,
        lambda net: replace_at(net, "layers[1].layers[1]",
                               ResidualSkipGradientDropped(net.layers[1].layers[1].body)),
        "layers[1].layers[1] (ResidualSkipGradientDropped)",
        frozenset(_rows("layers[1].layers[1]", "dx") | _SEQ_BELOW_BLOCK1),
        mode="train",
    ),
    Mutation(
        "Dense gradient averaged over the time steps",
        sequence_blocks,
        lambda net: replace_at(net, "layers[1].layers[1].body.layers[1]",
                               DenseAveragedOverPositions(4)),
        "layers[1].layers[1].body.layers[1] (DenseAveragedOverPositions)",
        frozenset(_rows("layers[1].layers[1].body.layers[1]", "W b")),
        mode="train",
    ),
    Mutation(
        "lambda*W left out of nested Dense layers",
        lambda: _residual_mlp(weight_decay=0.1),
        without_decay_gradient,
        "layers[3] (Dense)",
        frozenset({"layers[0].W", "layers[1].body.layers[0].W", "layers[1].body.layers[2].W",
                   "layers[3].W"}),
    ),
    Mutation(
        "LayerNorm backward without the mean term",
        sequence_blocks,
        lambda net: replace_at(net, "layers[1].layers[0].body.layers[0]",
                               LayerNormMeanTermDropped()),
        "layers[1].layers[0].body.layers[0] (LayerNormMeanTermDropped)",
        frozenset(_rows("layers[1].layers[0].body.layers[0]", "dx")
                  | _rows("layers[1].layers[0].body", "dx") | _rows("layers[1].layers[0]", "dx")
                  | _rows("layers[1]", "dx") | _SEQ_INPUT),
        mode="train",
    ),
    Mutation(
        "BatchNorm backward without the variance term",
        sequence_blocks,
        lambda net: replace_at(net, _BN, BatchNormVarianceTermDropped()),
        f"{_BN} (BatchNormVarianceTermDropped)",
        frozenset(_SEQ_BN_DX | _SEQ_BELOW_BLOCK1 - _SEQ_BLOCK0_B),  # (its dx still sums to 0)
        mode="train",
    ),
    Mutation(
        "BatchNorm train-mode backward in eval mode",
        sequence_blocks,
        lambda net: replace_at(net, _BN, BatchNormTrainBackwardAlways()),
        f"{_BN} (BatchNormTrainBackwardAlways)",
        frozenset(_SEQ_BN_DX | _SEQ_BELOW_BLOCK1),
        mode="eval",
    ),
    Mutation(
        "BatchNorm eval-mode backward in train mode",
        sequence_blocks,
        lambda net: replace_at(net, _BN, BatchNormEvalBackwardAlways()),
        f"{_BN} (BatchNormEvalBackwardAlways)",
        frozenset(_SEQ_BN_DX | _SEQ_BELOW_BLOCK1),
        mode="train",
    ),
    Mutation(
        "Dropout backward without the 1/(1 - rate) scale",
        sequence_blocks,
        lambda net: replace_at(net, "layers[1].layers[1].body.layers[3]", DropoutNotRescaled(0.5)),
        "layers[1].layers[1].body.layers[3] (DropoutNotRescaled)",
        frozenset(_rows("layers[1].layers[1].body.layers[3]", "dx")
                  | _rows("layers[1].layers[1].body.layers[2]", "dx")
                  | _rows("layers[1].layers[1].body.layers[1]", "dx W b")
                  | _rows(_BN, "scale offset") | _SEQ_BN_DX | _SEQ_BELOW_BLOCK1 - _SEQ_BLOCK0_B),
        mode="train",
    ),
]


# ---------------------------------------------------------------------- recurrent
# Backpropagation through time: each mutant's forward is its layer's own; only the backward
# (the step back, or the scatter of the embedding's gradient) has the bug.
class RNNCarriedGradientDropped(layers.RNN):
    """BPTT without the recurrence: dh_t = dy_t, the ∂L/∂h_t carried back from step t+1 dropped.

    Each step's gradient then comes only from its own output, as if h_{t−1} did not
    feed h_t (truncated BPTT with a window of one step).
    """

    def add_to_h(self, dcarry, dh):
        return dh


class LSTMForgetPathDropped(layers.LSTM):
    """dc_{t−1} = 0 instead of dc_t ⊙ f: the cell state's own path back in time is missing.

    c_t = f ⊙ c_{t−1} + i ⊙ g, so c_{t−1} reaches the loss through c_t, scaled by the
    forget gate; a backward that carries only ∂L/∂h from step to step (as for an RNN,
    whose state is h alone) loses it. ∂L/∂c_t still gets its share through h_t =
    o ⊙ tanh(c_t) at every step, so nothing is zero and the shapes all agree.
    """

    def step_backward(self, params, step, dcarry):
        (dh_prev, _), da = super().step_backward(params, step, dcarry)
        return (dh_prev, jnp.zeros_like(dh_prev)), da


class EmbeddingOverwritesRepeats(layers.Embedding):
    """dW = zeros.at[ids].set(dy): a repeated id keeps one position's gradient, not their sum."""

    def backward(self, params, residuals, dy):
        ids = residuals.ids.reshape(-1)
        dW = jnp.zeros_like(params["W"]).at[ids].set(dy.reshape(-1, self.dim), mode="drop")
        return {"W": dW}, None


class GRUUpdateGateSignSwapped(layers.GRU):
    """dz = dh ⊙ (n − h_{t−1}) instead of dh ⊙ (h_{t−1} − n).

    h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}: whether z weighs the new or the old state is a
    convention (PyTorch's z keeps the old one), and taking the other's derivative is
    the classic slip. The rest of the step back is GRU's own.
    """

    def step_backward(self, params, step, dh):
        r, z, n = step.r, step.z, step.n
        dn = dh * (1 - z)
        dz = dh * (n - step.h_prev)  # the bug: the sign of the update gate's derivative
        dan = dn * (1 - n * n)
        drz = jnp.concatenate([dan * step.hn * r * (1 - r), dz * z * (1 - z)], axis=-1)
        dhn = dan * r
        dh_prev = dh * z + jnp.concatenate([drz, dhn], axis=-1) @ params["Wh"].T
        return dh_prev, (jnp.concatenate([drz, dan], axis=-1), dhn)


def _char_lm(cell):
    """Embedding(7, 3) → ``cell`` (4 wide) → Dense(7): a tiny character model, float64.

    Ids and labels (3, 5) drawn by NumPy: 15 ids of 7, so some repeat (the embedding's
    gradient must add them up). Params as ``numpy_case`` draws them.
    """
    vocab, batch, time = 7, 3, 5
    net = Sequential([layers.Embedding(vocab, 3), cell, layers.Dense(vocab)],
                     loss=losses.SoftmaxCrossEntropy())
    rng = np.random.default_rng(8)
    shapes = jax.eval_shape(lambda k: net.init(k, (time,), jnp.float64), jax.random.key(0))

    def draw(a):
        fan_in = math.prod(a.shape[:-1]) if a.ndim > 1 else 1
        return rng.normal(size=a.shape) / np.sqrt(fan_in)

    params = jax.tree.map(draw, shapes)
    ids = rng.integers(0, vocab, size=(batch, time))
    assert len(np.unique(ids)) < ids.size  # (repeated ids)
    return net, params, ids, rng.integers(0, vocab, size=(batch, time))


def _rnn_lm():
    return _char_lm(layers.RNN(4))


def _lstm_lm():
    return _char_lm(layers.LSTM(4))


def _gru_lm():
    return _char_lm(layers.GRU(4))


# Rows of a _char_lm case below its cell: integer ids have no gradient, so gradcheck reports
# no layers[0].dx signal row; the embedding table's gradient is the cell's dx scattered.
_LM_CELL = _rows("layers[1]", "dx Wx Wh b") | _rows("layers[0]", "W")

MUTATIONS.extend([
    Mutation(
        "RNN BPTT without the carried dh",
        _rnn_lm,
        lambda net: replace_layer(net, 1, RNNCarriedGradientDropped(4)),
        "layers[1] (RNNCarriedGradientDropped)",
        frozenset(_LM_CELL),
    ),
    Mutation(
        "LSTM backward without the forget gate's path in dc",
        _lstm_lm,
        lambda net: replace_layer(net, 1, LSTMForgetPathDropped(4)),
        "layers[1] (LSTMForgetPathDropped)",
        frozenset(_LM_CELL),
    ),
    Mutation(
        "Embedding gradient overwritten for repeated ids",
        _rnn_lm,
        lambda net: replace_layer(net, 0, EmbeddingOverwritesRepeats(7, 3)),
        "layers[0] (EmbeddingOverwritesRepeats)",
        frozenset({"layers[0].W"}),
    ),
    Mutation(
        "GRU update gate derivative with the sign swapped",
        _gru_lm,
        lambda net: replace_layer(net, 1, GRUUpdateGateSignSwapped(4)),
        "layers[1] (GRUUpdateGateSignSwapped)",
        frozenset(_LM_CELL | {"layers[1].bhn"}),
    ),
])


# ---------------------------------------------------------------------- attention
# Each mutant's forward is MultiHeadAttention's own. The backward is changed through its
# residuals or its lean core, so the rest of it (the projections, the other heads' terms)
# stays the layer's own code.
class AttentionSoftmaxRowSumDropped(layers.MultiHeadAttention):
    """dS = P ⊙ dP: the softmax backward without its row-sum term, P ⊙ (dP − δ) with δ = 0.

    δ = rowsum(dO ⊙ O) is computed from the residual O, so the backward run on O = 0 has
    δ = 0 and nothing else changed but dWo = Oᵀ dy, which is taken from the correct run.
    """

    def backward(self, params, residuals, dy):
        dparams, _ = super().backward(params, residuals, dy)
        wrong, dx = super().backward(params, residuals._replace(O=jnp.zeros_like(residuals.O)),
                                     dy)
        return {**wrong, "Wo": dparams["Wo"]}, dx


class AttentionBackwardScaleForgotten(layers.MultiHeadAttention):
    """dQ = dS K and dK = dSᵀ Q: the 1/√d of S = Q Kᵀ/√d forgotten in the backward.

    With ``backward="standard"`` dS comes from the stored P, and Q and K enter the core's
    backward only through dQ = dS K/√d and dK = dSᵀ Q/√d: running it on √d·Q and √d·K
    drops the scale and nothing else.
    """

    def backward(self, params, residuals, dy):
        root_d = math.sqrt(residuals.q.shape[-1])
        unscaled = residuals._replace(q=root_d * residuals.q, k=root_d * residuals.k)
        return super().backward(params, unscaled, dy)


class AttentionLeanRecomputeNotCausal(layers.MultiHeadAttention):
    """The lean backward recomputes P = exp(S − lse) for every key: the causal mask (and only
    it; padding is still applied) left out of the recomputation, though the forward's lse was
    taken over keys 0…t only."""

    def _lean_core(self, r, dO, delta, scale):
        every_key = layers.MultiHeadAttention(self.num_heads, causal=False, backward="lean",
                                              block_size=self.block_size)
        return every_key._lean_core(r, dO, delta, scale)


def _attention_net(attention):
    """Dense(8) → ``attention`` (2 heads of 4) → Dense(5), softmax-CE on (2, 6) labels, float64.

    Inputs (2, 6, 3); params as ``numpy_case`` draws them (q·k/√d of order 1: the softmax
    is far from uniform).
    """
    net = Sequential([layers.Dense(8), attention, layers.Dense(5)],
                     loss=losses.SoftmaxCrossEntropy())
    return (net, *numpy_case(net, (6, 3), batch=2, seed=11, classes=5))


def _attention_standard():
    return _attention_net(layers.MultiHeadAttention(2))


def _attention_lean():
    return _attention_net(layers.MultiHeadAttention(2, backward="lean", block_size=4))


# dQ and dK wrong, dV right (or, for the lean recomputation, dV wrong too): the Wqkv and bqkv
# rows and every signal below; Wo and bo see only dy and O, and stay right.
_ATTENTION = frozenset(_rows("layers[1]", "dx Wqkv bqkv") | _rows("layers[0]", "dx W b"))

MUTATIONS.extend([
    Mutation(
        "attention softmax backward without the row-sum term",
        _attention_standard,
        lambda net: replace_layer(net, 1, AttentionSoftmaxRowSumDropped(2)),
        "layers[1] (AttentionSoftmaxRowSumDropped)",
        _ATTENTION,
    ),
    Mutation(
        "attention backward without the 1/sqrt(d) scale",
        _attention_standard,
        lambda net: replace_layer(net, 1, AttentionBackwardScaleForgotten(2)),
        "layers[1] (AttentionBackwardScaleForgotten)",
        _ATTENTION,
    ),
    Mutation(
        "lean attention backward recomputes P without the causal mask",
        _attention_lean,
        lambda net: replace_layer(net, 1, AttentionLeanRecomputeNotCausal(
            2, backward="lean", block_size=4)),
        "layers[1] (AttentionLeanRecomputeNotCausal)",
        _ATTENTION,
    ),
])


@dataclasses.dataclass(frozen=True, repr=False)
class TransformerBlockSkipDropped(layers.TransformerBlock):
    """The attention branch's skip gradient dropped: x + Attn(LN(x)) backpropagated as Attn only."""

    def body(self, C):
        block = super().body(C)
        attention, mlp = block.layers
        return Sequential([ResidualSkipGradientDropped(attention.body), mlp])


def _gpt_block():
    net = Sequential([layers.Embedding(7, 8, std=0.5), layers.PositionEmbedding(6, 8),
                      layers.TransformerBlock(2), layers.LayerNorm(), layers.Dense(7)],
                     loss=losses.SoftmaxCrossEntropy())
    params = net.init(jax.random.key(3), (5,))
    rng = np.random.default_rng(12)
    params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape), params)
    ids = jnp.asarray(rng.integers(0, 7, (2, 5)))
    return net, params, ids, jnp.asarray(rng.integers(0, 7, (2, 5)))


MUTATIONS.append(Mutation(
    "transformer block: the attention branch's skip gradient dropped",
    _gpt_block,
    lambda net: replace_layer(net, 2, TransformerBlockSkipDropped(2)),
    "layers[2].layers[0] (ResidualSkipGradientDropped)",
    # the branch itself is right; everything below the residual's input is wrong
    frozenset({"layers[2].layers[0].dx", "layers[2].dx", "layers[1].dx", "layers[1].P",
               "layers[0].W"}),
))
