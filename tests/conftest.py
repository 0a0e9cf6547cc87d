"""Test configuration: float64 is enabled for the whole suite so dense oracles are exact.

Tests that exercise float32 paths create float32 arrays explicitly.
"""

import os
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# Compiled programs are shared between tests and the two xdist workers through JAX's persistent
# compilation cache (keyed by the program, the compile options and the JAX version, so a hit is
# the same executable): the suite is compile-bound, and this saves about 7 % of its CPU time.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "somax-tests-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def fast_compile():
    """XLA with most optimisations off, for smoke tests whose cost is compilation and whose numbers are
    not compared with a recorded or exact value; caches are cleared afterwards so no executable compiled
    this way is reused by a later test."""
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
        jax.clear_caches()
