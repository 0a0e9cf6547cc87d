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

from somax._tree import tree_axpy, tree_vdot
from somax.registry import LINE_SEARCHES

__all__ = ["GridLineSearch", "ArmijoLineSearch", "grid", "armijo"]


def _loss_along(lin, params: Any, updates: Any):
    return lambda alpha: lin.loss_at(tree_axpy(alpha, updates, params))


@dataclass(frozen=True)
class GridLineSearch:
    """Argmin of the batch loss over ``α_i = 2^(−i/2)``, ``i < n`` (one vmapped pass)."""

    n: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"LineSearchSpec('grid'): n must be an int >= 1, got {self.n!r}")

    def search(self, lin, params: Any, updates: Any, dtype) -> tuple[jax.Array, jax.Array]:
        alphas = 2.0 ** (-jnp.arange(self.n, dtype=dtype) / 2)
        losses = jax.vmap(_loss_along(lin, params, updates))(alphas).astype(dtype)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        i = jnp.argmin(losses)
        return alphas[i], losses[i]


@dataclass(frozen=True)
class ArmijoLineSearch:
    """Backtracking until the Armijo sufficient-decrease condition holds."""

    c: float = 1e-4
    shrink: float = 0.5
    alpha0: float = 1.0
    max_steps: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.shrink < 1:
            raise ValueError(f"LineSearchSpec('armijo'): shrink must be in (0, 1), got {self.shrink}")
        if not 0 < self.c < 1:
            raise ValueError(f"LineSearchSpec('armijo'): c must be in (0, 1), got {self.c}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"LineSearchSpec('armijo'): max_steps must be an int >= 1, got {self.max_steps!r}")

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


def grid(*, n: int = 8) -> GridLineSearch:
    """Factory for :class:`GridLineSearch` (``"grid"``)."""
    return GridLineSearch(n)


def armijo(*, c: float = 1e-4, shrink: float = 0.5, alpha0: float = 1.0, max_steps: int = 10) -> ArmijoLineSearch:
    """Factory for :class:`ArmijoLineSearch` (``"armijo"``)."""
    return ArmijoLineSearch(c, shrink, alpha0, max_steps)


LINE_SEARCHES.register("grid", grid)
LINE_SEARCHES.register("armijo", armijo)
