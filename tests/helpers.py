"""Shared assertions and random parameters for gradient tests, and runners for scripts on
simulated CPU devices: in one process, or as several processes of one JAX job."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxbp.layers import Layer

# Compiler options for the checks' programs: small, and each runs once, so LLVM's
# optimisations would cost more compile time than they save in run time. Caution: at
# level 0, XLA:CPU (jax 0.10.2) may compute one x @ W + b differently in two places of a
# program, so autodiff of max(z) there can find no maximum and give NaN (a loud failure,
# never a silent pass); test_nested.py compiles such programs at level 1.
RUN_ONCE = {"xla_backend_optimization_level": 0}


def rel_error(a, b) -> float:
    """max|a − b| / max(max|b|, tiny): the per-leaf relative error used everywhere."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def max_tree_rel_error(a, b) -> float:
    """Largest per-leaf relative error between two pytrees of identical structure."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (
        jax.tree.structure(a),
        jax.tree.structure(b),
    )
    errs = [rel_error(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(errs, default=0.0)


def random_params(net, input_shape, rng, dtype=np.float64):
    """NumPy params of ``net.init``'s shapes and dtypes: standard normal, scaled by 1/√fan_in.

    ``net`` is a model (whose ``init`` returns the params) or a layer (whose ``init``
    returns ``(params, state, output_shape)``); params may nest (lists of dicts for
    ``Sequential`` blocks). ``jax.eval_shape`` only traces ``init``: running it eagerly
    would compile a kernel for every new shape, which costs more than the check it
    feeds. Biases (rank 1) are standard normal, so they are never all zero.
    """
    if isinstance(net, Layer):
        def init(k):
            return net.init(k, input_shape, dtype)[0]
    else:
        def init(k):
            return net.init(k, input_shape, dtype)
    shapes = jax.eval_shape(init, jax.random.key(0))

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)

    return jax.tree.map(draw, shapes)


def _cpu_env(devices: int, **extra) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags.strip(),
                JAX_PLATFORMS="cpu", **extra)


def result(stdout: str):
    """The decoded JSON of the line ``RESULT <json>`` that a test script printed."""
    line = next(li for li in stdout.splitlines() if li.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_on_cpu_devices(script: str, devices: int = 4):
    """Run ``script`` in a fresh Python with ``devices`` simulated CPU devices.

    The device count is fixed when JAX starts, hence the subprocess. The script
    prints one line ``RESULT <json>``; its decoded JSON is returned.
    """
    proc = subprocess.run([sys.executable, "-c", script], env=_cpu_env(devices),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return result(proc.stdout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(command, processes: int = 2, devices: int = 1, timeout: float = 120,
                  environ=lambda coordinator, process_id: {}):
    """Run one JAX job as ``processes`` processes on 127.0.0.1, each with ``devices`` CPUs.

    ``command(coordinator, process_id)`` gives each process's argv and
    ``environ(coordinator, process_id)`` variables to add to its environment; the
    coordinator (``"127.0.0.1:PORT"``, a port free now) listens on loopback only.
    Returns their ``subprocess.CompletedProcess`` in process order; all are
    killed when they have not finished within ``timeout`` seconds. Skips the
    test where the host name does not resolve to a loopback address, so that
    every connection stays on this machine's loopback interface.
    """
    if not socket.gethostbyname(socket.gethostname()).startswith("127."):
        # Gloo connects the processes through the address the host name resolves to.
        pytest.skip("the host name does not resolve to a loopback address")
    coordinator = f"127.0.0.1:{free_port()}"
    env = _cpu_env(devices, JAX_COORDINATOR_BIND_ADDRESS=coordinator)
    procs = [subprocess.Popen(command(coordinator, i), env={**env, **environ(coordinator, i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    deadline = time.monotonic() + timeout
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        stderr = [p.stderr for p in done] + [proc.communicate()[1] for proc in procs[len(done):]]
        raise AssertionError(f"{processes} processes did not finish within {timeout} s; "
                             f"their stderr: {stderr}") from None
    return done
