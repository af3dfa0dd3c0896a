"""Shared assertions for gradient tests."""

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
