"""Data parallelism with JAX's own sharding: the batch split over a ``data`` axis.

A one-dimensional ``jax.sharding.Mesh`` names its axis ``"data"``. Parameters,
optimizer state and the dataset are replicated on every device
(``PartitionSpec()``); each step's batch is split along its leading axis
(``PartitionSpec("data")``), so device d holds rows ``d·B/D … (d+1)·B/D − 1``.
XLA's SPMD partitioner then runs the forward and the hand-written backward on
each shard and inserts the all-reduce that sums ``dW = xᵀ dy`` over the shards,
so every device applies the same update. Nothing in the layers knows about it.

Several hosts: call ``jax.distributed.initialize()`` at the start of every
process; ``jax.devices()`` then lists the devices of all hosts and the same mesh
spans them. Each process must load the same data with the same seed, since the
dataset is replicated.

Example:
  >>> import numpy as np
  >>> mesh = data_mesh(1)      # one device: no mesh, plain device placement
  >>> mesh is None
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .layers.base import is_int

AXIS = "data"


def data_mesh(devices: int | None = None) -> Mesh | None:
    """A 1-D mesh over the first ``devices`` devices (``None``: all), or ``None`` for one."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not is_int(n) or not 1 <= n <= len(available):
        raise ValueError(
            f"parallel: devices must be an int in [1, {len(available)}] (the visible "
            f"{available[0].platform} devices); got {devices!r}"
        )
    if n == 1:
        return None
    return Mesh(np.array(available[:int(n)]), (AXIS,))


def devices(mesh: Mesh | None) -> list:
    """The mesh's devices, or the default device when there is no mesh."""
    return list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """Leading (batch) axis split over ``data``; ``None`` without a mesh."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    """A full copy on every device; ``None`` without a mesh."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def _put(a, sharding):
    """``a`` placed by ``sharding``; across hosts, every process passes the same global value."""
    if sharding is None or sharding.is_fully_addressable:
        return jax.device_put(a, sharding)
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(a)
        return jax.random.wrap_key_data(_put(jax.random.key_data(a), sharding), impl=impl)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh | None = None):
    """Put every array of ``tree`` on all devices of ``mesh`` (or the default device)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: _put(a, sharding), tree)


def shard_batch(batch, mesh: Mesh | None = None):
    """Put every array of ``batch`` split along its leading axis over ``mesh``."""
    for a in jax.tree.leaves(batch):
        if np.ndim(a) == 0:
            raise ValueError(
                "parallel.shard_batch: every array needs a leading batch axis to split; "
                f"got a {np.result_type(a)} scalar (shape ())"
            )
        if mesh is not None and a.shape[0] % mesh.size:
            raise ValueError(
                f"parallel: batch of {a.shape[0]} rows cannot be split evenly over "
                f"{mesh.size} devices"
            )
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: _put(a, sharding), batch)
