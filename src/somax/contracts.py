"""The component contract: one abstract base per family, with its capabilities declared on the class.

A method is assembled from six kinds of component. Each is a small frozen object
(usually a ``dataclass(frozen=True)``) with pure functions; whatever it must remember
from step to step is a pytree of arrays that it creates in ``init`` and that lives in
:class:`~somax.method.MethodState`. Capabilities are class-level declarations, read
by assembly (:mod:`somax.assemble`) and by the step skeleton (:mod:`somax.method`);
this module is the one place that lists them, with their defaults.

Every family shares :class:`Component`:

=====================  =====================================================================
declaration            meaning
=====================  =====================================================================
``info_keys``          ``StepInfo`` keys the component fills (core keys or its own)
``info_fields``        an :class:`~somax.telemetry.InfoField` for each key not in ``CORE_FIELDS``
``on_reject``          ``"keep"`` or ``"rollback"``: the component's state after a step that the
                       damping rejected (rollback: exactly the state before the step)
``on_nonfinite``       the same after a step rejected for a non-finite loss, gradient or update
``state_sharding``     ``"like_params"`` (parameter-shaped subtrees follow the parameters'
                       shardings, leaf by leaf; everything else replicated) or
                       ``"replicated"``; override :meth:`Component.state_shardings` for more
=====================  =====================================================================

and three hooks with do-nothing defaults: ``info(state)`` (values for its own
``info_keys``, read from the state at the end of the step), ``post_step(state,
update, accepted, lin)`` (called once per step with the update actually applied,
whether the step was accepted and the step's linearization, before
``on_reject``/``on_nonfinite`` apply) and
``state_shardings``.

Preconditioners consume a named *statistic* made by an :class:`Estimator` on the
estimator's cadence (``update``), and rebuild what they invert on their own
``refresh_every_k`` cadence (``refresh``); ``inverse(state, λ)`` applies the current
``λ`` at every step without a refresh. Statistic names in use: ``"diagonal"`` (an
estimate of ``diag(H)``), ``"squared_gradient"`` (``g ⊙ g``), ``"gradient"`` (``g``
itself, for preconditioners that form their own statistics, as Shampoo and SOAP do) and
``"kfac_factors"`` (per-layer Kronecker factors ``A``, ``S``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import jax

from somax.validate import OFF

if TYPE_CHECKING:  # pragma: no cover
    from somax.curvature.base import Linearization
    from somax.telemetry import InfoField

PyTree = Any
Policy = Literal["keep", "rollback"]
Lane = Literal["param", "row", "diag"]

__all__ = [
    "Component",
    "Curvature",
    "Estimator",
    "Preconditioner",
    "Solver",
    "Damping",
    "LineSearch",
    "DIAGONAL",
    "SQUARED_GRADIENT",
    "LANES",
    "POLICIES",
    "shard_like_params",
]

#: statistic: an estimate of the curvature's diagonal ``diag(H_t)``
DIAGONAL = "diagonal"
#: statistic: the squared mini-batch gradient ``g_t ⊙ g_t``
SQUARED_GRADIENT = "squared_gradient"
#: The solver lanes: parameter space, row space (``m`` batch rows), diagonal scaling.
LANES: tuple[str, ...] = ("param", "row", "diag")
#: What a component's state does after a rejected or non-finite step: keep it or restore it.
POLICIES: tuple[str, ...] = ("keep", "rollback")


def shard_like_params(state: PyTree, params: PyTree, param_shardings: PyTree, replicated: Any) -> PyTree:
    """Shardings for ``state``: every subtree with the structure and leaf shapes of ``params``
    follows ``param_shardings`` leaf by leaf; every other leaf is ``replicated``.

    Matching is by tree structure, never by a leaf's shape alone, so a square matrix that
    happens to have a kernel's shape is not given that kernel's sharding.
    """
    p_def = jax.tree_util.tree_structure(params)
    p_shapes = [tuple(getattr(x, "shape", ())) for x in jax.tree_util.tree_leaves(params)]
    p_shard = jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

    def is_param_tree(x: Any) -> bool:
        try:
            if jax.tree_util.tree_structure(x) != p_def:
                return False
        except Exception:  # noqa: BLE001  (an object that is not a pytree is no parameter tree)
            return False
        return [tuple(getattr(a, "shape", ())) for a in jax.tree_util.tree_leaves(x)] == p_shapes

    def one(x: Any) -> Any:
        if is_param_tree(x):
            return jax.tree_util.tree_unflatten(p_def, p_shard)
        return replicated

    return jax.tree_util.tree_map(one, state, is_leaf=is_param_tree)


class Component(abc.ABC):  # noqa: B024  (no abstract method shared by every family)
    """What every component declares and may hook into (see the module docstring)."""

    info_keys: ClassVar[tuple[str, ...]] = ()
    info_fields: ClassVar[Mapping[str, InfoField]] = {}
    on_reject: ClassVar[Policy] = "keep"
    on_nonfinite: ClassVar[Policy] = "rollback"
    state_sharding: ClassVar[str] = "like_params"

    def init(self, params: PyTree) -> PyTree:
        """Initial state for ``params`` (a pytree of arrays; ``()`` for none)."""
        return ()

    def info(self, state: PyTree) -> Mapping[str, jax.Array]:
        """Values of this component's ``info_keys`` at the end of a step, from its final state."""
        return {}

    def post_step(self, state: PyTree, update: PyTree, accepted: jax.Array, lin: Linearization) -> PyTree:
        """Called every step with the applied update ``u_t`` (zero for a non-finite step), the
        accepted flag and the step's linearization (``lin.grad`` is ``g_t``); returns the new state.
        ``on_reject``/``on_nonfinite`` apply afterwards."""
        return state

    def state_shardings(self, state: PyTree, params: PyTree, param_shardings: PyTree, replicated: Any) -> PyTree:
        """Shardings for this component's ``state`` (abstract shapes) given the parameters' shardings."""
        if self.state_sharding == "replicated":
            return jax.tree_util.tree_map(lambda _: replicated, state)
        return shard_like_params(state, params, param_shardings, replicated)


