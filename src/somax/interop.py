"""Use an assembled method as an Optax ``GradientTransformationExtraArgs``.

``tx = somax.as_optax(method)`` drops into an Optax-style loop (``optax.chain``, Flax's
``TrainState``, ``nnx.Optimizer``). The incoming updates are the gradient ``g`` of the
damped system ``(H + λI) s = g``, so transforms placed before it in a chain (clipping,
weight decay, gradient accumulation) act on the right-hand side; the batch (and rng)
come as extra arguments, since the loss, the curvature ``H`` and the model state are
computed from the batch::

    tx = somax.as_optax(method, model_state=batch_stats_or_rest)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch, rng=key)
    params = optax.apply_updates(params, updates)
    opt_state.info, opt_state.model_state   # the last step's StepInfo, the updated model state

See :func:`as_optax` for the arguments and what each lane accepts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from somax._tree import scalar_dtype
from somax.method import MethodState, SecondOrderMethod
from somax.probes import block_names
from somax.step_info import StepInfo
from somax.telemetry import fill_info

__all__ = ["OptaxState", "as_optax"]

_UNSET: Any = object()


class OptaxState(NamedTuple):
    """State of :func:`as_optax`: the method's state and the last step's ``StepInfo``.

    Attributes:
      method: the :class:`~somax.MethodState` (λ, solver warm start, Optax chain state,
        counters, and the model state).
      info: the last step's ``StepInfo`` (all sentinels before the first update; the
        model's ``aux`` outputs are not kept: read them from ``method.step``).
    """

    method: MethodState
    info: StepInfo

    @property
    def model_state(self) -> Any:
        """The model state after the last update (e.g. BatchNorm statistics); the initial one before."""
        return self.method.model_state


def as_optax(
    method: SecondOrderMethod, *, model_state: Any = (), use_updates: bool = True
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``method`` as an ``optax.GradientTransformationExtraArgs``.

    Each ``update`` runs one ``method.step`` at ``params`` on the batch. The incoming
    updates are the gradient ``g`` it solves with: the step returns

    ``u = tx_m(s)``, with ``(H_B(w) + λI) s = g``,

    where ``H_B`` is the method's curvature on the batch (GGN, Hessian, or a diagonal
    estimate), λ its damping and ``tx_m`` the method's own Optax chain (learning rate,
    momentum, …). A transform placed before ``as_optax`` in ``optax.chain`` therefore
    changes the right-hand side: ``optax.chain(optax.clip_by_global_norm(1.0),
    somax.as_optax(m))`` solves with the clipped gradient, ``optax.add_decayed_weights``
    adds ``w d`` to it, ``optax.MultiSteps`` passes an accumulated gradient. Transforms
    after it act on the update ``u``.

    The loss, the curvature and the model state always come from ``batch``; ``g``
    replaces the batch gradient ``∇L_B(w)`` everywhere the step reads it (see the
    ``grad`` argument of :meth:`SecondOrderMethod.step`), including the predicted
    decrease ``pred = −(gᵀu + ½uᵀH_B u)``. So ``info["rho"] = (L_B(w) − L_B(w+u)) /
    pred`` measures how well the quadratic model built on the supplied ``g`` predicts
    the batch loss: with ``g = ∇L_B(w)`` it is the usual gain ratio, and a ``g`` that
    differs from the batch gradient (clipped, decayed, accumulated over other batches,
    computed with another dropout mask) moves rho away from 1, which a trust-region
    damping reads as a worse model. ``info["grad_norm"]`` is ``‖g‖``.

    Lanes: the parameter lane (CG and dense solvers: ``sgn_*``, ``newton_cg``,
    ``ggn_direct_*``, ``newton_direct``) and the diagonal lane (``adahessian``,
    ``sophia_*``) take ``g``. The row lane (``egn_*``: ``row_cholesky``, ``row_cg``,
    ``block_row_cholesky``) solves ``(ĴĴᵀ + μI) v = r`` in example space from the
    batch residuals ``r`` and returns ``s = Ĵᵀv`` for the batch gradient, so it cannot
    take an external ``g``: ``as_optax`` raises ``ValueError`` for it unless
    ``use_updates=False``.

    Args:
      method: an assembled method (:func:`somax.make`, :func:`somax.assemble`).
      model_state: the model's initial state (linen: the non-``params`` collections,
        ``split_linen_variables(variables)[1]``; NNX: ``rest`` of ``nnx.split(module,
        nnx.Param, ...)``). ``init`` stores it in the opt state, every ``update``
        carries it forward, and ``opt_state.model_state`` reads it. Default ``()``: a
        model without state.
      use_updates: ``True`` (default): the incoming updates are ``g``; passing
        ``None`` as the updates uses the batch gradient instead. ``False``: the
        incoming updates are ignored and the method differentiates the batch itself
        (for the row lane, or a loop that has no gradient to pass).

    Returns:
      ``optax.GradientTransformationExtraArgs`` with

      * ``init(params, model_state=<as_optax's>)`` → :class:`OptaxState`;
      * ``update(updates, state, params, *, batch, rng=None, model_state=None)`` →
        ``(u, new_state)``. ``params`` and ``batch`` are required; ``rng`` is needed
        when the method draws random numbers (dropout, Hutchinson probes);
        ``model_state=`` replaces the carried model state for this step. Other extra
        arguments of a chain are accepted and ignored.

      ``new_state.info`` is the step's ``StepInfo`` (``info["loss"]``,
      ``info["rho"]``, …; ``somax.to_floats(info)`` for a logger) and
      ``new_state.model_state`` the updated model state. The state's structure never
      changes, so ``update`` works under ``jax.jit`` and ``lax.scan``.

    Raises:
      ValueError: ``use_updates=True`` with a row-lane method.

    Examples:
      Clip the gradient, then solve with it::

        method = somax.make("sgn_ce", predict_fn=apply, learning_rate=1.0)
        tx = optax.chain(optax.clip_by_global_norm(1.0), somax.as_optax(method))
        opt_state = tx.init(params)
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
        params = optax.apply_updates(params, updates)

      A linen model with BatchNorm (see also :class:`somax.flax_train.TrainState`)::

        params, model_state = somax.adapters.split_linen_variables(variables)
        model = somax.adapters.linen_model(cnn, variables, apply_kwargs={"train": True})
        tx = somax.as_optax(somax.make("sgn_ce", model=model), model_state=model_state)
        opt_state = tx.init(params)
        updates, opt_state = tx.update(grads, opt_state, params, batch=batch, rng=key)
        model_state = opt_state.model_state          # new batch_stats, for evaluation

      ``nnx.Optimizer`` forwards its keyword arguments to ``update``::

        graphdef, _, rest = nnx.split(module, nnx.Param, ...)
        method = somax.make("sgn_ce", model=somax.adapters.nnx_model(graphdef))
        optimizer = nnx.Optimizer(module, somax.as_optax(method, model_state=rest), wrt=nnx.Param)
        grads = nnx.grad(loss_fn)(module)
        optimizer.update(module, grads, batch=batch, rng=key)

      The row lane, which solves from the batch residuals::

        tx = somax.as_optax(somax.make("egn_mse", predict_fn=apply), use_updates=False)
    """
    if not isinstance(method, SecondOrderMethod):
        raise TypeError(
            f"as_optax: expected an assembled method (somax.make / somax.assemble), got {type(method).__name__}"
        )
    if not isinstance(use_updates, bool):
        raise TypeError(f"as_optax: use_updates must be True or False, got {use_updates!r}")
    if use_updates and method.solver.needs_gradient_rhs:
        raise ValueError(
            f"as_optax: the solver {type(method.solver).__name__} (lane {method.solver.lane!r}) solves in example "
            "space from the batch residuals, not from a gradient, so it cannot use the incoming updates as the "
            "right-hand side g. Pass use_updates=False to let it differentiate the batch itself (the incoming "
            "updates are then ignored), or use a parameter-lane (sgn_*, ggn_direct_*) or diagonal-lane "
            "(sophia_*, adahessian) method, which take g"
        )
    template = model_state

    def init(params: Any, model_state: Any = _UNSET) -> OptaxState:
        ms = template if model_state is _UNSET else model_state
        # the info slot starts as sentinels, so the state's structure never changes (scan-safe)
        blocks = block_names(params) if "block_top_eig" in method.plan.info_schema else ()
        info = fill_info(method.plan.info_schema, {}, scalar_dtype(params), blocks)
        return OptaxState(method.init(params, ms), info)

    def update(
        updates: Any,
        state: OptaxState,
        params: Any = None,
        *,
        batch: Any = None,
        rng: Any = None,
        model_state: Any = None,
        **extra: Any,
    ) -> tuple[Any, OptaxState]:
        if params is None:
            raise ValueError("as_optax: update() needs params (the method linearizes at them)")
        if batch is None:
            raise ValueError("as_optax: update() needs the batch as an extra argument: update(g, s, params, batch=...)")
        if not isinstance(state, OptaxState):
            raise TypeError(f"as_optax: state must be the OptaxState from tx.init, got {type(state).__name__}")
        carried = state.method.model_state
        ms = carried if model_state is None else model_state
        # Containers that strip variable wrappers (nnx.Optimizer keeps plain arrays in its opt state
        # and its keyword arguments) hand back the model state without them: restore the layout the
        # model was given, and return the new one in the layout it came in, so the state keeps its
        # structure from call to call.
        ms = _restructure(ms, template, "model_state")
        grad = updates if use_updates else None
        new_params, new_state, info = method.step(params, batch, state.method._replace(model_state=ms), rng, grad=grad)
        new_ms = _restructure(new_state.model_state, carried, "model_state")
        new_state = new_state._replace(model_state=_keep_dtypes(new_ms, carried))
        delta = jax.tree_util.tree_map(lambda a, b: a - b, new_params, params)
        info = info.without("aux") if "aux" in info else info  # model aux outputs: read them from method.step
        return delta, OptaxState(new_state, info)

    return optax.GradientTransformationExtraArgs(init, update)


