"""Test configuration: float64 available everywhere, loud broadcasting, repeatable hypothesis runs.

Float64 is enabled for the whole suite; float32 tests ask for float32 explicitly.
``jax_numpy_rank_promotion="raise"`` turns silent rank broadcasting into errors.

The suite's programs are small and most run once, so compiling them costs more than
running them. XLA:CPU compiles loop fusions about a third faster with its older
emitters (``--xla_cpu_use_fusion_emitters=false``: the same HLO, other code
generation), and faster again without LLVM's optimisation passes
(``--xla_backend_optimization_level=0``, which the property tests' programs already
asked for one by one: the same HLO passes, unoptimised machine code, no fast-math), so
the suite asks for both in ``XLA_FLAGS``, which notebooks' kernels and the CLI's
subprocesses inherit. An XLA that no longer knows a flag would abort at start-up, so a
child Python first checks that they are accepted; the answer travels to pytest-xdist's
workers in the environment.
"""

import os
import subprocess
import sys

FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def _fast_compile_flags():
    """``XLA_FLAGS`` with ``FAST_COMPILE_FLAGS`` added when this XLA accepts them."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FAST_COMPILE_FLAGS in flags or os.environ.get("JAXBP_TEST_FLAGS_CHECKED"):
        return flags
    trial = f"{flags} {FAST_COMPILE_FLAGS}".strip()
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": trial, "JAX_PLATFORMS": "cpu"},
        capture_output=True, timeout=120,
    )
    os.environ["JAXBP_TEST_FLAGS_CHECKED"] = "1"
    return trial if probe.returncode == 0 else flags


os.environ["XLA_FLAGS"] = _fast_compile_flags()  # before JAX starts its backend

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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


def pytest_collection_modifyitems(config, items):
    """The notebooks (8–30 s each, the suite's longest tests) first, so that pytest-xdist's
    workers start on them and the short tests fill in the end of the run evenly."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_notebooks.py")