class Curvature(Component):
    """Curvature operator ``H_t``: one ``linearize`` per step (paper Table 6).

    Declarations: ``has_rows`` (a row form ``Ĵ`` for the row lane), ``has_model_outputs``
    (the linearization carries ``z``, its VJP and the output loss), ``uses_rng`` (the model
    draws randomness), ``has_aux`` (the step returns ``info["aux"]``), ``couples_examples``
    (the model's examples interact, e.g. BatchNorm in training mode), ``fuses_products``
    (:meth:`linearize_with_products` makes the gradient and an estimator's probe products in
    one pass).
    """

    has_rows: ClassVar[bool] = False
    has_model_outputs: ClassVar[bool] = False
    uses_rng: bool = False
    has_aux: bool = False
    couples_examples: bool = False

    @abc.abstractmethod
    def linearize(self, params: PyTree, batch: Any, model_state: Any = None, rng: Any = None) -> Linearization:
        """The step's one curvature snapshot at ``params`` on ``batch``."""

    @property
    def fuses_products(self) -> bool:
        """Whether :meth:`linearize_with_products` computes the gradient and the products in one
        pass (cheaper than ``linearize`` followed by ``matvec``); the step then uses it for an
        estimator that :attr:`~Estimator.draws_probes`."""
        return False

    def linearize_with_products(
        self,
        params: PyTree,
        batch: Any,
        model_state: Any,
        rng: Any,
        probes: PyTree,
        n: int | None,
        fire: bool | jax.Array,
    ) -> tuple[Linearization, PyTree]:
        """The snapshot and, where ``fire`` holds, the products ``H z`` of the probes ``z``.

        ``probes`` holds ``n`` probes stacked on a leading axis, or one probe without that
        axis when ``n`` is ``None``; the products have the probes' shapes, and are zeros
        where ``fire`` is false. This default takes them from ``linearize``'s ``matvec``.
        """
        from somax.curvature.base import gated_products  # the curvature package imports this module

        lin = self.linearize(params, batch, model_state, rng)
        return lin, gated_products(lin.matvec, probes, n, fire)


