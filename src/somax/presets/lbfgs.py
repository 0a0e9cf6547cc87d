"""L-BFGS [Liu & Nocedal 1989] as a somax method: Optax's ``scale_by_lbfgs`` in the method's chain.

How it fits the component contract
----------------------------------

L-BFGS needs the loss and gradient at ``w_t`` (one linearization), a direction
``−P_t g_t`` from the two-loop recursion over the last ``m`` pairs
``(δw_j, δg_j) = (w_{j+1} − w_j, g_{j+1} − g_j)``, and a line search. The pieces map onto
the step skeleton without touching it:

* **solver** :class:`IdentitySolver` (``SolverSpec("identity")``): ``s_t = g_t``, parameter lane;
* **tx** ``optax.chain(optax.scale_by_lbfgs(m), optax.scale_by_learning_rate(lr))``: the
  unmodified Optax transform turns ``g_t`` into ``−lr·P_t g_t``. It stores ``(w_t, g_t)`` and
  forms the pair ``(w_t − w_{t−1}, g_t − g_{t−1})`` at the *next* call, so the pair it pushes
  is always the update actually applied (line search included);
* **history policy**: the chain's state is ``MethodState.tx``, which the step rolls back on a
  rejected and on a non-finite step. After a rejected step ``k`` the parameters are still
  ``w_k`` and the state is the one before step ``k``, so the next call pushes the pair of step
  ``k − 1`` again into the same slot: a rejected (or non-finite) step pushes no pair, and the
  run continues exactly as if the rejected step had never been tried;
* **line search** :class:`OptaxLineSearch` (``LineSearchSpec("zoom")``): the method's line-search
  phase runs Optax's own ``scale_by_zoom_linesearch`` (strong Wolfe, as in ``optax.lbfgs``)
  with ``value_fn = L_B`` on the step's batch (``lin.loss_at``), ``value = L_B(w_t)`` and
  ``grad = g_t`` from the step's linearization. The Optax line search starts from a fresh state
  every step; this equals ``optax.lbfgs``'s default ``initial_guess_strategy="one"`` (the first
  trial step is 1 every time) and rules out ``"keep"``;
* **reusing the line search's last evaluation** (``reuse_line_search_value=True``, fixed batch
  only): the line search's own state (``MethodState.line_search``) keeps the loss and gradient
  at the accepted point, and the next step takes them as ``(L_B(w_t), g_t)`` in a ``lax.cond``
  instead of evaluating them, as ``optax.value_and_grad_from_state`` does. The state rolls back
  with a rejected or non-finite step, where the parameters stay ``w_t``: it then holds ``w_t``'s
  values from the step before, or none (and the next step evaluates them).

With these defaults the preset reproduces ``optax.lbfgs()`` iterate for iterate on a
deterministic (full-batch) objective (``tests/test_lbfgs.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from somax import validate
from somax._tree import scalar_dtype, tree_norm
from somax.assemble import assemble
from somax.contracts import LineSearch, Solver
from somax.method import SecondOrderMethod
from somax.presets._common import (
    BATCH_OPTIONS,
    HESSIAN_MODEL_OPTIONS,
    OUTER_OPTIONS,
    combine,
    model_kwargs,
    require,
)
from somax.presets.registry import Option, define_preset
from somax.registry import LINE_SEARCHES, SOLVERS
from somax.specs import CurvatureSpec, DampingSpec, LineSearchSpec, SolverSpec

__all__ = ["IdentitySolver", "OptaxLineSearch", "KeptValueAndGrad", "zoom", "lbfgs_chain", "lbfgs"]


@dataclass(frozen=True, kw_only=True)
class IdentitySolver(Solver):
    """``s = rhs`` (the gradient, after any ``grad_tx``): the Optax chain ``tx`` makes the whole update.

    For methods whose "solve" is an Optax transformation of the gradient (L-BFGS). λ and the
    curvature are not used; the curvature still supplies the loss, the gradient, ``loss_at``
    for the line search and the products behind the optional rho telemetry.
    """

    lane = "param"

    def solve(self, lin, rhs, lam, precond, state):
        """``(rhs, state, {})``."""
        return rhs, state, {}


class KeptValueAndGrad(NamedTuple):
    """:class:`OptaxLineSearch`'s state with ``reuse_value``: the loss and gradient at the accepted
    point ``w_{t+1}`` (where its last evaluation was), and whether the next step may use them."""

    ok: jax.Array
    value: jax.Array
    grad: Any


@dataclass(frozen=True, kw_only=True)
class OptaxLineSearch(LineSearch):
    """An Optax line-search transformation as the method's line search (``search → (α, L_B(w + αu))``).

    ``transform`` is an ``optax.GradientTransformationExtraArgs`` whose ``update(u, state, w,
    value=, grad=, value_fn=)`` returns ``α·u`` and a state with ``learning_rate`` (α) and
    ``value`` (``L_B(w + αu)``), as ``optax.scale_by_zoom_linesearch`` and
    ``optax.scale_by_backtracking_linesearch`` do. It is initialised afresh each step, so it must
    not depend on its previous state (the zoom search with ``initial_guess_strategy="one"``).

    ``reuse_value=True`` (the transform's state must also hold ``grad``, the gradient at
    ``w + αu``): the line search keeps ``(L_B, ∇L_B)`` at the accepted point in the method
    state, and the next step uses them as its loss and gradient at ``w_{t+1}`` instead of
    evaluating them, as ``optax.value_and_grad_from_state`` does in Optax's own loop. Valid only
    when every step gets the same batch (a deterministic objective) and the parameters passed
    to a step are the ones the previous step returned. With another batch, the step's loss and
    gradient (the L-BFGS pair, the line search's slope and the reported ``loss``) are those of
    the previous step's batch at ``w_t``; only the line search reads the new one. The kept
    values are marked unusable when they are not finite, and the state is rolled back with a
    rejected or non-finite step (the parameters stay ``w_t``, and the state before the step
    holds ``w_t``'s values or none), so such a step never hands the next step values of a
    point it did not take.
    """

    transform: Any = field(default=None)
    reuse_value: bool = False
    on_reject: ClassVar[str] = "rollback"

    def __post_init__(self) -> None:
        t = self.transform
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(f"OptaxLineSearch: transform must be an Optax line-search transformation, got {t!r}")
        if not isinstance(self.reuse_value, bool):
            raise TypeError(f"OptaxLineSearch: reuse_value must be a bool, got {self.reuse_value!r}")

    def init(self, params: Any) -> Any:
        """``()``, or with ``reuse_value`` an empty :class:`KeptValueAndGrad` (``ok`` False)."""
        if not self.reuse_value:
            return ()
        zero = jnp.zeros((), scalar_dtype(params))
        return KeptValueAndGrad(jnp.asarray(False), zero, jax.tree_util.tree_map(jnp.zeros_like, params))

    def _run(self, lin, params: Any, updates: Any) -> Any:
        state = self.transform.init(params)
        _, state = self.transform.update(updates, state, params, value=lin.loss, grad=lin.grad, value_fn=lin.loss_at)
        return state

    def search(self, lin, params: Any, updates: Any, dtype) -> tuple[jax.Array, jax.Array]:
        """Run the transform once from its initial state; ``(α, L_B(w + αu))`` in ``dtype``."""
        state = self._run(lin, params, updates)
        return state.learning_rate.astype(dtype), state.value.astype(dtype)

    def update(self, lin, params: Any, updates: Any, dtype, state: Any) -> tuple[jax.Array, jax.Array, Any]:
        """:meth:`search`; with ``reuse_value`` the new state keeps the value and gradient at ``w + αu``."""
        ls = self._run(lin, params, updates)
        alpha, value = ls.learning_rate.astype(dtype), ls.value.astype(dtype)
        if not self.reuse_value:
            return alpha, value, state
        grad = getattr(ls, "grad", None)
        if grad is None:
            raise TypeError(
                "OptaxLineSearch(reuse_value=True): the transform's state holds no gradient at the accepted "
                "point (grad); use the zoom search, or the backtracking search with store_grad=True"
            )
        ok = jnp.isfinite(value) & jnp.isfinite(tree_norm(grad))
        grad = jax.tree_util.tree_map(lambda g, like: g.astype(like.dtype), grad, state.grad)
        return alpha, value, KeptValueAndGrad(ok, value.astype(state.value.dtype), grad)

    def known_value_and_grad(self, state: Any) -> tuple[jax.Array, jax.Array, Any] | None:
        """With ``reuse_value``: ``(ok, L_B(w_t), ∇L_B(w_t))`` kept by the previous step."""
        return (state.ok, state.value, state.grad) if self.reuse_value else None


def zoom(
    *,
    reuse_value: bool = False,
    max_linesearch_steps: int = 20,
    max_learning_rate: float | None = None,
    tol: float = 0.0,
    increase_factor: float = 2.0,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    approx_dec_rtol: float | None = 1e-6,
    stepsize_precision: float = 1e-5,
) -> OptaxLineSearch:
    """``LineSearchSpec("zoom")``: ``optax.scale_by_zoom_linesearch`` (strong Wolfe) with these options.

    The first trial step is 1 at every step (``initial_guess_strategy="one"``, ``optax.lbfgs``'s
    default); the options are Optax's, with Optax's defaults (``max_linesearch_steps`` as in
    ``optax.lbfgs``). ``reuse_value``: see :class:`OptaxLineSearch` (only for a fixed batch).
    """
    validate.integer("LineSearchSpec('zoom'): max_linesearch_steps", max_linesearch_steps, minimum=1)
    transform = optax.scale_by_zoom_linesearch(
        max_linesearch_steps=max_linesearch_steps,
        max_learning_rate=max_learning_rate,
        tol=tol,
        increase_factor=increase_factor,
        slope_rtol=slope_rtol,
        curv_rtol=curv_rtol,
        approx_dec_rtol=approx_dec_rtol,
        stepsize_precision=stepsize_precision,
        initial_guess_strategy="one",
    )
    return OptaxLineSearch(transform=transform, reuse_value=reuse_value)


def lbfgs_chain(
    memory_size: int = 10, scale_init_precond: bool = True, learning_rate: float | Callable[[int], float] = 1.0
) -> optax.GradientTransformation:
    """The preset's ``tx``: ``optax.scale_by_lbfgs(memory_size, scale_init_precond)`` then ``−learning_rate``.

    Given the gradient ``g_t`` (the identity solver's direction) it returns ``−lr·P_t g_t``, where
    ``P_t`` is the two-loop-recursion inverse-Hessian approximation of the stored pairs.
    """
    return optax.chain(
        optax.scale_by_lbfgs(memory_size=memory_size, scale_init_precond=scale_init_precond),
        optax.scale_by_learning_rate(learning_rate),
    )


SOLVERS.register("identity", IdentitySolver)
LINE_SEARCHES.register("zoom", zoom)

_OPTIONS = combine(
    HESSIAN_MODEL_OPTIONS,
    BATCH_OPTIONS,
    {
        "memory_size": Option(10, int, "the number ``m`` of stored pairs ``(δw, δg)``."),
        "scale_init_precond": Option(
            True, bool, "start the two-loop recursion from ``γ_t I``, ``γ_t = δwᵀδg / δgᵀδg`` (Optax's option)."
        ),
        "learning_rate": OUTER_OPTIONS["learning_rate"].replace(
            doc="scale of the L-BFGS direction before the line search (``u = −lr·P g``): a float or a schedule."
        ),
        "line_search": Option(
            "zoom",
            str | LineSearchSpec | None,
            '``"zoom"`` (Optax\'s strong-Wolfe zoom search, as ``optax.lbfgs``), ``"armijo"``, ``"grid"``, '
            "a ``LineSearchSpec``, or None (the step ``u`` as it is).",
        ),
        "max_linesearch_steps": Option(20, int, 'with ``line_search="zoom"``: the most trial steps.'),
        "reuse_line_search_value": Option(
            False,
            bool,
            'with ``line_search="zoom"``: take each step\'s loss and gradient at ``w_t`` from the previous '
            "step's line search (its last evaluation, at the accepted point) instead of evaluating them, "
            "as ``optax.value_and_grad_from_state``. Only valid when every step gets the same batch; with "
            "another batch the step's gradient is the previous batch's.",
        ),
    },
    telemetry=OUTER_OPTIONS["telemetry"],
    curvature_kwargs=OUTER_OPTIONS["curvature_kwargs"],
    reject_nonfinite=OUTER_OPTIONS["reject_nonfinite"],
)


def _line_search(o: Mapping[str, Any]) -> LineSearchSpec | None:
    ls = o["line_search"]
    if o["reuse_line_search_value"] is not False and ls != "zoom":
        raise ValueError(
            f'lbfgs: reuse_line_search_value=True needs line_search="zoom" (got {ls!r}); for a LineSearchSpec, '
            'pass LineSearchSpec("zoom", kwargs={"reuse_value": True})'
        )
    if ls is None or isinstance(ls, LineSearchSpec):
        return ls
    if ls == "zoom":
        kwargs: dict[str, Any] = {"max_linesearch_steps": o["max_linesearch_steps"]}
        if o["reuse_line_search_value"]:
            kwargs["reuse_value"] = True
        return LineSearchSpec("zoom", kwargs=kwargs)
    return LineSearchSpec(ls)


def _build(o: Mapping[str, Any]) -> SecondOrderMethod:
    kwargs = model_kwargs("lbfgs", o, ("loss_fn", "predict_fn", "loss"))
    require("lbfgs", kwargs, ("loss_fn",), ("predict_fn", "loss"))
    validate.integer("lbfgs: memory_size", o["memory_size"], minimum=1)
    return assemble(
        curvature=CurvatureSpec("hessian", kwargs=kwargs),
        solver=SolverSpec("identity"),
        damping=DampingSpec("constant", lam0=0.0),
        line_search=_line_search(o),
        telemetry=o["telemetry"],
        reject_nonfinite=o["reject_nonfinite"],
        tx=lbfgs_chain(o["memory_size"], o["scale_init_precond"], o["learning_rate"]),
    )


lbfgs = define_preset(
    "lbfgs",
    _build,
    positional="loss_fn",
    options=_OPTIONS,
    doc="""L-BFGS [Liu & Nocedal 1989] with Optax's ``scale_by_lbfgs`` and a line search, parameter lane.

    ``w ← w − α·lr·P_t g_t``: ``P_t`` is the two-loop recursion over the last ``memory_size``
    pairs ``(w_{j+1} − w_j, g_{j+1} − g_j)`` of accepted steps (a rejected or non-finite step
    pushes none: the pairs live in the Optax state, which such a step rolls back), ``α`` from
    Optax's zoom line search (strong Wolfe) on the batch loss. On a fixed (full) batch this is
    ``optax.lbfgs()`` iterate for iterate. Model: ``loss_fn(params, batch)``, or ``predict_fn``
    with ``loss="mse"``/``"ce"``; the gradient comes from one linearization per step, the line
    search evaluates the loss and gradient at its trial points (one evaluation per step more
    than ``optax.lbfgs``'s own loop, which reuses the line search's last one: on a problem whose
    gradient dominates the cost, a step costs up to twice Optax's). With
    ``reuse_line_search_value=True`` the method does the same, for a fixed batch only: after the
    first step a step evaluates the loss and gradient only at the line search's trial points
    (the kept values live in ``state.line_search``, are dropped when not finite and roll back
    with a rejected or non-finite step). Mini-batch pairs mix two batches' gradients, so use
    full or large batches.
    """,
)
