"""Tiny pure-JAX reference models used by the examples, tests and benchmarks.

Parameters are plain dicts of arrays; ``mlp_apply(params, x)`` is a ``predict_fn``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["mlp_init", "mlp_apply"]


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:
    """He-initialised MLP with layer sizes ``sizes = (d_in, h_1, …, d_out)``."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        w = jax.random.normal(k, (n_in, n_out), dtype) * jnp.sqrt(2.0 / n_in).astype(dtype)
        params[f"layer{i}"] = {"w": w, "b": jnp.zeros((n_out,), dtype)}
    return params


def mlp_apply(params: dict, x: jax.Array, activation=jax.nn.relu) -> jax.Array:
    """Forward pass; the last layer is linear. Returns ``(B, d_out)``."""
    n = len(params)
    h = x
    for i in range(n):
        layer = params[f"layer{i}"]
        h = h @ layer["w"] + layer["b"]
        if i < n - 1:
            h = activation(h)
    return h