def _restructure(value: Any, like: Any, name: str) -> Any:
    """``value`` in ``like``'s tree structure when only wrapper nodes differ (same keys and shapes)."""
    treedef = jax.tree_util.tree_structure(like)
    if jax.tree_util.tree_structure(value) == treedef:
        return value
    got = jax.tree_util.tree_flatten_with_path(value)[0]
    ref = jax.tree_util.tree_flatten_with_path(like)[0]
    if not ref:
        return value  # no model state was given: take the model's as it comes
    keys = lambda path: tuple(k for k in path if not isinstance(k, jax.tree_util.GetAttrKey))  # noqa: E731
    same = len(got) == len(ref) and all(
        keys(a) == keys(b) and jax.numpy.shape(x) == jax.numpy.shape(y) for (a, x), (b, y) in zip(got, ref)
    )
    if not same:
        names = lambda leaves: [jax.tree_util.keystr(keys(p)) for p, _ in leaves]  # noqa: E731
        raise ValueError(
            f"as_optax: {name} does not fit the model state given to as_optax/init ({names(got)} vs {names(ref)}); "
            "pass as_optax(method, model_state=...) with the model's initial state"
        )
    return jax.tree_util.tree_unflatten(treedef, [x for _, x in got])


def _keep_dtypes(new: Any, old: Any) -> Any:
    """``new`` with each floating leaf cast to ``old``'s dtype, so the opt state's types never change.

    (A Flax BatchNorm under ``jax_enable_x64`` returns float64 statistics for float32 ones.)
    """
    if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(old):
        return new

    def cast(a: Any, b: Any) -> Any:
        a_dt, b_dt = getattr(a, "dtype", None), getattr(b, "dtype", None)
        if a_dt is None or b_dt is None or a_dt == b_dt or not jax.numpy.issubdtype(b_dt, jax.numpy.floating):
            return a
        return a.astype(b_dt)

    return jax.tree_util.tree_map(cast, new, old)
