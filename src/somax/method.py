"""The one step skeleton shared by every lane, in named phases.

::

    linearize ─► spectral probes (cadence-gated) ─► gradient-side transform
      ─► precondition: statistic (estimator cadence) ─► update ─► refresh (own cadence) ─► M⁻¹(λ)
      ─► solve in the lane ─► apply: Optax chain on the direction, non-finite guard, line search
      ─► post-update probes (cadence-gated) ─► damp: λ update / accept
      ─► finalize: post-step hooks, keep/rollback per component, state, info

Lanes differ only in the solver object that turns ``(linearization, g, λ, M⁻¹)``
into a direction ``s``. All branching on configuration happens here in Python,
at trace time, from the static plan; the traced step has no compatibility logic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from somax._tree import scalar_dtype, tree_norm, tree_scale, tree_vdot, tree_where, tree_zeros_like
from somax.contracts import Component, Curvature, Damping, Estimator, LineSearch, Preconditioner, Solver
from somax.estimators import amortized
from somax.plan import Plan, cadence_gate, gated
from somax.probes import block_names, spectral_values
from somax.specs import TelemetrySpec
from somax.step_checks import check_batch, check_params, check_rng, check_state, describe_batch
from somax.step_info import StepInfo
from somax.telemetry import fill_info

PyTree = Any

__all__ = ["MethodState", "SecondOrderMethod"]


class MethodState(NamedTuple):
    """Persistent state of an assembled method: a plain pytree of arrays (checkpointable).

    ``model_state`` carries the model's own state (e.g. BatchNorm statistics) from
    step to step; ``nonfinite_count`` counts steps rejected for a non-finite loss,
    gradient or direction; ``line_search`` is the line search's state (``()`` for a
    stateless one).
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
    line_search: PyTree = ()


#: What happens to the state that is not a component's on a rejected / non-finite step.
#: The Optax chain's state belongs to the update that was not applied; gradient-side
#: statistics and the model's state describe the point ``w_t``, which a rejection keeps.
_OWN_POLICIES = {"tx": ("rollback", "rollback"), "grad_tx": ("keep", "rollback"), "model_state": ("keep", "rollback")}


