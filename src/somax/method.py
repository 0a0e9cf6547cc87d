"""The one step skeleton shared by every lane.

::

    linearize ─► spectral probes (cadence-gated) ─► gradient-side transform
      ─► (estimator, cadence-gated) ─► preconditioner ─► solve in the lane
      ─► Optax chain on the direction ─► line search (optional) ─► apply
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

from somax._tree import scalar_dtype, tree_norm, tree_scale, tree_vdot, tree_where, tree_zeros_like
from somax.plan import Plan, cadence_gate
from somax.probes import block_names, spectral_values
from somax.specs import TelemetrySpec
from somax.step_info import StepInfo
from somax.telemetry import fill_info

PyTree = Any

__all__ = ["MethodState", "SecondOrderMethod"]


class MethodState(NamedTuple):
    """Persistent state of an assembled method: a plain pytree of arrays (checkpointable).

    ``model_state`` carries the model's own state (e.g. BatchNorm statistics) from
    step to step; ``nonfinite_count`` counts steps rejected for a non-finite loss,
    gradient or direction.
    """

    count: jax.Array
    solver: PyTree
    precond: PyTree
    damping: PyTree
    estimator: PyTree
    grad_tx: PyTree
    tx: PyTree
    model_state: PyTree = ()
    nonfinite_count: jax.Array | int = 0


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
    telemetry: TelemetrySpec = TelemetrySpec()
    line_search: Any = None
    solve_dtype: Any = None
    reject_nonfinite: bool = True

    def init(self, params: PyTree, model_state: PyTree = ()) -> MethodState:
        """Initial method state for ``params`` (and the model's initial state, if it has one).

        λ, rho and metrics use the parameters' scalar dtype (≥ float32, float64 under x64).
        With ``solve_dtype`` set, solver, preconditioner and Optax state use that dtype.
        """
        work = self._working(params)
        return MethodState(
            count=jnp.zeros((), jnp.int32),
            solver=self.solver.init(work),
            precond=self.precond.init(work),
            damping=self.damping.init(self.lam0, scalar_dtype(work)),
            estimator=self.estimator.init(work) if self.estimator is not None else (),
            grad_tx=self.grad_tx.init(work) if self.grad_tx is not None else (),
            tx=self.tx.init(work),
            model_state=model_state,
            nonfinite_count=jnp.zeros((), jnp.int32),
        )

    def _check_state(self, params: PyTree, state: MethodState) -> None:
        """Trace-time check that ``state`` has the structure, shapes and dtypes ``init(params)`` gives."""
        expected = jax.eval_shape(lambda p: self.init(p)._replace(model_state=()), params)
        got = state._replace(model_state=())
        for field in MethodState._fields:
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

    def _working(self, params: PyTree) -> PyTree:
        """Parameters in the dtype of curvature products and solves (``solve_dtype``), else as given."""
        if self.solve_dtype is None:
            return params
        dt = jnp.dtype(self.solve_dtype)
        return jax.tree_util.tree_map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    def step(
        self, params: PyTree, batch: Any, state: MethodState, rng: jax.Array | None = None
    ) -> tuple[PyTree, MethodState, StepInfo]:
        """One optimization step; returns ``(new_params, new_state, info)``."""
        plan = self.plan
        if not isinstance(state, MethodState):
            raise TypeError(f"step: state must be the MethodState from method.init, got {type(state).__name__}")
        count = state.count
        if rng is None and plan.needs_rng:
            raise ValueError(f"step: rng=None, but this plan draws random numbers for: {', '.join(plan.needs_rng)}")
        if plan.needs_rng:
            _check_rng(rng)
        _check_params(params)
        self._check_state(params, state)
        user_params, params = params, self._working(params)
        fdt = scalar_dtype(params)
        nan = jnp.asarray(jnp.nan, fdt)

        model_rng = None
        if getattr(self.curvature, "uses_rng", False):
            model_rng = jax.random.fold_in(jax.random.fold_in(rng, 2), count)  # fresh every step
        try:
            lin = self.curvature.linearize(params, batch, state.model_state, model_rng)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):
                raise
            msg = f"step: evaluating the model and loss on the batch failed; batch: {_describe(batch)}. {e}"
            raise type(e)(msg) from e
        g = lin.grad
        lam = state.damping.lam
        values: dict[str, Any] = {}
        if any(plan.enabled(p) for p in ("trace", "eig", "density", "block_eig")):
            values.update(spectral_values(self.telemetry, lin, params, rng, lambda p: plan.gate(p, count), _gated, fdt))

        rhs, grad_tx_state = g, state.grad_tx
        if self.grad_tx is not None:
            rhs, grad_tx_state = self.grad_tx.update(g, state.grad_tx, params)

        precond_state, estimator_state = state.precond, state.estimator
        if self.precond.needs_diagonal:
            if self.estimator is None:
                precond_state = self.precond.update(precond_state, jax.tree_util.tree_map(jnp.square, g))
            else:

                def refresh():
                    diag, est_state = self.estimator.diagonal(lin, jax.random.fold_in(rng, 1), estimator_state)
                    return self.precond.update(precond_state, diag), est_state

                precond_state, estimator_state = _gated(
                    plan.gate("estimator", count), refresh, (precond_state, estimator_state)
                )
        inverse = self.precond.inverse(precond_state, lam)

        direction, solver_state, solver_stats = self.solver.solve(lin, rhs, lam, inverse, state.solver)
        updates, tx_state = self.tx.update(direction, state.tx, params)
        grad_norm = tree_norm(g)
        update_norm = tree_norm(updates)
        finite = jnp.asarray(True)
        if self.reject_nonfinite:
            # ‖g‖ and ‖u‖ are finite iff every entry is (an overflow to inf also rejects). A
            # rejected update is zeroed, so w + u = w exactly and no select on params is needed.
            # The flag is a reduction so XLA computes it once; three `isfinite`s joined by `&`
            # were copied into every parameter's update kernel (~60 more HLO instructions).
            checked = jnp.stack([lin.loss.astype(fdt), grad_norm.astype(fdt), update_norm.astype(fdt)])
            finite = jnp.all(jnp.isfinite(checked))
            updates = tree_where(finite, updates, tree_zeros_like(updates))
            update_norm = jnp.where(finite, update_norm, 0)

        # Post-update probes are computed against the update actually applied.
        loss_after = nan
        fire_loss = cadence_gate(count, plan.cadences("loss_after") + plan.cadences("rho"))
        if self.line_search is not None:
            alpha, loss_after = self.line_search.search(lin, params, updates, fdt)
            updates = tree_scale(alpha, updates)
            update_norm = jnp.abs(alpha).astype(update_norm.dtype) * update_norm
            values["ls_alpha"] = alpha
            fire_loss = True  # the line search evaluated L_B(w + αu) already
            loss_after = loss_after.astype(fdt)
        else:
            loss_after = _gated(fire_loss, lambda: lin.loss_at(optax.apply_updates(params, updates)).astype(fdt), nan)
        new_params = _apply(user_params, updates)
        values.update(
            step=count,
            loss=lin.loss,
            grad_norm=grad_norm,
            update_norm=update_norm,
            lam=lam,
            **solver_stats,
        )
        fire_norms = plan.gate("norms", count)
        if fire_norms is not False:
            tiny = jnp.finfo(fdt).tiny
            values["rel_update"], values["g_dot_s"] = _gated(
                fire_norms,
                lambda: (update_norm / jnp.maximum(tree_norm(params), tiny), tree_vdot(g, direction).astype(fdt)),
                (nan, nan),
            )
        fire_rho = plan.gate("rho", count)
        rho = nan
        if fire_loss is not False:
            values["loss_after"] = jnp.where(_as_array(fire_loss), loss_after, nan)
            values["actual_decrease"] = lin.loss.astype(fdt) - values["loss_after"]
        if fire_rho is not False:
            pred = _gated(fire_rho, lambda: -(tree_vdot(g, updates) + 0.5 * lin.quad(updates)).astype(fdt), nan)
            rho = jnp.where(pred > 0, values["actual_decrease"] / jnp.where(pred > 0, pred, 1.0), -jnp.inf)
            rho = jnp.where(_as_array(fire_rho), jnp.where(jnp.isfinite(rho), rho, -jnp.inf), nan)
            values.update(rho=rho, pred_decrease=pred)

        damping_state, accepted = state.damping, jnp.asarray(True)
        fire_damp = plan.gate("damping", count)
        if fire_damp is not False:
            signals = {"rho": rho, "update_norm": update_norm, "rel_update": values.get("rel_update", nan)}
            new_damping, ok, action = self.damping.update(state.damping, signals)
            fire_damp = _as_array(fire_damp)
            damping_state = tree_where(fire_damp, new_damping, state.damping)
            accepted = jnp.where(fire_damp, ok, True)
            values["tr_action"] = jnp.where(fire_damp, action, -1)
            if getattr(self.damping, "can_reject", False):
                new_params = tree_where(accepted, new_params, user_params)
                tx_state = tree_where(accepted, tx_state, state.tx)

        new_state = MethodState(
            count=count + 1,
            solver=solver_state,
            precond=precond_state,
            damping=damping_state,
            estimator=estimator_state,
            grad_tx=grad_tx_state,
            tx=tx_state,
            model_state=lin.model_state if lin.model_state is not None else state.model_state,
            nonfinite_count=state.nonfinite_count + jnp.where(finite, 0, 1).astype(jnp.int32),
        )
        if self.reject_nonfinite:
            # A non-finite loss, gradient or direction leaves everything as it was but the counters.
            kept = state._replace(count=new_state.count, nonfinite_count=new_state.nonfinite_count)
            new_state = tree_where(finite, new_state, kept)
            accepted = accepted & finite
        values["step_accepted"] = accepted
        values["finite"] = finite
        blocks = block_names(user_params) if "block_top_eig" in plan.info_schema else ()
        extras = {"aux": lin.aux} if getattr(self.curvature, "has_aux", False) else None
        info = fill_info(plan.info_schema, values, fdt, blocks, extras)
        return new_params, new_state, info


def _check_params(params: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"step: params{jax.tree_util.keystr(path)} has dtype {dtype}; every parameter must be a floating "
                f"array (keep integer or boolean constants out of params, e.g. in the model or the batch)"
            )


def _check_rng(rng: Any) -> None:
    dtype, shape = jnp.result_type(rng), jnp.shape(rng)
    typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if not (typed and shape == ()) and not (dtype == jnp.uint32 and shape == (2,)):
        raise TypeError(
            f"step: rng must be one PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)), got {dtype}{list(shape)}"
        )


def _describe(batch: Any) -> str:
    def one(x: Any) -> str:
        return f"{x.dtype}{list(x.shape)}" if hasattr(x, "dtype") and hasattr(x, "shape") else type(x).__name__

    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    parts = [f"{jax.tree_util.keystr(p) or 'batch'}: {one(x)}" for p, x in leaves]
    return ", ".join(parts[:8]) + (", …" if len(parts) > 8 else "")


def _apply(params: PyTree, updates: PyTree) -> PyTree:
    """``w + u`` in each parameter's own dtype (updates may be in ``solve_dtype``)."""
    return jax.tree_util.tree_map(lambda w, u: (w + u.astype(w.dtype)).astype(w.dtype), params, updates)


def _as_array(flag: bool | jax.Array) -> jax.Array:
    return jnp.asarray(flag)


def _gated(fire: bool | jax.Array, compute, sentinel: jax.Array) -> jax.Array:
    """``compute()`` where ``fire`` holds, else ``sentinel``; nothing is compiled for ``False``."""
    if fire is False:
        return sentinel
    if fire is True:
        return compute()
    return jax.lax.cond(fire, compute, lambda: sentinel)
