"""Tiny pure-JAX reference models used by the examples, tests and benchmarks.

Parameters are plain dicts of arrays; ``mlp_apply(params, x)`` and ``cnn_apply(params, x)``
are ``predict_fn``s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["mlp_init", "mlp_apply", "cnn_init", "cnn_apply"]


def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    # A flat draw, reshaped: the same numbers (partitionable threefry, the default), but
    # XLA:CPU compiles a 4-D draw about 3x slower (1.6 s for a 3x3x1x8 kernel).
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


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


def cnn_init(
    key: jax.Array,
    *,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 16),
    image_size: int = 8,
    num_classes: int = 10,
    dtype=jnp.float32,
) -> dict[str, dict[str, jax.Array]]:
    """He-initialised small CNN: 3×3 convolutions (stride 1, then 2, …), flatten, dense.

    Kernels use the Flax layout ``(H, W, in, out)``; inputs are NHWC ``(B, H, W, C)``.
    """
    params = {}
    keys = jax.random.split(key, len(channels) + 1)
    c_in, size = in_channels, image_size
    for i, (k, c_out) in enumerate(zip(keys[:-1], channels)):
        std = jnp.sqrt(2.0 / (9 * c_in)).astype(dtype)
        params[f"conv{i}"] = {
            "w": _normal(k, (3, 3, c_in, c_out), dtype) * std,
            "b": jnp.zeros((c_out,), dtype),
        }
        c_in = c_out
        if i > 0:
            size = -(-size // 2)
    n_flat = size * size * c_in
    w = jax.random.normal(keys[-1], (n_flat, num_classes), dtype) * jnp.sqrt(1.0 / n_flat).astype(dtype)
    params["dense"] = {"w": w, "b": jnp.zeros((num_classes,), dtype)}
    return params


def cnn_apply(params: dict, x: jax.Array) -> jax.Array:
    """Forward pass of :func:`cnn_init`'s network on NHWC images; returns logits ``(B, classes)``."""
    h = x
    n_conv = len(params) - 1
    for i in range(n_conv):
        layer = params[f"conv{i}"]
        stride = 1 if i == 0 else 2
        h = jax.lax.conv_general_dilated(
            h, layer["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + layer["b"])
    h = h.reshape(h.shape[0], -1)
    return h @ params["dense"]["w"] + params["dense"]["b"]
