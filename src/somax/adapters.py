"""Adapters that turn Flax modules into :class:`somax.Model` (Flax is an optional extra).

* :func:`linen_model` — a ``flax.linen`` module: ``params`` are ``variables["params"]``;
  the other collections (e.g. ``batch_stats``) are the model state, updated through
  ``mutable=``; dropout draws from the step's rng through ``rngs={"dropout": …}``.
* :func:`nnx_model` — a ``flax.nnx`` module split as ``graphdef, params, rest =
  nnx.split(module, nnx.Param, ...)``; ``rest`` (batch statistics, rng counters) is the
  model state and comes back updated after every step.

Example::

    variables = cnn.init(key, x0, train=False)
    params, model_state = somax.adapters.split_linen_variables(variables)
    model = somax.adapters.linen_model(cnn, apply_kwargs={"train": True})
    method = somax.make("sgn_ce", model=model)
    state = method.init(params, model_state)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from somax.curvature.model import Model

__all__ = ["linen_model", "split_linen_variables", "nnx_model"]


def split_linen_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(variables["params"], {other collections})`` from ``module.init(...)``."""
    if "params" not in variables:
        raise KeyError(f"split_linen_variables: no 'params' collection; collections: {sorted(variables)}")
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def linen_model(
    module: Any,
    *,
    mutable: Sequence[str] = ("batch_stats",),
    rng_collections: Sequence[str] = ("dropout",),
    apply_kwargs: Mapping[str, Any] | None = None,
    has_aux: bool = False,
) -> Model:
    """Wrap a ``flax.linen`` module.

    Args:
      module: the module; called as ``module.apply({"params": p, **state}, x, **apply_kwargs)``.
      mutable: collections updated by the forward pass (kept only if present in the state).
      rng_collections: rng streams fed from the step's rng (fresh every step); an empty
        sequence means the model draws no randomness.
      apply_kwargs: extra keyword arguments, e.g. ``{"train": True}``.
      has_aux: the module returns ``(outputs, aux)``.
    """
    if not hasattr(module, "apply"):
        raise TypeError(f"linen_model: expected a flax.linen Module, got {type(module).__name__}")
    kwargs = dict(apply_kwargs or {})
    collections = tuple(mutable)
    streams = tuple(rng_collections)

    def apply(params: Any, model_state: Any, x: Any, rng: Any) -> tuple[Any, Any, Any]:
        state = dict(model_state or {})
        rngs = None
        if streams and rng is not None:
            import jax

            rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(streams)}
        mut = [c for c in collections if c in state]
        variables = {"params": params, **state}
        if mut:
            out, updates = module.apply(variables, x, mutable=mut, rngs=rngs, **kwargs)
            state.update(updates)
        else:
            out = module.apply(variables, x, rngs=rngs, **kwargs)
        aux = None
        if has_aux:
            out, aux = out
        return out, state, aux

    return Model(apply, uses_rng=bool(streams), couples_examples="batch_stats" in collections, has_aux=has_aux)


def nnx_model(graphdef: Any, *filters: Any, has_aux: bool = False, couples_examples: bool = False) -> Model:
    """Wrap a split ``flax.nnx`` module: ``graphdef, params, rest = nnx.split(module, nnx.Param, ...)``.

    ``params`` are optimised; ``rest`` is passed to ``method.init(params, rest)`` as the
    model state and returned updated (BatchNorm statistics, dropout rng counters).
    ``filters`` default to ``(nnx.Param, ...)``. Set ``couples_examples=True`` for
    models with BatchNorm in training mode.
    """
    from flax import nnx

    split_filters = filters or (nnx.Param, ...)

    def apply(params: Any, model_state: Any, x: Any, rng: Any) -> tuple[Any, Any, Any]:
        module = nnx.merge(graphdef, params, model_state)
        out = module(x)
        _, _, new_state = nnx.split(module, *split_filters)
        aux = None
        if has_aux:
            out, aux = out
        return out, new_state, aux

    return Model(apply, uses_rng=False, couples_examples=couples_examples, has_aux=has_aux)
