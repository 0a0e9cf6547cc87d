"""Shared pieces of the diagonal curvature estimators.

An estimator is a small frozen object layered on the step's single
:class:`~somax.curvature.base.Linearization`; it never linearizes the model again.
The step (:mod:`somax.method`) calls it on the plan's ``"estimator"`` cadence:

* ``every_k``: the cadence (``-1`` off, ``k >= 1``: steps ``0, k, 2k, …``); the spec
  keyword is ``eval_every_k``.
* ``produces_diagonal``: ``True`` — the output feeds a diagonal preconditioner.
* ``needs_model_outputs``: ``True`` when the estimator needs the model outputs ``z``
  and the VJP of a GGN linearization (assembly rejects it with the Hessian).
* ``init(params) -> state`` and ``diagonal(lin, rng, state) -> (diag, state)``.

The state of every built-in estimator is :class:`EstimatorState`, which counts the
refreshes performed. The count is folded into the probe key, so even a caller that
passes the same ``rng`` at every step gets fresh probes at every refresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from somax.specs import check_cadence

PyTree = Any

__all__ = [
    "EstimatorState",
    "init_state",
    "refresh_key",
    "rademacher_like",
    "average_over_keys",
    "check_count",
    "check_every_k",
]


class EstimatorState(NamedTuple):
    """Persistent estimator state: ``refreshes`` counts the estimates made so far."""

    refreshes: jax.Array


def init_state() -> EstimatorState:
    return EstimatorState(jnp.zeros((), jnp.int32))


def refresh_key(rng: jax.Array, state: EstimatorState) -> jax.Array:
    """The key for this refresh: ``rng`` folded with the refresh count."""
    return jax.random.fold_in(rng, state.refreshes)


def rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
    """A pytree like ``tree`` of independent Rademacher (±1) entries in each leaf's dtype.

    All entries come from *one* flat draw of random bits that is then cut into the
    leaves: one PRNG computation instead of one per leaf, and a 1-D one — with
    ``jax_threefry_partitionable`` (the default) XLA:CPU compiles a draw of a
    multi-dimensional shape many times slower (seconds for a 4-D conv kernel).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(jnp.size(x)) for x in leaves]
    total = sum(sizes)
    if total == 0:
        return jax.tree_util.tree_map(jnp.zeros_like, tree)
    bits = jax.random.bits(key, (total,), jnp.uint8)
    signs = 1 - 2 * (bits & 1).astype(jnp.int8)
    out, start = [], 0
    for x, n in zip(leaves, sizes):
        out.append(signs[start : start + n].reshape(jnp.shape(x)).astype(jnp.result_type(x)))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def average_over_keys(one: Callable[[jax.Array], PyTree], key: jax.Array, n: int) -> PyTree:
    """``1/n Σ_k one(key_k)`` for ``n`` independent keys split from ``key``.

    ``n == 1`` calls ``one`` once; otherwise the ``n`` samples are computed in one
    batched (``vmap``-ed) pass, which needs ``n`` times the memory of one sample.
    """
    if n == 1:
        return one(key)
    samples = jax.vmap(one)(jax.random.split(key, n))
    return jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0).astype(s.dtype), samples)


def check_count(where: str, value: Any) -> int:
    """Validate a positive integer count (``n_probes``, ``n_samples``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be an int >= 1, got {value!r}")
    return value


def check_every_k(where: str, value: Any) -> int:
    """Validate the ``eval_every_k`` cadence (``-1`` off, ``k >= 1``)."""
    return check_cadence(where, value)

