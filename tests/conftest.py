"""Test configuration: float64 is enabled for the whole suite so dense oracles are exact.

Tests that exercise float32 paths create float32 arrays explicitly.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


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