@dataclass(frozen=True)
class SecondOrderMethod:
    """An assembled method: ``init(params)`` and ``step(params, batch, state, rng)``.

    Build it with :func:`somax.assemble` or :func:`somax.make`. ``step`` is pure and
    jittable; wrap it in ``jax.jit`` or call it inside ``lax.scan``.
    """

    plan: Plan
    curvature: Curvature
    solver: Solver
    precond: Preconditioner
    damping: Damping
    estimator: Estimator | None
    tx: optax.GradientTransformation
    grad_tx: optax.GradientTransformation | None
    lam0: float
    telemetry: TelemetrySpec = TelemetrySpec()
    line_search: LineSearch | None = None
    solve_dtype: Any = None
    reject_nonfinite: bool = True
    assembly: Any = field(default=None, compare=False, repr=False)
    preset: Any = field(default=None, compare=False, repr=False)  # (name, options) when built by somax.make

    def replace(self, **changes: Any) -> SecondOrderMethod:
        """The method re-assembled with some :func:`somax.assemble` arguments changed (a new plan).

        ``method.replace(solver=SolverSpec("row_cg"))`` checks the new combination with every
        assembly rule; ``assembly`` holds the arguments this method was assembled from.
        """
        if self.assembly is None:
            raise ValueError("replace: this method was not built by somax.assemble, so it cannot be re-assembled")
        from somax.assemble import assemble  # assembly builds methods: imported here, not at module load

        unknown = set(changes) - set(self.assembly)
        if unknown:
            raise TypeError(f"replace: unknown assemble argument(s) {sorted(unknown)}; known: {sorted(self.assembly)}")
        return assemble(**{**self.assembly, **changes})

    def init(self, params: PyTree, model_state: PyTree = ()) -> MethodState:
        """Initial method state for ``params`` (and the model's initial state, if it has one).

        λ, rho and metrics use the parameters' scalar dtype (≥ float32, float64 under x64).
        With ``solve_dtype`` set, solver, preconditioner and Optax state use that dtype.
        """
        check_params(params, where="init")
        work = self._working(params)
        return MethodState(
            count=jnp.zeros((), jnp.int32),
            solver=self.solver.init(work),
            precond=self.precond.init(work),
            damping=self.damping.init(work, self.lam0),
            estimator=self._estimator_init(work),
            grad_tx=self.grad_tx.init(work) if self.grad_tx is not None else (),
            tx=self.tx.init(work),
            model_state=model_state,
            nonfinite_count=jnp.zeros((), jnp.int32),
            line_search=self.line_search.init(work) if self.line_search is not None else (),
        )

    def _estimator_init(self, work: PyTree) -> PyTree:
        if self.estimator is None:
            return ()
        inner = self.estimator.init(work)
        return amortized.init_amortized(inner, work) if self.estimator.amortize else inner

    def components(self) -> dict[str, Component]:
        """The components that own a field of :class:`MethodState`, by field name."""
        out: dict[str, Component] = {"solver": self.solver, "precond": self.precond, "damping": self.damping}
        if self.estimator is not None:
            out["estimator"] = self.estimator
        if self.line_search is not None:
            out["line_search"] = self.line_search
        return out

    def _working(self, params: PyTree) -> PyTree:
        """Parameters in the dtype of curvature products and solves (``solve_dtype``), else as given."""
        if self.solve_dtype is None:
            return params
        dt = jnp.dtype(self.solve_dtype)
        return jax.tree_util.tree_map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    def step(
        self,
        params: PyTree,
        batch: Any,
        state: MethodState,
        rng: jax.Array | None = None,
        *,
        grad: PyTree | None = None,
    ) -> tuple[PyTree, MethodState, StepInfo]:
        """One optimization step; returns ``(new_params, new_state, info)``.

        Args:
          params: the parameters ``w_t``.
          batch: the mini-batch; the loss, the curvature and the model state come from it.
          state: the :class:`MethodState` from :meth:`init` or the previous step.
          rng: a PRNG key; needed when the plan draws random numbers (``plan.needs_rng``).
          grad: an externally supplied gradient ``g`` (a pytree like ``params``), used
            instead of the batch gradient ``∇L_B(w_t)`` everywhere the step reads the
            gradient: the right-hand side of ``(H + λI) s = g`` (after ``grad_tx``), the
            estimators' statistics (e.g. the squared gradient), ``grad_norm``,
            ``g_dot_s``, the predicted decrease ``−(gᵀu + ½uᵀHu)`` behind rho, and the
            line search's slope. The loss, the curvature ``H`` and the model state still
            come from ``batch``, so rho compares the batch loss's actual decrease with
            the decrease the quadratic model built on this ``g`` predicts. ``None`` (the
            default) uses the batch gradient. A solver that solves for the batch gradient
            itself (``needs_gradient_rhs``: the row lane) refuses it with a ``ValueError``.
        """
        self._check_inputs(params, state, rng)
        check_batch(batch)
        user_params, params = params, self._working(params)
        fdt = scalar_dtype(params)
        count = state.count
        fused = self._fused_probes(params, state, rng, grad)
        lin, products = self._linearize(params, batch, state, rng, grad, fused)
        values: dict[str, Any] = {}
        if any(self.plan.enabled(p) for p in ("trace", "eig", "density", "block_eig")):
            gate = lambda p: self.plan.gate(p, count)  # noqa: E731
            values.update(spectral_values(self.telemetry, lin, params, rng, gate, _gated, fdt))
        rhs, grad_tx_state = lin.grad, state.grad_tx
        if self.grad_tx is not None:
            rhs, grad_tx_state = self.grad_tx.update(lin.grad, state.grad_tx, params)
        lam = state.damping.lam
        precond_state, estimator_state, inverse = self._precondition(lin, rng, state, params, batch, fused, products)
        direction, solver_state, solver_stats = self.solver.solve(lin, rhs, lam, inverse, state.solver)
        updates, tx_state, ls_state, finite = self._apply(lin, params, direction, state, values, fdt)
        rho = self._post_update(lin, params, direction, updates, count, values, fdt)
        damping_state, accepted = self._damp(state, rho, finite, lin, values)
        values.update(step=count, loss=lin.loss, lam=lam, **solver_stats)
        new_params = _add(user_params, updates)
        if self.damping.can_reject:
            new_params = tree_where(accepted, new_params, user_params)
        new = {
            "solver": solver_state,
            "precond": precond_state,
            "damping": damping_state,
            "estimator": estimator_state,
            "grad_tx": grad_tx_state,
            "tx": tx_state,
            "line_search": ls_state,
            "model_state": lin.model_state if lin.model_state is not None else state.model_state,
        }
        new_state = self._finalize(state, new, updates, accepted, finite, lin, values)
        blocks = block_names(user_params) if "block_top_eig" in self.plan.info_schema else ()
        extras = {"aux": lin.aux} if self.curvature.has_aux else None
        return new_params, new_state, fill_info(self.plan.info_schema, values, fdt, blocks, extras)

    # ------------------------------------------------------------------------------------ phases

    def _check_inputs(self, params: PyTree, state: MethodState, rng: Any) -> None:
        if not isinstance(state, MethodState):
            raise TypeError(f"step: state must be the MethodState from method.init, got {type(state).__name__}")
        if rng is None and self.plan.needs_rng:
            users = ", ".join(self.plan.needs_rng)
            raise ValueError(f"step: rng=None, but this plan draws random numbers for: {users}")
        if self.plan.needs_rng:
            check_rng(rng)
        check_params(params)
        check_state(self.init, params, state)

    def _fused_probes(self, params: PyTree, state: MethodState, rng: Any, grad: PyTree | None):
        """``(probes, n, fire)`` when the estimator's products come with the gradient from one pass
        (an estimator that ``draws_probes`` on a curvature that ``fuses_products``), else ``None``.

        Not with an external ``grad`` (the batch gradient is not needed then), an amortized
        estimator (its own linearization) or a line search (it may reuse the last gradient).
        """
        est = self.estimator
        if (est is None or est.amortize or not est.draws_probes or not self.curvature.fuses_products
                or grad is not None or self.line_search is not None):  # fmt: skip
            return None
        fire = self.plan.gate("estimator", state.count)
        if fire is False:
            return None
        # drawn at every step, before the refresh's lax.cond: drawn inside it, the probes left the
        # branch as an output and the other branch wrote zeros for them (measured slower on XLA:CPU)
        probes, n = est.probes(self._estimator_key(rng), state.estimator, params)
        return probes, n, fire

    def _estimator_key(self, rng: Any) -> Any:
        return jax.random.fold_in(rng, 1) if self.estimator.uses_rng and rng is not None else None

    def _linearize(self, params: PyTree, batch: Any, state: MethodState, rng: Any, grad: PyTree | None = None,
                   fused: tuple | None = None):  # fmt: skip
        """``(lin, products)``: the step's one linearization (with ``grad`` given, it replaces the batch
        gradient ``lin.grad``) and, with ``fused`` probes, their products from the same pass."""
        if grad is not None and self.solver.needs_gradient_rhs:
            raise ValueError(
                f"step: grad= was given, but the solver {type(self.solver).__name__} (lane {self.solver.lane!r}) "
                "solves in example space from the residuals and cannot take an external gradient; "
                "use a parameter-lane or diagonal-lane method, or leave grad=None"
            )
        if grad is not None:
            grad = _external_grad(grad, params)  # checked before the model runs
        model_rng = self._model_rng(rng, state.count, stream=2)

        def linearize(with_probes: tuple | None = None):
            try:
                if with_probes is None:
                    return self.curvature.linearize(params, batch, state.model_state, model_rng)
                return self.curvature.linearize_with_products(params, batch, state.model_state, model_rng,
                                                              *with_probes)  # fmt: skip
            except (TypeError, ValueError) as e:
                if type(e) not in (TypeError, ValueError):
                    raise
                msg = f"step: evaluating the model and loss on the batch failed; batch: {describe_batch(batch)}. {e}"
                raise type(e)(msg) from e

        if fused is not None:
            return linearize(fused)
        lin = linearize()
        if grad is not None:
            return dataclasses.replace(lin, grad=grad), None
        known = self.line_search.known_value_and_grad(state.line_search) if self.line_search is not None else None
        if known is None:
            return lin, None
        return self._reuse(lin, linearize, known, state), None

    def _model_rng(self, rng: Any, count: jax.Array, stream: int) -> Any:
        """The model's key for one linearization (``stream``: which one), fresh every step; ``None``
        when the model draws no random numbers."""
        if not self.curvature.uses_rng:
            return None
        return jax.random.fold_in(jax.random.fold_in(rng, stream), count)

    def _reuse(self, lin, linearize, known, state: MethodState):
        """``lin`` with the loss and gradient the line search kept where its flag holds, else evaluated.

        The choice is a ``lax.cond``, so a step that reuses them evaluates neither. ``lin``'s own
        loss and gradient are dead code (removed when compiled); only its closures are used:
        ``loss_at``, and the curvature products, whose linearization runs only if a solver or a
        probe calls them.
        """
        if self.curvature.uses_rng or self.curvature.has_aux or jax.tree_util.tree_leaves(state.model_state):
            raise ValueError(
                f"step: the line search {type(self.line_search).__name__} reuses the previous step's loss and "
                "gradient, which needs a deterministic loss (no model randomness, model state or auxiliary "
                "outputs); turn that reuse off for this model"
            )
        ok, loss, grad = known

        def evaluate() -> tuple[jax.Array, PyTree]:
            fresh = linearize()
            return fresh.loss, fresh.grad

        like = (lin.loss, lin.grad)  # what `evaluate` returns (shapes and dtypes; the values are dead code)
        kept = lambda: jax.tree_util.tree_map(lambda x, t: jnp.asarray(x).astype(t.dtype), (loss, grad), like)  # noqa: E731
        loss, grad = jax.lax.cond(jnp.asarray(ok, bool), kept, evaluate)
        return dataclasses.replace(lin, loss=loss, grad=grad)

    def _precondition(
        self, lin, rng: Any, state: MethodState, params: PyTree, batch: Any, fused: tuple | None, products: Any
    ) -> tuple[Any, Any, Any]:
        """Statistic (estimator cadence) → ``update`` → ``refresh`` (own cadence) → ``M⁻¹`` for this λ.

        With ``fused`` probes the statistic comes from ``products``, made with the gradient.
        """
        precond_state, estimator_state, count = state.precond, state.estimator, state.count
        est = self.estimator
        if est is not None and est.amortize:
            precond_state, estimator_state = self._amortized_estimate(lin, rng, state, params, batch)
        elif est is not None:
            key = self._estimator_key(rng)

            def update() -> tuple[PyTree, PyTree]:
                if fused is None:
                    statistic, new_est = est.estimate(lin, key, estimator_state)
                else:
                    statistic, new_est = est.from_products(fused[0], products, estimator_state)
                return self.precond.update(precond_state, statistic, lin), new_est

            fire = self.plan.gate("estimator", count)
            precond_state, estimator_state = _gated(fire, update, (precond_state, estimator_state))
        refreshed, lam = precond_state, state.damping.lam
        if self.precond.refresh_uses_lam:
            rebuild = lambda: self.precond.refresh(refreshed, lam)  # noqa: E731
        else:
            rebuild = lambda: self.precond.refresh(refreshed)  # noqa: E731
        precond_state = _gated(self.plan.gate("refresh", count), rebuild, refreshed)
        return precond_state, estimator_state, self.precond.inverse(precond_state, lam)

    def _amortized_estimate(self, lin, rng: Any, state: MethodState, params: PyTree, batch: Any):
        """The estimator on slice ``t mod k`` of the batch, every step; the mean to ``update`` on the cadence.

        No ``lax.cond``: the preconditioner's update is computed every step and kept where the
        cadence fires (:mod:`somax.estimators.amortized`).
        """
        est, acc, count = self.estimator, state.estimator, state.count
        sub = amortized.batch_slice(batch, count, est.every_k)
        lin_slice = self.curvature.linearize(params, sub, state.model_state, self._model_rng(rng, count, stream=3))
        statistic, inner = est.estimate(lin_slice, self._estimator_key(rng), acc.inner)
        fire = self.plan.gate("estimator", count)
        mean, acc = amortized.hand_over(amortized.accumulate(acc, statistic, inner), fire)
        updated = self.precond.update(state.precond, mean, lin)
        return tree_where(fire, updated, state.precond), acc

    def _apply(self, lin, params, direction, state, values, fdt) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
        """Optax chain on ``s``, the non-finite guard, then the line search (or the ``loss_after`` probe)."""
        updates, tx_state = self.tx.update(direction, state.tx, params)
        grad_norm = tree_norm(lin.grad)
        update_norm = tree_norm(updates)
        finite = valid = jnp.asarray(True)
        if self.reject_nonfinite:
            # ‖g‖ and ‖u‖ are finite iff every entry is (an overflow to inf also rejects). A
            # rejected update is zeroed, so w + u = w exactly and no select on params is needed.
            # The flag is a reduction so XLA computes it once; three `isfinite`s joined by `&`
            # were copied into every parameter's update kernel (~60 more HLO instructions).
            checked = jnp.stack([lin.loss.astype(fdt), grad_norm.astype(fdt), update_norm.astype(fdt)])
            finite = jnp.all(jnp.isfinite(checked))
            valid = lin.valid if lin.valid is not None else valid
            updates = tree_where(finite & valid, updates, tree_zeros_like(updates))
            update_norm = jnp.where(finite & valid, update_norm, 0)
        cap = self.damping.max_rel_update
        if cap is not None:
            # the damping's step bound, at every step: ‖u‖ ≤ c · max(‖w‖, 1)
            limit = cap * jnp.maximum(tree_norm(params), 1.0).astype(update_norm.dtype)
            shrink = jnp.minimum(1.0, limit / jnp.maximum(update_norm, jnp.finfo(update_norm.dtype).tiny))
            updates = tree_scale(shrink, updates)
            update_norm = update_norm * shrink
            values["update_capped"] = shrink < 1
        nan = jnp.asarray(jnp.nan, fdt)
        fire = cadence_gate(state.count, self.plan.cadences("loss_after") + self.plan.cadences("rho"))
        ls_state = state.line_search
        if self.line_search is not None:
            alpha, loss_after, ls_state = self.line_search.update(lin, params, updates, fdt, ls_state)
            updates = tree_scale(alpha, updates)
            update_norm = jnp.abs(alpha).astype(update_norm.dtype) * update_norm
            values["ls_alpha"] = alpha
            fire = True  # the line search evaluated L_B(w + αu) already
            loss_after = loss_after.astype(fdt)
        else:
            loss_after = _gated(fire, lambda: lin.loss_at(optax.apply_updates(params, updates)).astype(fdt), nan)
        if fire is not False:
            values["loss_after"] = jnp.where(jnp.asarray(fire), loss_after, nan)
            values["actual_decrease"] = lin.loss.astype(fdt) - values["loss_after"]
        values.update(grad_norm=grad_norm, update_norm=update_norm, batch_valid=valid)
        return updates, tx_state, ls_state, finite

    def _post_update(self, lin, params, direction, updates, count, values, fdt) -> jax.Array:
        """Norms and the rho bundle, against the update actually applied; returns rho (``nan`` if off)."""
        nan = jnp.asarray(jnp.nan, fdt)
        fire_norms = self.plan.gate("norms", count)
        if fire_norms is not False:
            tiny = jnp.finfo(fdt).tiny
            update_norm = values["update_norm"]

            def norms() -> tuple[jax.Array, jax.Array]:
                return update_norm / jnp.maximum(tree_norm(params), tiny), tree_vdot(lin.grad, direction).astype(fdt)

            values["rel_update"], values["g_dot_s"] = _gated(fire_norms, norms, (nan, nan))
        fire_rho = self.plan.gate("rho", count)
        if fire_rho is False:
            return nan
        pred = _gated(fire_rho, lambda: -(tree_vdot(lin.grad, updates) + 0.5 * lin.quad(updates)).astype(fdt), nan)
        # A predicted decrease below the loss's rounding level (a zero update, a stationary point)
        # makes rho meaningless: nan ("no information"), which the damping reads as keep.
        resolution = 8 * jnp.finfo(fdt).eps * jnp.abs(lin.loss.astype(fdt))
        rho = jnp.where(pred > resolution, values["actual_decrease"] / jnp.where(pred > 0, pred, 1.0), -jnp.inf)
        rho = jnp.where(jnp.isfinite(rho), rho, -jnp.inf)
        rho = jnp.where(jnp.abs(pred) <= resolution, nan, rho)
        rho = jnp.where(jnp.asarray(fire_rho), rho, nan)
        values.update(rho=rho, pred_decrease=pred)
        return rho

    def _damp(self, state: MethodState, rho, finite, lin, values: dict) -> tuple[PyTree, jax.Array]:
        """The damping policy on its cadence (and after any non-finite step): new λ state, accepted."""
        fire = self.plan.gate("damping", state.count)
        if fire is False:
            return state.damping, jnp.asarray(True)
        if self.reject_nonfinite and fire is not True:
            fire = fire | ~finite
        nan = jnp.asarray(jnp.nan, rho.dtype)
        signals = {
            "rho": rho,
            "update_norm": values["update_norm"],
            "rel_update": values.get("rel_update", nan),
            "finite": finite,
            "capped": values.get("update_capped", jnp.asarray(False)),
            "lin": lin,
        }
        # On a traced cadence the policy runs in a `lax.cond`: it may do work (a curvature product).
        skipped = (state.damping, jnp.asarray(True), jnp.asarray(-1, jnp.int32))
        new_damping, ok, action = _gated(fire, lambda: _as_update(self.damping.update(state.damping, signals)), skipped)
        values["tr_action"] = action
        return new_damping, ok

    def _finalize(self, state, new: dict, updates, accepted, finite, lin, values) -> MethodState:
        """Post-step hooks, then each state field kept or rolled back as its owner declares.

        A step on an inadmissible batch (``info["batch_valid"]`` False) is treated like a
        non-finite one, but does not count as non-finite.
        """
        usable = finite & values["batch_valid"]
        step_ok = accepted & usable
        can_reject = self.damping.can_reject
        for name, comp in self.components().items():
            new[name] = comp.post_step(new[name], updates, step_ok, lin)
        policies = {name: (c.on_reject, c.on_nonfinite) for name, c in self.components().items()}
        for name, (on_reject, on_nonfinite) in {**policies, **_OWN_POLICIES}.items():
            old = getattr(state, name)
            if can_reject and on_reject == "rollback":
                new[name] = tree_where(accepted, new[name], old)
            if self.reject_nonfinite and on_nonfinite == "rollback":
                new[name] = tree_where(usable, new[name], old)
        for name, comp in self.components().items():
            reported = dict(comp.info(new[name]))
            stray = set(reported) - set(comp.info_keys)
            if stray:
                raise KeyError(f"{type(comp).__name__}.info reported keys it does not declare: {sorted(stray)}")
            values.update(reported)
        values.update(step_accepted=step_ok, finite=finite)
        nonfinite = state.nonfinite_count + jnp.where(finite, 0, 1).astype(jnp.int32)
        # The counter wraps to 0 at a multiple of every cadence; compared before adding, so a
        # restored or hand-made count at the int32 limit wraps too instead of overflowing.
        count = jnp.where(state.count >= self.plan.count_period - 1, 0, state.count + 1).astype(state.count.dtype)
        return MethodState(count=count, nonfinite_count=nonfinite, **new)


