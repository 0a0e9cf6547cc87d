"""The one step skeleton shared by every lane.

::

    linearize ─► gradient-side transform ─► (estimator, cadence-gated) ─► preconditioner
      ─► solve in the lane ─► Optax chain on the direction ─► apply
      ─► post-update probes (cadence-gated) ─► damping update / accept ─► state, info

Lanes differ only in the solver object that turns ``(linearization, g, λ, M⁻¹)``
into a direction ``s``. All branching on configuration happens here in Python,
at trace time, from the static plan; the traced step has no compatibility logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from somax._tree import scalar_dtype, tree_norm, tree_vdot, tree_where
from somax.plan import Plan, cadence_gate
from somax.telemetry import fill_info

PyTree = Any

__all__ = ["MethodState", "SecondOrderMethod"]


class MethodState(NamedTuple):
    """Persistent state of an assembled method: a plain pytree of arrays."""

    count: jax.Array
    solver: PyTree
    precond: PyTree
    damping: PyTree
    estimator: PyTree
    grad_tx: PyTree
    tx: PyTree


@dataclass(frozen=True)
class SecondOrderMethod:
    """An assembled method: ``init(params)`` and ``step(params, batch, state, rng)``.

    Build it with :func:`somax.assemble` or :func:`somax.make`. ``step`` is pure and
    jittable; wrap it in ``jax.jit`` or call it inside ``lax.scan``.
    """

    plan: Plan
    curvature: Any
    solver: Any
    precond: Any
    damping: Any
    estimator: Any
    tx: optax.GradientTransformation
    grad_tx: optax.GradientTransformation | None
    lam0: float

    def init(self, params: PyTree) -> MethodState:
        """Initial method state for ``params`` (λ in the parameters' scalar dtype, ≥ float32)."""
        return MethodState(
            count=jnp.zeros((), jnp.int32),
            solver=self.solver.init(params),
            precond=self.precond.init(params),
            damping=self.damping.init(self.lam0, scalar_dtype(params)),
            estimator=self.estimator.init(params) if self.estimator is not None else (),
            grad_tx=self.grad_tx.init(params) if self.grad_tx is not None else (),
            tx=self.tx.init(params),
        )

    def step(
        self, params: PyTree, batch: Any, state: MethodState, rng: jax.Array | None = None
    ) -> tuple[PyTree, MethodState, dict]:
        """One optimization step; returns ``(new_params, new_state, info)``."""
        plan = self.plan
        count = state.count
        fdt = scalar_dtype(params)

        lin = self.curvature.linearize(params, batch)
        g = lin.grad
        lam = state.damping.lam

        rhs, grad_tx_state = g, state.grad_tx
        if self.grad_tx is not None:
            rhs, grad_tx_state = self.grad_tx.update(g, state.grad_tx, params)

        precond_state, estimator_state = state.precond, state.estimator
        if self.precond.needs_diagonal:
            if self.estimator is None:
                precond_state = self.precond.update(precond_state, jax.tree_util.tree_map(jnp.square, g))
            else:
                if rng is None:
                    raise ValueError(f"step: the estimator {plan.components['estimator']!r} needs an rng; got rng=None")

                def refresh(_: None):
                    diag, est_state = self.estimator.diagonal(lin, jax.random.fold_in(rng, 1), estimator_state)
                    return self.precond.update(precond_state, diag), est_state

                fire = plan.gate("estimator", count)
                if fire is True:
                    precond_state, estimator_state = refresh(None)
                elif fire is not False:
                    precond_state, estimator_state = jax.lax.cond(
                        fire, refresh, lambda _: (precond_state, estimator_state), None
                    )
        inverse = self.precond.inverse(precond_state, lam)

        direction, solver_state, solver_stats = self.solver.solve(lin, rhs, lam, inverse, state.solver)
        updates, tx_state = self.tx.update(direction, state.tx, params)
        new_params = optax.apply_updates(params, updates)

        values: dict[str, Any] = {
            "step": count,
            "loss": lin.loss,
            "grad_norm": tree_norm(g),
            "update_norm": tree_norm(updates),
            "lam": lam,
            **solver_stats,
        }
        nan = jnp.asarray(jnp.nan, fdt)

        # Post-update probes: the rho bundle and loss-after are computed against the
        # applied update u_t and reuse the step's linearization for uᵀHu.
        fire_loss = cadence_gate(count, plan.cadences("loss_after") + plan.cadences("rho"))
        fire_rho = plan.gate("rho", count)
        loss_after = _gated(fire_loss, lambda: lin.loss_at(new_params).astype(fdt), nan)
        pred = _gated(fire_rho, lambda: -(tree_vdot(g, updates) + 0.5 * lin.quad(updates)).astype(fdt), nan)
        rho = nan
        if fire_rho is not False:
            actual = lin.loss.astype(fdt) - loss_after
            rho = jnp.where(pred > 0, actual / jnp.where(pred > 0, pred, 1.0), -jnp.inf)
            rho = jnp.where(jnp.isfinite(rho), rho, -jnp.inf)
            rho = jnp.where(_as_array(fire_rho), rho, nan)
            values.update(rho=rho, pred_decrease=pred)
        if fire_loss is not False:
            values["loss_after"] = loss_after

        damping_state, accepted = state.damping, jnp.asarray(True)
        if self.damping.needs_rho:
            fire_damp = plan.gate("rho", count, requester="damping")
            new_damping, ok = self.damping.update(state.damping, rho)
            fire_damp = _as_array(fire_damp)
            damping_state = tree_where(fire_damp, new_damping, state.damping)
            accepted = jnp.where(fire_damp, ok, True)
            new_params = tree_where(accepted, new_params, params)
            tx_state = tree_where(accepted, tx_state, state.tx)
        values["step_accepted"] = accepted

        new_state = MethodState(
            count=count + 1,
            solver=solver_state,
            precond=precond_state,
            damping=damping_state,
            estimator=estimator_state,
            grad_tx=grad_tx_state,
            tx=tx_state,
        )
        return new_params, new_state, fill_info(plan.info_schema, values, fdt)


def _as_array(flag: bool | jax.Array) -> jax.Array:
    return jnp.asarray(flag)


def _gated(fire: bool | jax.Array, compute, sentinel: jax.Array) -> jax.Array:
    """``compute()`` where ``fire`` holds, else ``sentinel``; nothing is compiled for ``False``."""
    if fire is False:
        return sentinel
    if fire is True:
        return compute()
    return jax.lax.cond(fire, compute, lambda: sentinel)
