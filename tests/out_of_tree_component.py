"""A preconditioner written outside the library, as a user would: it touches no file in ``src/``.

``AbsGradient`` produces a statistic of its own (``"abs_gradient"``: ``|g_t|``).
``HistoryJacobi`` consumes it into a running sum on the estimator's cadence, rebuilds its
scaling ``D = 1 + mean|g|`` on its own ``refresh_every_k`` cadence, applies
``M⁻¹ v = v / (D + λ)`` with the current λ at every step, records the applied updates of
accepted steps through the post-step hook and reports how many it has recorded as a new
``StepInfo`` field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import somax
from somax.contracts import Estimator, Preconditioner
from somax.telemetry import InfoField


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsGradient(Estimator):
    every_k: int = 2

    produces = "abs_gradient"
    uses_rng = False

    def estimate(self, lin, rng, state):
        return jax.tree_util.tree_map(jnp.abs, lin.grad), state


class HistoryState(NamedTuple):
    total: Any  # Σ |g| over the updates (params-shaped)
    updates: jax.Array  # statistics folded in
    scale: Any  # D, rebuilt at refreshes (params-shaped)
    refreshes: jax.Array
    recorded: jax.Array  # accepted steps seen by the post-step hook
    update_sq: jax.Array  # Σ ‖u‖² over the accepted steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistoryJacobi(Preconditioner):
    refresh_every_k: int = 3

    consumes = ("abs_gradient",)
    default_estimator = "abs_gradient_test"
    info_keys = ("history_steps",)
    info_fields = {"history_steps": InfoField("int", "accepted steps recorded by HistoryJacobi")}

    def init(self, params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        ones = jax.tree_util.tree_map(jnp.ones_like, params)
        z = jnp.zeros((), jnp.int32)
        return HistoryState(zeros, z, ones, z, z, jnp.zeros((), jax.tree_util.tree_leaves(params)[0].dtype))

    def update(self, state, statistic, lin):
        total = jax.tree_util.tree_map(jnp.add, state.total, statistic)
        return state._replace(total=total, updates=state.updates + 1)

    def refresh(self, state):
        n = jnp.maximum(state.updates, 1).astype(state.update_sq.dtype)
        scale = jax.tree_util.tree_map(lambda t: 1.0 + t / n, state.total)
        return state._replace(scale=scale, refreshes=state.refreshes + 1)

    def inverse(self, state, lam):
        return lambda v: jax.tree_util.tree_map(lambda a, d: a / (d + lam), v, state.scale)

    def post_step(self, state, update, accepted, lin):
        sq = sum(jnp.vdot(u, u) for u in jax.tree_util.tree_leaves(update))
        return state._replace(
            recorded=state.recorded + jnp.where(accepted, 1, 0).astype(jnp.int32),
            update_sq=state.update_sq + jnp.where(accepted, sq, 0.0).astype(state.update_sq.dtype),
        )

    def info(self, state):
        return {"history_steps": state.recorded}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RollbackHistoryJacobi(HistoryJacobi):
    """The same, declaring that a rejected step leaves its state exactly as before the step."""

    on_reject = "rollback"


def register() -> None:
    for family, name, factory in (
        ("estimator", "abs_gradient_test", AbsGradient),
        ("precond", "history_jacobi_test", HistoryJacobi),
        ("precond", "rollback_history_jacobi_test", RollbackHistoryJacobi),
    ):
        try:
            somax.register(family, name, factory)
        except ValueError:  # registered already (the module is imported twice under xdist / subprocesses)
            pass