def _as_update(out: tuple) -> tuple:
    """A damping update's ``(state, accepted, action)`` with the dtypes the skipped branch has."""
    new, ok, action = out
    return new, jnp.asarray(ok, bool), jnp.asarray(action, jnp.int32)


def _add(params: PyTree, updates: PyTree) -> PyTree:
    """``w + u`` in each parameter's own dtype (updates may be in ``solve_dtype``)."""
    return jax.tree_util.tree_map(lambda w, u: (w + u.astype(w.dtype)).astype(w.dtype), params, updates)


def _gated(fire: bool | jax.Array, compute, sentinel: Any) -> Any:
    """``compute()`` where ``fire`` holds, else ``sentinel``; nothing is compiled for ``False``."""
    return gated(fire, compute, lambda: sentinel)


def _external_grad(grad: PyTree, like: PyTree) -> PyTree:
    """``grad`` in the (working) parameters' tree structure and dtypes, checked leaf by leaf.

    Wrapper nodes may differ (a gradient of plain arrays for parameters held in
    ``nnx.Param`` variables): the leaves must have the same keys and shapes.
    """
    got = jax.tree_util.tree_flatten_with_path(grad)[0]
    ref, ref_def = jax.tree_util.tree_flatten_with_path(like)
    keys = lambda path: tuple(k for k in path if not isinstance(k, jax.tree_util.GetAttrKey))  # noqa: E731
    if len(got) != len(ref) or any(keys(a) != keys(b) for (a, _), (b, _) in zip(got, ref)):
        names = lambda leaves: [jax.tree_util.keystr(keys(p)) for p, _ in leaves]  # noqa: E731
        raise ValueError(f"step: grad= must have the structure of params: got {names(got)}, params have {names(ref)}")
    for (path, g), (_, r) in zip(got, ref):
        if jnp.shape(g) != jnp.shape(r):
            where = jax.tree_util.keystr(keys(path))
            raise ValueError(f"step: grad{where} has shape {jnp.shape(g)}, but params{where} has {jnp.shape(r)}")
    return jax.tree_util.tree_unflatten(ref_def, [jnp.asarray(g).astype(r.dtype) for (_, g), (_, r) in zip(got, ref)])
