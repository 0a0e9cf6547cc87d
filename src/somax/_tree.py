"""Small pytree linear-algebra helpers used by solvers, estimators and the step.

All functions are pure and operate leaf-wise; reductions return scalars in the
widest floating dtype present so that float64 runs stay float64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = [
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_vdot",
    "tree_norm",
    "tree_zeros_like",
    "tree_where",
    "tree_mul",
    "tree_div",
    "tree_all_finite",
    "scalar_dtype",
]


# Operators rather than jnp ufuncs / jnp.where: identical programs, but each jnp call traces
# through a jitted wrapper, which adds up in a step with hundreds of leaf-wise ops.


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, y: x + y, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, y: x - y, a, b)


def tree_scale(c: jax.Array | float, a: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: (c * x).astype(x.dtype), a)


def tree_axpy(c: jax.Array | float, x: PyTree, y: PyTree) -> PyTree:
    """Return ``c * x + y`` leaf-wise, keeping each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a, b: (c * a + b).astype(b.dtype), x, y)


def tree_mul(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.multiply, a, b)


def tree_div(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.divide, a, b)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Euclidean inner product ``<a, b>`` of two pytrees of identical structure."""
    parts = [_leaf_dot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    if not parts:
        return jnp.zeros(())
    return sum(parts[1:], parts[0])


def _leaf_dot(x: jax.Array, y: jax.Array) -> jax.Array:
    # half-precision leaves (bfloat16 parameters) are accumulated in float32
    dt = jnp.result_type(x, y)
    if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32:
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    return jnp.vdot(x, y)


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(a, a))


def tree_size(a: PyTree) -> int:
    """Number of entries over all leaves (static)."""
    return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(a)))


def tree_zeros_like(a: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, a)


def tree_where(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a if pred else b`` for a scalar boolean ``pred``."""
    pred = jnp.asarray(pred)

    def pick(x: Any, y: Any) -> Any:
        if x is y:  # unchanged leaf (e.g. constant λ, kept counters): no select to trace
            return x
        x, y = jnp.asarray(x), jnp.asarray(y)
        if pred.shape == () and x.dtype == y.dtype and x.shape == y.shape:
            return jax.lax.select(pred, x, y)
        return jnp.where(pred, x, y)

    return jax.tree_util.tree_map(pick, a, b)


def tree_all_finite(a: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(a)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(leaves))


def scalar_dtype(tree: PyTree) -> jnp.dtype:
    """Dtype for scalars (λ, rho, metrics) that go with ``tree``.

    The widest floating dtype among the leaves, but never narrower than float32:
    bfloat16 parameters get float32 control scalars, float64 parameters get float64.
    """
    dtypes = [x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    out = jnp.result_type(jnp.float32, *dtypes) if dtypes else jnp.dtype(jnp.float32)
    return jnp.dtype(out)
