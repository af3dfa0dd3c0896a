"""The custom_vjp bridge: ``net.loss`` whose reverse-mode derivative is the hand-written one.

``with_manual_grad(net)`` returns ``f(params, x, y, ...) = net.loss(params, x, y, ...)``
registered with ``jax.custom_vjp``; its backward rule runs
``net.manual_backward_with_signals``, so ``jax.grad``, ``jax.value_and_grad``,
``jax.vmap`` (per-example gradients) and optax pipelines, jitted or not, all use
the manual backward pass instead of autodiff's:

  ∂f/∂params = ḡ · manual_backward(params, x, y)
  ∂f/∂x      = ḡ · signals[0]   (the signal the first layer's backward returns)
  ∂f/∂y      = 0            (targets and labels are data, never differentiated)

with ḡ the incoming cotangent (1 under ``jax.grad``). The manual backward is
plain JAX, so reverse-over-reverse works too (``jax.grad`` of a function of
``jax.grad(f)``); forward mode (``jax.jvp``) of a ``custom_vjp`` function is not
defined by JAX — take ``jax.jvp`` of ``net.manual_backward`` directly instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _scale(g, tree):
    return jax.tree.map(lambda a: g * a, tree)


@functools.cache
def with_manual_grad(net):
    """``net.loss`` with a ``jax.custom_vjp`` backward that runs the manual backward pass.

    Takes what ``net.loss`` takes, ``f(params, x, y, state=None, key=None,
    train=False)``; ``state`` and ``key`` get no gradient. Cached per network, so
    jitted callers never recompile for an equal network.

    Example:
      >>> import jax
      >>> from jaxbp import models, with_manual_grad
      >>> net, params, x, y = models.worked_example()
      >>> loss = with_manual_grad(net)
      >>> grads = jax.grad(loss)(params, x, y)  # runs net.manual_backward_with_signals
      >>> grads[2]["W"].shape
      (2, 2)
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def loss_with_manual_grad(params, x, y, state=None, key=None, train=False):
        return net.loss(params, x, y, state=state, key=key, train=train)

    def fwd(params, x, y, state, key, train):
        J = net.loss(params, x, y, state=state, key=key, train=train)
        return J, (params, x, y, state, key)

    def bwd(train, saved, g):
        params, x, y, state, key = saved
        grads, signals = net.manual_backward_with_signals(params, x, y, state=state, key=key,
                                                          train=train)
        dx = _scale(g, signals[0]) if jnp.issubdtype(x.dtype, jnp.floating) else None
        return _scale(g, grads), dx, None, None, None

    loss_with_manual_grad.defvjp(fwd, bwd)
    return loss_with_manual_grad
