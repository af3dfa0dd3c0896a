"""Test configuration: float64 available everywhere, loud broadcasting, repeatable hypothesis runs.

Float64 is enabled for the whole suite; float32 tests ask for float32 explicitly.
``jax_numpy_rank_promotion="raise"`` turns silent rank broadcasting into errors.
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "repeatable",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
