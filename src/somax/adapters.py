"""Adapters that turn Flax modules into :class:`somax.Model` (Flax is an optional extra).

* :func:`linen_model` — a ``flax.linen`` module: ``params`` are ``variables["params"]``;
  the other collections (e.g. ``batch_stats``) are the model state, updated through
  ``mutable=``; the rng streams named in ``rng_collections=`` (e.g. ``"dropout"``) draw
  from the step's rng. Given the module's ``variables``, the adapter infers whether the
  model couples examples (a mutable ``batch_stats`` collection).
* :func:`nnx_model` — a ``flax.nnx`` module split as ``graphdef, params, rest =
  nnx.split(module, nnx.Param, ...)``; ``rest`` (batch statistics, rng streams) is the
  model state and comes back updated after every step. Stored ``nnx.Rngs`` streams are
  re-keyed from the step's rng on every call, and call-time ``rngs=`` can be fed from it.

Example::

    variables = cnn.init(key, x0, train=False)
    params, model_state = somax.adapters.split_linen_variables(variables)
    model = somax.adapters.linen_model(cnn, variables, apply_kwargs={"train": True})
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


def _fresh_key(rng: Any, like: Any) -> Any:
    """``rng`` as a key of the same kind as ``like`` (typed key or raw ``uint32[2]``) and ``like``'s shape."""
    import jax
    import jax.numpy as jnp

    typed = jnp.issubdtype(like.dtype, jax.dtypes.prng_key)
    if typed and not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if jnp.shape(like) != ():
        rng = jax.random.split(rng, jnp.shape(like))
    if not typed and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return rng


def linen_model(
    module: Any,
    variables: Mapping[str, Any] | None = None,
    *,
    mutable: Sequence[str] = ("batch_stats",),
    rng_collections: Sequence[str] = (),
    apply_kwargs: Mapping[str, Any] | None = None,
    has_aux: bool = False,
    couples_examples: bool | None = None,
) -> Model:
    """Wrap a ``flax.linen`` module.

    Args:
      module: the module; called as ``module.apply({"params": p, **state}, x, **apply_kwargs)``.
      variables: the module's variables (``module.init(...)``) or its model state
        (``split_linen_variables(...)[1]``); only the collection names are read. They
        tell whether the model couples examples and which collections ``model_state``
        must hold (a missing one is reported naming ``model_state=``).
      mutable: collections updated by the forward pass (kept only if present in the state).
      rng_collections: rng streams fed from the step's rng (fresh every step), e.g.
        ``("dropout",)`` for a module with dropout in training mode. The default ``()``
        means the model draws no randomness, so the step needs no rng for it; a module
        that does draw one fails with an error naming ``rng_collections=``. (This default
        was ``("dropout",)`` in somax 0.1.0, which made every linen model demand an rng.)
      apply_kwargs: extra keyword arguments, e.g. ``{"train": True}``.
      has_aux: the module returns ``(outputs, aux)``.
      couples_examples: outputs of one example depend on others (BatchNorm in training
        mode). ``None`` infers it: with ``variables``, True when a ``mutable`` collection
        ``batch_stats`` exists in them; without, True when ``"batch_stats"`` is in
        ``mutable`` (the conservative guess: pass ``variables`` or ``False`` for models
        without BatchNorm, so the row-space Gram solvers accept them).
    """
    if not hasattr(module, "apply"):
        raise TypeError(f"linen_model: expected a flax.linen Module, got {type(module).__name__}")
    if variables is not None and not isinstance(variables, Mapping):
        raise TypeError(
            f"linen_model: variables must be the mapping of collections from module.init(...), "
            f"got {type(variables).__name__}"
        )
    kwargs = dict(apply_kwargs or {})
    collections = tuple(mutable)
    streams = tuple(rng_collections)
    if isinstance(mutable, str) or isinstance(rng_collections, str):
        raise TypeError("linen_model: mutable= and rng_collections= are sequences of names, e.g. ('dropout',)")
    needed = tuple(sorted(c for c in (variables or {}) if c != "params"))
    if couples_examples is None:
        if variables is not None:
            couples_examples = "batch_stats" in collections and "batch_stats" in variables
        else:
            couples_examples = "batch_stats" in collections

    def apply(params: Any, model_state: Any, x: Any, rng: Any) -> tuple[Any, Any, Any]:
        state = dict(model_state or {})
        missing = [c for c in needed if c not in state]
        if missing:
            raise _missing_collections(missing, state)
        rngs = None
        if streams and rng is not None:
            import jax

            rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(streams)}
        mut = [c for c in collections if c in state]
        full = {"params": params, **state}
        from flax import errors

        try:
            if mut:
                out, updates = module.apply(full, x, mutable=mut, rngs=rngs, **kwargs)
                state.update(updates)
            else:
                out = module.apply(full, x, rngs=rngs, **kwargs)
        except errors.ScopeCollectionNotFound as e:
            import re

            found = re.search(r'collection "([^"]+)"', str(e))
            raise _missing_collections([found.group(1) if found else "?"], state, e) from e
        except errors.InvalidRngError as e:
            raise ValueError(
                f"linen_model: the module draws randomness ({e}); name its rng streams with "
                f"rng_collections=, e.g. linen_model(module, variables, rng_collections=('dropout',)), "
                f"so they are fed from the step's rng"
                + ("" if not streams or rng is not None else " (and pass an rng)")
            ) from e
        aux = None
        if has_aux:
            out, aux = out
        return out, state, aux

    return Model(apply, uses_rng=bool(streams), couples_examples=bool(couples_examples), has_aux=has_aux)


