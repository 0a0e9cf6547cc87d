"""A Flax ``TrainState`` that steps a somax method (needs ``pip install "somax[flax]"``).

:class:`TrainState` subclasses ``flax.training.train_state.TrainState``: ``params``,
``step``, ``apply_fn``, ``tx`` and ``opt_state`` are as in Flax, ``tx`` is
``somax.as_optax(method)`` and the model state (a linen model's ``batch_stats`` and any
other non-``params`` collection) lives in ``opt_state`` and comes back updated from every
step::

    variables = cnn.init(key, x0, train=False)
    params, model_state = somax.adapters.split_linen_variables(variables)
    model = somax.adapters.linen_model(cnn, variables, rng_collections=("dropout",),
                                       apply_kwargs={"train": True})
    method = somax.make("sgn_ce", model=model, learning_rate=1.0)
    state = somax.flax_train.TrainState.create(
        apply_fn=cnn.apply, params=params, method=method, model_state=model_state)

    @jax.jit
    def train_step(state, batch, rng):
        return state.apply_step(batch=batch, rng=rng)      # -> (new_state, info)

    logits = state.apply_fn(state.variables, x, train=False)   # params and batch_stats

The module is imported on first use (``somax.flax_train``), so Flax stays optional.
"""

from __future__ import annotations

from typing import Any

import optax

try:
    from flax import struct
    from flax.training import train_state
except ImportError as e:  # pragma: no cover
    raise ImportError('somax.flax_train needs Flax: pip install "somax[flax]"') from e

from somax.interop import OptaxState, as_optax
from somax.method import SecondOrderMethod
from somax.step_info import StepInfo

__all__ = ["TrainState"]


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` for a somax method: ``apply_step`` and ``apply_gradients`` take the batch and rng.

    Build it with :meth:`create` from the method (not from an Optax ``tx``). Every step
    linearizes the model at ``params`` on the batch, solves ``(H + λI) s = g`` and applies
    the method's Optax chain to ``s``:

    * :meth:`apply_step` uses the batch gradient, ``g = ∇L_B(w)``, and returns
      ``(new_state, info)``;
    * :meth:`apply_gradients` uses the given ``grads`` as ``g`` (clipped, accumulated or
      otherwise transformed by the caller; see :func:`somax.as_optax` for what rho then
      measures) and returns the new state, like Flax's.

    The model state is carried in ``opt_state`` and read through :attr:`model_state`,
    :attr:`batch_stats` and :attr:`variables` (``{"params": ..., **model_state}``, ready
    for ``apply_fn`` in evaluation); :attr:`info` is the last step's ``StepInfo``.

    Attributes:
      takes_grads: whether the method can solve with an external gradient (False for the
        row lane, whose :meth:`apply_gradients` raises; use :meth:`apply_step`).
    """

    takes_grads: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def create(  # type: ignore[override]
        cls,
        *,
        apply_fn: Any,
        params: Any,
        method: SecondOrderMethod,
        model_state: Any = None,
        batch_stats: Any = None,
        **kwargs: Any,
    ) -> TrainState:
        """A new state at ``step=0`` with the method's state initialised for ``params``.

        Args:
          apply_fn: usually ``module.apply`` (kept for evaluation, as in Flax).
          params: the ``params`` collection (``split_linen_variables(variables)[0]``).
          method: the assembled method (its model: ``somax.adapters.linen_model``).
          model_state: the other collections, ``{"batch_stats": ...}``
            (``split_linen_variables(variables)[1]``); or give ``batch_stats=`` alone.
          batch_stats: shorthand for ``model_state={"batch_stats": batch_stats}``.
          kwargs: further fields of a subclass.
        """
        if "tx" in kwargs:
            raise TypeError(
                "TrainState.create: pass method= (its Optax options: learning_rate=, clip_norm=, ... of "
                "somax.make); the tx is somax.as_optax(method)"
            )
        if not isinstance(method, SecondOrderMethod):
            raise TypeError(f"TrainState.create: method must be an assembled somax method, got {type(method).__name__}")
        if batch_stats is not None:
            if model_state is not None:
                raise TypeError("TrainState.create: give model_state= or batch_stats=, not both")
            model_state = {"batch_stats": batch_stats}
        takes_grads = not method.solver.needs_gradient_rhs
        tx = as_optax(method, model_state=() if model_state is None else model_state, use_updates=takes_grads)
        return cls(
            step=0,
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=tx.init(params),
            takes_grads=takes_grads,
            **kwargs,
        )

    # --------------------------------------------------------------------------- steps

    def apply_step(self, *, batch: Any, rng: Any = None, **kwargs: Any) -> tuple[TrainState, StepInfo]:
        """One step with the batch gradient; returns ``(new_state, info)``.

        ``rng`` is needed when the method draws random numbers (dropout streams named in
        ``linen_model(rng_collections=...)``, Hutchinson probes); the step derives a fresh
        key per step from it. ``kwargs`` replace further fields, as in Flax.
        """
        new = self._update(None, batch, rng, kwargs)
        return new, new.info

    def apply_gradients(self, *, grads: Any, batch: Any = None, rng: Any = None, **kwargs: Any) -> TrainState:
        """One step that solves with ``grads`` as ``g``; the loss, curvature and model state come from ``batch``."""
        if batch is None:
            raise TypeError(
                "TrainState.apply_gradients: a somax step needs the batch (the curvature and the loss come "
                "from it): state.apply_gradients(grads=g, batch=batch, rng=key), or state.apply_step(batch=...)"
            )
        if not self.takes_grads:
            raise ValueError(
                "TrainState.apply_gradients: this method's solver works in example space from the batch "
                "residuals and cannot use external gradients (the row lane); use state.apply_step(batch=...)"
            )
        return self._update(grads, batch, rng, kwargs)

    def _update(self, grads: Any, batch: Any, rng: Any, kwargs: dict) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, batch=batch, rng=rng)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

    # --------------------------------------------------------------------------- views

    @property
    def model_state(self) -> Any:
        """The model state after the last step (linen: the non-``params`` collections)."""
        return _optax_state(self.opt_state).model_state

    @property
    def batch_stats(self) -> Any:
        """The ``batch_stats`` collection of :attr:`model_state` (BatchNorm statistics)."""
        state = self.model_state
        if not hasattr(state, "get") or state.get("batch_stats") is None:
            raise AttributeError(
                "TrainState.batch_stats: the model state has no 'batch_stats' collection; "
                "pass TrainState.create(..., model_state=split_linen_variables(variables)[1])"
            )
        return state["batch_stats"]

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params": params, **model_state}``: the variables for ``apply_fn`` in evaluation."""
        state = self.model_state
        return {"params": self.params, **(dict(state) if state else {})}

    @property
    def info(self) -> StepInfo:
        """The last step's ``StepInfo`` (sentinels before the first step)."""
        return _optax_state(self.opt_state).info


def _optax_state(opt_state: Any) -> OptaxState:
    if not isinstance(opt_state, OptaxState):
        raise TypeError(f"TrainState: opt_state is {type(opt_state).__name__}, not the OptaxState of somax.as_optax")
    return opt_state
