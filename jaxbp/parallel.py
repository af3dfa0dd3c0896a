"""Data parallelism with JAX's own sharding: the batch split over a ``data`` axis.

A one-dimensional ``jax.sharding.Mesh`` names its axis ``"data"``. Parameters,
optimizer state and the dataset are replicated on every device
(``PartitionSpec()``); each step's batch is split along its leading axis
(``PartitionSpec("data")``), so device d holds rows ``d·B/D … (d+1)·B/D − 1``.
XLA's SPMD partitioner then runs the forward and the hand-written backward on
each shard and inserts the all-reduce that sums ``dW = xᵀ dy`` over the shards,
so every device applies the same update. Nothing in the layers knows about it.

Several hosts: call ``initialize`` (``jax.distributed.initialize``) at the start
of every process, before anything else touches JAX; ``jax.devices()`` then lists
the devices of all hosts and the mesh spans them, taking the same number of
devices from every process. Each process must load the same data with the same
seed, since the dataset is replicated. On CPU the cross-process all-reduce runs
over Gloo (TCP), JAX's default ``jax_cpu_collectives_implementation``. ``agree``
lets the processes find out, before the first collective, whether each of them
can go on, so that one that stops (a file missing on its host) cannot leave the
others waiting for it.

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
    """A 1-D mesh over ``devices`` devices (``None``: all), or ``None`` for one device.

    One process takes its first ``devices`` devices. Several processes each take
    the same number of their own devices, the first ``devices / processes`` of
    each, so ``devices`` must be a multiple of the process count: a mesh without
    devices of some process would leave that process nothing to compute with.
    """
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not is_int(n) or not 1 <= n <= len(available):
        raise ValueError(
            f"parallel: devices must be an int in [1, {len(available)}] (the visible "
            f"{available[0].platform} devices); got {devices!r}"
        )
    n, processes = int(n), jax.process_count()
    if processes == 1:
        return None if n == 1 else Mesh(np.array(available[:n]), (AXIS,))
    own = [[d for d in available if d.process_index == p] for p in range(processes)]
    per_process = min(len(mine) for mine in own)
    if n % processes or n // processes > per_process:
        choices = ", ".join(str(k * processes) for k in range(1, per_process + 1))
        raise ValueError(
            f"parallel: devices must be spread evenly over the {processes} processes, the "
            f"same number from each: one of {choices}; got {n}"
        )
    return Mesh(np.array([d for mine in own for d in mine[:n // processes]]), (AXIS,))


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


# ------------------------------------------------------------ several hosts

# Cluster environments whose settings jax.distributed.initialize() detects itself.
CLUSTERS = "Slurm, Open MPI, Kubernetes, Cloud TPU"


def is_host_port(text: str) -> bool:
    """``HOST:PORT`` with a port in [1, 65535] (an IPv6 host in brackets)."""
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a run of several processes: ``jax.distributed.initialize`` with these arguments.

    Call it in every process before anything else uses JAX. Process 0 serves the
    coordinator at ``coordinator`` (``"HOST:PORT"``, the same in every process);
    ``process_id`` is this process's index in ``[0, num_processes)``. Whatever is
    ``None`` JAX takes from the cluster environment it detects (Slurm, Open MPI,
    Kubernetes, Cloud TPU). It returns once all ``num_processes`` have joined
    (JAX gives up after 300 s).

    Raises:
      ValueError: an argument is out of range, or ``None`` outside a cluster
        environment JAX detects.
      RuntimeError: (JAX's) something has used JAX already, or this is a second call.

    In process 0 of 2, ``initialize("10.0.0.1:1234", 2, 0)``; process 1 passes 1.
    """
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    if coordinator is not None and not is_host_port(coordinator):
        raise ValueError(f"parallel.initialize: coordinator must be 'HOST:PORT' with a port in "
                         f"[1, 65535]; got {coordinator!r}")
    if num_processes is not None and not (is_int(num_processes) and num_processes >= 1):
        raise ValueError(f"parallel.initialize: num_processes must be a positive int; "
                         f"got {num_processes!r}")
    if process_id is not None and not (
            is_int(process_id) and 0 <= process_id < (num_processes or np.inf)):
        raise ValueError(f"parallel.initialize: process_id must be an int in "
                         f"[0, {num_processes or 'num_processes'}); got {process_id!r}")
    try:
        jax.distributed.initialize(
            coordinator, None if num_processes is None else int(num_processes),
            None if process_id is None else int(process_id),
        )
    except ValueError:  # JAX: "coordinator_address should be defined." and the like
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise ValueError(f"parallel.initialize: {missing} not given, and no cluster environment "
                         f"JAX detects ({CLUSTERS}) sets them") from None


_KEY = "jaxbp/agree/{point}/{process}"
_reported: set[str] = set()


def agree(point: str, problem: str | None = None, *, same: str = "",
          timeout_s: float = 300) -> None:
    """Tell the other processes whether this one goes on past ``point``, and hear from them.

    Every process calls it at the same ``point`` before the first collective
    that follows. With ``problem=None`` it waits until every other process has
    reported (at most ``timeout_s``) and raises ``ValueError`` naming the first
    that reported a problem, or whose ``same`` (a description of what all must
    share, such as the state they start from) differs from this one's; a process
    that stops passes its ``problem`` and is not kept waiting. It talks through
    the coordinator's key-value store, not a collective, so it returns even when
    another process has stopped. A process reports a point once; later calls
    for it do nothing. One process: nothing to do.

    Raises:
      ValueError: another process reported a problem or another ``same``, or did
        not report within ``timeout_s``.

    Example:
      >>> agree("data loaded", same="digits")  # one process: nobody to wait for
    """
    count = jax.process_count()
    if count == 1 or point in _reported:
        return
    from jax._src import distributed  # its client is how multihost_utils reaches the store

    client, me = distributed.global_state.client, jax.process_index()
    mine = "go " + same if problem is None else "stop " + problem
    client.key_value_set(_KEY.format(point=point, process=me), mine)
    _reported.add(point)
    if problem is not None:
        return
    for process in range(count):
        if process == me:
            continue
        try:
            theirs = client.blocking_key_value_get(_KEY.format(point=point, process=process),
                                                   int(timeout_s * 1000))
        except jax.errors.JaxRuntimeError:
            raise ValueError(f"process {process} of {count} did not reach {point} within "
                             f"{timeout_s:g} s") from None
        verdict, _, text = theirs.partition(" ")
        if verdict == "stop":
            raise ValueError(f"process {process} of {count}: {text}")
        if text != same:
            raise ValueError(f"process {process} of {count} differs from process {me}: "
                             f"{text} there, {same} here")