def _missing_collections(names: Sequence[str], state: Mapping[str, Any], cause: Exception | None = None) -> ValueError:
    have = sorted(state) if state else "none"
    why = f" ({cause})" if cause is not None else ""
    return ValueError(
        f"linen_model: the module needs the variable collection(s) {list(names)}{why}, but the model state "
        f"has {have}. Pass them as the model state: params, model_state = "
        f"somax.adapters.split_linen_variables(module.init(...)); state = method.init(params, model_state=model_state)"
    )


def _nnx_variable_types(graphdef: Any) -> tuple[type, ...] | None:
    """The variable types a ``GraphDef`` declares, or None when its layout is not the one known here."""
    nodes = getattr(graphdef, "nodes", None)
    if nodes is None:
        return None
    types = tuple(t for n in nodes if isinstance(t := getattr(n, "type", None), type))
    return types


def nnx_model(
    graphdef: Any,
    *filters: Any,
    has_aux: bool = False,
    couples_examples: bool | None = None,
    uses_rng: bool | None = None,
    call_rngs: str | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> Model:
    """Wrap a split ``flax.nnx`` module: ``graphdef, params, rest = nnx.split(module, nnx.Param, ...)``.

    ``params`` are optimised; ``rest`` is passed to ``method.init(params, rest)`` as the
    model state and returned updated after every step: BatchNorm statistics
    (``nnx.BatchStat``) move like linen's ``batch_stats``. Each call merges fresh copies of
    the variables (``nnx.merge(..., copy=True)``), so stateful modules work eagerly and
    under ``jax.jit``/``jax.linearize``.

    Randomness comes from the step's rng: every ``nnx.Rngs`` stream stored in the module
    (e.g. ``nnx.Dropout(rate, rngs=rngs)``) gets a key derived from it on each call, and
    its key and counter in the returned model state stay as they were passed in.

    Args:
      graphdef: the ``GraphDef`` from ``nnx.split`` (or the module itself; only its
        structure is used).
      filters: the ``nnx.split`` filters, default ``(nnx.Param, ...)``: parameters, then
        the model state (a tuple of States when more than two filters are given).
      has_aux: the module returns ``(outputs, aux)``.
      couples_examples: ``None`` infers it (True when the module holds ``nnx.BatchStat``
        variables, i.e. BatchNorm; pass False for a BatchNorm module in eval mode).
      uses_rng: ``None`` infers it (True when the module stores rng streams or
        ``call_rngs`` is set).
      call_rngs: name of a call keyword that receives an ``nnx.Rngs`` seeded from the
        step's rng, e.g. ``"rngs"`` for ``module(x, rngs=rngs)``; its named streams
        (``rngs.dropout()``) fall back to its default stream.
      call_kwargs: extra keyword arguments of the call, e.g. ``{"train": True}``.
    """
    from flax import nnx

    if isinstance(graphdef, nnx.Module):
        graphdef = nnx.graphdef(graphdef)
    split_filters = filters or (nnx.Param, ...)
    n_rest = len(split_filters) - 1  # model state: one State, or a tuple of them for more filters
    if n_rest < 1:
        raise TypeError("nnx_model: filters must name the parameters and the model state, e.g. (nnx.Param, ...)")
    kwargs = dict(call_kwargs or {})
    if call_rngs is not None and not isinstance(call_rngs, str):
        raise TypeError(f"nnx_model: call_rngs must be the name of the call keyword (e.g. 'rngs'), got {call_rngs!r}")
    types = _nnx_variable_types(graphdef)
    has_streams = bool(types) and any(issubclass(t, nnx.RngKey) for t in types)
    if couples_examples is None:
        couples_examples = bool(types) and any(issubclass(t, nnx.BatchStat) for t in types)
    if uses_rng is None:
        uses_rng = has_streams or call_rngs is not None

    def is_var(v: Any) -> bool:
        return isinstance(v, nnx.Variable)

    def rekey(model_state: Any, rng: Any) -> Any:
        """Stored rng streams keyed from ``rng`` (stream i: ``fold_in(fold_in(rng, 0), i)``), counters at 0."""
        import jax
        import jax.numpy as jnp

        leaves, treedef = jax.tree_util.tree_flatten(model_state, is_leaf=is_var)
        base = jax.random.fold_in(rng, 0)
        out, i = [], 0
        for v in leaves:
            if isinstance(v, nnx.RngKey):
                v = v.replace(_fresh_key(jax.random.fold_in(base, i), v.get_value()))
                i += 1
            elif isinstance(v, nnx.RngCount):
                v = v.replace(jnp.zeros_like(v.get_value()))
            out.append(v)
        return jax.tree_util.tree_unflatten(treedef, out)

    def apply(params: Any, model_state: Any, x: Any, rng: Any) -> tuple[Any, Any, Any]:
        import jax

        state_in = model_state if model_state is not None else ()
        empty = isinstance(state_in, tuple) and state_in == ()
        rest = () if empty else (state_in,) if n_rest == 1 else tuple(state_in)
        if has_streams and rng is not None and rest:
            rest = rekey(rest, rng)
        try:
            module = nnx.merge(graphdef, params, *rest, copy=True)
        except ValueError as e:
            have = "none" if empty else "a state that does not fit the graphdef"
            raise ValueError(
                f"nnx_model: could not rebuild the module from params and the model state ({have}): {e}. "
                f"Pass the non-parameter state as the model state: graphdef, params, rest = "
                f"nnx.split(module, nnx.Param, ...); state = method.init(params, model_state=rest)"
            ) from e
        call = dict(kwargs)
        if call_rngs is not None:
            if rng is None:
                raise ValueError(f"nnx_model: the module takes {call_rngs}= at call time, but no rng was given")
            call[call_rngs] = nnx.Rngs(jax.random.fold_in(rng, 1))
        out = module(x, **call)
        new_rest = tuple(nnx.split(module, *split_filters)[2:])
        if empty:
            if jax.tree_util.tree_leaves(new_rest):
                new_state = new_rest[0] if n_rest == 1 else new_rest
            else:
                new_state = state_in  # a module without state: keep the model state () as given
        else:
            if has_streams:  # the stored streams' keys and counters stay as passed in
                passed = (state_in,) if n_rest == 1 else tuple(state_in)
                new_rest = jax.tree_util.tree_map(
                    lambda new, old: old if isinstance(old, (nnx.RngKey, nnx.RngCount)) else new,
                    new_rest,
                    passed,
                    is_leaf=is_var,
                )
            new_state = new_rest[0] if n_rest == 1 else new_rest
        aux = None
        if has_aux:
            out, aux = out
        return out, new_state, aux

    return Model(apply, uses_rng=bool(uses_rng), couples_examples=bool(couples_examples), has_aux=has_aux)