class Estimator(Component):
    """Produces the statistic named ``produces`` from the step's linearization, every ``every_k`` steps.

    Declarations: ``produces``, ``every_k`` (``-1`` never), ``needs_model_outputs``
    (needs ``z`` and the VJP: rejected with the Hessian), ``uses_rng``, ``amortize`` (the
    step estimates on one of ``every_k`` slices of the batch at every step and hands the mean
    over to the preconditioner on the cadence: :mod:`somax.estimators.amortized`; only for
    a params-shaped statistic), ``draws_probes`` (the statistic is ``from_products(z, H z)`` for
    probes ``z`` drawn before the step's linearization, so a curvature that ``fuses_products``
    can make ``H z`` together with the gradient).
    """

    produces: ClassVar[str]
    every_k: int = 1
    needs_model_outputs: ClassVar[bool] = False
    uses_rng: ClassVar[bool] = True
    amortize: bool = False
    draws_probes: ClassVar[bool] = False

    @abc.abstractmethod
    def estimate(self, lin: Linearization, rng: jax.Array | None, state: PyTree) -> tuple[PyTree, PyTree]:
        """``(statistic, new_state)``."""

    def probes(self, rng: jax.Array | None, state: PyTree, like: PyTree) -> tuple[PyTree, int | None]:
        """``(z, n)``: the probes this refresh multiplies by ``H``, ``n`` stacked on a leading axis
        (``None``: one, without that axis), shaped like ``like`` (the parameters).

        Only for an estimator that declares ``draws_probes``: its statistic is
        ``from_products(z, H z, state)``, and a curvature that ``fuses_products`` computes
        ``H z`` together with the gradient.
        """
        raise NotImplementedError(f"{type(self).__name__} declares no probes (draws_probes=False)")

    def from_products(self, probes: PyTree, products: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        """``(statistic, new_state)`` from the probes ``z`` and their products ``H z`` (``draws_probes``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no probes (draws_probes=False)")


class Preconditioner(Component):
    """``M⁻¹`` for PCG or the diagonal lane, from a statistic it accumulates.

    Declarations: ``consumes`` (statistics it accepts, any one), ``default_estimator``
    (the estimator kind used when the method names none), ``refresh_every_k``
    (``-1``: ``refresh`` is never called), ``provides_inverse`` (``False``: no ``M⁻¹``),
    ``refresh_uses_lam`` (``refresh`` is called as ``refresh(state, lam)`` with the step's
    ``λ``, for a preconditioner that bakes the damping into what it caches).
    """

    consumes: ClassVar[tuple[str, ...]] = ()
    default_estimator: ClassVar[str | None] = None
    refresh_every_k: int = OFF
    provides_inverse: ClassVar[bool] = True
    refresh_uses_lam: ClassVar[bool] = False

    def update(self, state: PyTree, statistic: PyTree, lin: Linearization) -> PyTree:
        """Fold a new statistic into the state (on the estimator's cadence)."""
        return state

    def refresh(self, state: PyTree, lam: jax.Array | None = None) -> PyTree:
        """Rebuild what ``inverse`` applies (a factorisation, an eigenbasis) on ``refresh_every_k``.

        ``lam`` (the step's ``λ``) is passed only when ``refresh_uses_lam`` is true.
        """
        return state

    @abc.abstractmethod
    def inverse(self, state: PyTree, lam: jax.Array) -> Callable[[PyTree], PyTree] | None:
        """``v ↦ M⁻¹ v`` for the current ``λ``, or ``None`` for no preconditioning."""


class Solver(Component):
    """Turns ``(linearization, rhs, λ, M⁻¹)`` into a direction ``s``; its ``lane`` fixes the method's lane.

    Declarations: ``lane``, ``uses_precond`` (accepts ``M⁻¹``), ``requires_precond`` (cannot
    run without one: the diagonal lane), ``needs_gradient_rhs`` (solves for ``g`` itself, so
    a ``grad_tx`` would be ignored), ``per_example_model`` (evaluates the model on single
    examples). ``solve`` returns its ``info_keys`` values as its third output.
    """

    lane: ClassVar[str]
    uses_precond: ClassVar[bool] = False
    requires_precond: ClassVar[bool] = False
    needs_gradient_rhs: ClassVar[bool] = False
    per_example_model: ClassVar[bool] = False

    @abc.abstractmethod
    def solve(
        self, lin: Linearization, rhs: PyTree, lam: jax.Array, precond: Callable | None, state: PyTree
    ) -> tuple[PyTree, PyTree, Mapping[str, jax.Array]]:
        """``(s, new_state, stats)`` for ``(H_t + λ I) s = rhs`` (2.4), or the lane's version of it."""


class Damping(Component):
    """Policy for ``λ_t``: updates on its ``every_k`` cadence from the step's signals, may reject.

    Declarations: ``every_k`` (``-1``: never updates), ``needs_rho`` (the rho bundle),
    ``needs_norms`` (``rel_update``), ``can_reject``, ``max_rel_update`` (``None``, or a
    bound ``c``: at every step, checked or not, the step scales the applied update down to
    ``‖u‖ ≤ c · max(‖w‖, 1)`` and tells the policy through ``signals["capped"]``).
    """

    every_k: int = OFF
    needs_rho: ClassVar[bool] = False
    needs_norms: bool = False
    can_reject: bool = False
    max_rel_update: float | None = None

    @abc.abstractmethod
    def init(self, params: PyTree, lam0: float) -> PyTree:  # type: ignore[override]
        """State holding ``λ_0`` as ``state.lam`` in the parameters' scalar dtype (at least float32)."""

    @abc.abstractmethod
    def update(self, state: PyTree, signals: Mapping[str, jax.Array]) -> tuple[PyTree, jax.Array, jax.Array]:
        """``(new_state, accepted, action)`` from ``signals``: ``rho`` (``nan``: no information),
        ``update_norm``, ``rel_update``, ``finite`` (False after a non-finite loss, gradient or
        update) and ``capped`` (the update was scaled down to ``max_rel_update``)."""


class LineSearch(Component):
    """Step size ``α`` on the applied update: ``search(lin, w, u, dtype) → (α, L_B(w + αu))``.

    The step calls :meth:`update`, which is :meth:`search` for a stateless line search. A line
    search may keep state (``init``; it lives in ``MethodState.line_search`` under the
    ``on_reject``/``on_nonfinite`` policies). If that state holds the loss and gradient at the
    accepted point, which on a fixed batch are those at the next step's parameters,
    :meth:`known_value_and_grad` offers them to the next step, which then skips its own
    loss-and-gradient evaluation. Both hooks default to the stateless behaviour.
    """

    @abc.abstractmethod
    def search(self, lin: Linearization, params: PyTree, updates: PyTree, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """``(α, loss at w + α u)``."""

    def update(
        self, lin: Linearization, params: PyTree, updates: PyTree, dtype: Any, state: PyTree
    ) -> tuple[jax.Array, jax.Array, PyTree]:
        """``(α, loss at w + α u, new_state)``; the default is :meth:`search` with the state unchanged."""
        alpha, loss_after = self.search(lin, params, updates, dtype)
        return alpha, loss_after, state

    def known_value_and_grad(self, state: PyTree) -> tuple[jax.Array, jax.Array, PyTree] | None:
        """``(ok, L, g)``: a loss and gradient at the step's parameters ``w_t`` that the state holds
        (where the traced flag ``ok`` is true), which the step uses instead of evaluating them on
        the batch; ``None`` (the default) when the line search never holds them."""
        return None
