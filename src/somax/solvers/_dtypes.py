"""``solve_dtype`` option shared by the direct solvers (row-Cholesky, dense Cholesky/eigh)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["check_solve_dtype", "solve_dtype_for"]

_NAMES = ("float32", "float64")


def check_solve_dtype(where: str, solve_dtype: Any) -> str | None:
    """Validate ``solve_dtype``: ``None`` (the problem's own dtype), ``"float32"`` or ``"float64"``.

    ``"float64"`` needs ``jax_enable_x64``; without it JAX would silently compute in
    float32, so that is an error here, at assembly.
    """
    if solve_dtype is None:
        return None
    name = jnp.dtype(solve_dtype).name if not isinstance(solve_dtype, str) else solve_dtype
    if name not in _NAMES:
        raise ValueError(f"{where}: solve_dtype must be None, 'float32' or 'float64', got {solve_dtype!r}")
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"{where}: solve_dtype='float64' needs float64 enabled "
            f"(jax.config.update('jax_enable_x64', True)); otherwise pass solve_dtype=None or 'float32'"
        )
    return name


def solve_dtype_for(solve_dtype: str | None, default: Any) -> jnp.dtype:
    """The dtype a solve runs in: ``solve_dtype`` if set, else ``default`` (at least float32)."""
    if solve_dtype is not None:
        return jnp.dtype(solve_dtype)
    return jnp.dtype(jnp.result_type(jnp.float32, default))
