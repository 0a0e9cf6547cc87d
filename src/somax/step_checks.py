"""Trace-time checks of a step's inputs; each error names the offending entry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["check_params", "check_rng", "check_state", "check_batch", "describe_batch"]


def check_params(params: PyTree, where: str = "step") -> None:
    """Every parameter is a floating array (not a Python number, not an integer array)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            raise TypeError(
                f"{where}: params{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array; every "
                f"parameter must be a floating array (e.g. jnp.asarray(value, jnp.float32))"
            )
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: params{jax.tree_util.keystr(path)} has dtype {dtype}; every parameter must be a floating "
                f"array (keep integer or boolean constants out of params, e.g. in the model or the batch)"
            )


def check_rng(rng: Any) -> None:
    """``rng`` is one PRNG key (typed or raw ``uint32[2]``)."""
    dtype, shape = jnp.result_type(rng), jnp.shape(rng)
    typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if not (typed and shape == ()) and not (dtype == jnp.uint32 and shape == (2,)):
        raise TypeError(
            f"step: rng must be one PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)), got {dtype}{list(shape)}"
        )


def check_state(init: Callable[[PyTree], Any], params: PyTree, state: Any) -> None:
    """``state`` has the structure, shapes and dtypes ``init(params)`` gives (model state aside)."""
    expected = jax.eval_shape(lambda p: init(p)._replace(model_state=()), params)
    got = state._replace(model_state=())
    for field in type(state)._fields:
        e_leaves, e_tree = jax.tree_util.tree_flatten_with_path(getattr(expected, field))
        g_leaves, g_tree = jax.tree_util.tree_flatten_with_path(getattr(got, field))
        if e_tree != g_tree:
            raise ValueError(
                f"step: state.{field} has structure {g_tree}, but method.init(params) gives {e_tree}; "
                f"was the state created by this method's init for these params?"
            )
        for (path, e), (_, g) in zip(e_leaves, g_leaves, strict=True):
            g_shape, g_dtype = jnp.shape(g), jnp.result_type(g)
            if g_shape != e.shape or g_dtype != e.dtype:
                where = f"state.{field}{jax.tree_util.keystr(path)}"
                raise ValueError(
                    f"step: {where} is {g_dtype}{list(g_shape)}, but method.init(params) gives "
                    f"{e.dtype}{list(e.shape)}; were params reshaped or cast after init?"
                )


def check_batch(batch: Any) -> None:
    """No array in the batch has an empty leading (batch) axis."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = getattr(leaf, "shape", None)
        if shape and shape[0] == 0:
            raise ValueError(
                f"step: batch{jax.tree_util.keystr(path)} is empty ({jnp.result_type(leaf)}{list(shape)}); "
                f"a step needs at least one example"
            )


def describe_batch(batch: Any) -> str:
    """``['x']: float32[8, 4], ['y']: int32[8]`` for error messages."""

    def one(x: Any) -> str:
        return f"{x.dtype}{list(x.shape)}" if hasattr(x, "dtype") and hasattr(x, "shape") else type(x).__name__

    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    parts = [f"{jax.tree_util.keystr(p) or 'batch'}: {one(x)}" for p, x in leaves]
    return ", ".join(parts[:8]) + (", …" if len(parts) > 8 else "")
