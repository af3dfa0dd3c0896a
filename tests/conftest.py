"""Test configuration: float64 available everywhere, loud broadcasting, CI-stable hypothesis.

Set ``XLA_FLAGS`` yourself to run the suite with other XLA options.

Float64 is enabled for the whole suite; float32 tests ask for float32 explicitly.
``jax_numpy_rank_promotion="raise"`` turns silent rank broadcasting into errors.
"""

import os

# The suite compiles many tiny programs; XLA's backend optimisations cost more compile
# time than they save at run time for them, and they do not change the mathematics.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
