"""Shared assertions and random parameters for gradient tests, and a runner for simulated
multi-device scripts."""

import json
import os
import subprocess
import sys

import jax
import numpy as np


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

    ``jax.eval_shape`` only traces ``init``: running it eagerly would compile a kernel
    for every new shape, which costs more than the check it feeds. Biases (rank 1)
    are standard normal, so they are never all zero.
    """
    shapes = jax.eval_shape(lambda k: net.init(k, input_shape, dtype), jax.random.key(0))

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)

    return jax.tree.map(draw, shapes)


def run_on_cpu_devices(script: str, devices: int = 4):
    """Run ``script`` in a fresh Python with ``devices`` simulated CPU devices.

    The device count is fixed when JAX starts, hence the subprocess. The script
    prints one line ``RESULT <json>``; its decoded JSON is returned.
    """
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(li for li in proc.stdout.splitlines() if li.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
