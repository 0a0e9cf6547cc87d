"""Line search: a post-direction policy on the applied update, composable with every lane.

Given the update ``u_t`` from the Optax chain, choose ``α`` and apply ``α u_t``:

* ``grid``: ``α ∈ {2^(−i/2) : i = 0, …, n−1}``; all ``L_B(w + α_i u)`` are evaluated
  in one vectorised pass on the step's batch and the argmin is taken.
* ``armijo``: backtracking from ``α_0`` by ``shrink`` until
  ``L_B(w + αu) ≤ L_B(w) + c·α·gᵀu`` or ``max_steps`` trials (then the last α).

Either returns ``(α, L_B(w + αu))``; the step reuses that loss as ``loss_after``,
so an enabled rho bundle costs no further forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax import validate
from somax._tree import tree_axpy, tree_vdot
from somax.contracts import LineSearch
from somax.registry import LINE_SEARCHES

__all__ = ["GridLineSearch", "ArmijoLineSearch", "grid", "armijo"]


def _loss_along(lin, params: Any, updates: Any):
    return lambda alpha: lin.loss_at(tree_axpy(alpha, updates, params))


@dataclass(frozen=True, kw_only=True)
class GridLineSearch(LineSearch):
    """Argmin of the batch loss over ``α_i = 2^(−i/2)``, ``i < n`` (one vmapped pass)."""

    n: int = 8

    def __post_init__(self) -> None:
        validate.integer("LineSearchSpec('grid'): n", self.n, minimum=1)

    def search(self, lin, params: Any, updates: Any, dtype) -> tuple[jax.Array, jax.Array]:
        alphas = 2.0 ** (-jnp.arange(self.n, dtype=dtype) / 2)
        losses = jax.vmap(_loss_along(lin, params, updates))(alphas).astype(dtype)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        i = jnp.argmin(losses)
        return alphas[i], losses[i]


@dataclass(frozen=True, kw_only=True)
class ArmijoLineSearch(LineSearch):
    """Backtracking until the Armijo sufficient-decrease condition holds."""

    c: float = 1e-4
    shrink: float = 0.5
    alpha0: float = 1.0
    max_steps: int = 10

    def __post_init__(self) -> None:
        open_unit = {"minimum": 0.0, "maximum": 1.0, "exclusive_minimum": True, "exclusive_maximum": True}
        validate.number("LineSearchSpec('armijo'): shrink", self.shrink, **open_unit)
        validate.number("LineSearchSpec('armijo'): c", self.c, **open_unit)
        validate.number("LineSearchSpec('armijo'): alpha0", self.alpha0, minimum=0.0, exclusive_minimum=True)
        validate.integer("LineSearchSpec('armijo'): max_steps", self.max_steps, minimum=1)

    def search(self, lin, params: Any, updates: Any, dtype) -> tuple[jax.Array, jax.Array]:
        f = _loss_along(lin, params, updates)
        f0 = lin.loss.astype(dtype)
        slope = tree_vdot(lin.grad, updates).astype(dtype)  # gᵀu < 0 for a descent update

        def bad(a, fa):
            return ~(fa <= f0 + self.c * a * slope)  # also true for nan

        def cond(c):
            i, a, fa = c
            return (i < self.max_steps - 1) & bad(a, fa)

        def body(c):
            i, a, _ = c
            a = a * self.shrink
            return i + 1, a, f(a).astype(dtype)

        a0 = jnp.asarray(self.alpha0, dtype)
        _, a, fa = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), a0, f(a0).astype(dtype)))
        return a, fa


#: the registered factories (keyword options as the classes' fields)
grid = GridLineSearch
armijo = ArmijoLineSearch

LINE_SEARCHES.register("grid", GridLineSearch)
LINE_SEARCHES.register("armijo", ArmijoLineSearch)
