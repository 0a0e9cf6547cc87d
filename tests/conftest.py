"""Test configuration: float64 is enabled for the whole suite so dense oracles are exact.

Tests that exercise float32 paths create float32 arrays explicitly.
"""

import jax

jax.config.update("jax_enable_x64", True)
