"""Amortized estimation: a ``k``-step estimator spread over ``k`` slices of the batch, one per step.

An estimator with ``eval_every_k = k`` normally computes its statistic on the whole batch on
steps ``0, k, 2k, …``, inside a ``lax.cond`` on the step counter. With ``amortize=True``
(``EstimatorSpec("gnb", kwargs={"eval_every_k": 10, "amortize": True})``, preset option
``amortize_estimator``) the step instead

* at every step ``t``, linearizes the model on slice ``t mod k`` of the batch (``m = ⌊b/k⌋``
  examples at offset ``(t mod k)·m``; a remainder of ``b − k·m`` examples is never used) and
  computes the statistic ``d̂_t`` there, adding it to a running total;
* on steps ``0, k, 2k, …`` hands the mean of the totals since the last hand-over,
  ``(1/n) Σ d̂``, to the preconditioner's ``update`` (``n = 1`` at step 0, ``k`` afterwards:
  the slices of steps ``(j−1)k+1 … jk``, every slice of the batch once) and starts a new total.

The statistic handed over averages ``k·m`` examples, as the whole-batch estimate does (for a
divisible batch, exactly ``b``), and each slice's statistic has the expectation of the
estimator's (the slices' losses share the batch loss's normalisation per example); the
difference is that the ``k`` slices are evaluated at the ``k`` most recent iterates instead of
one. The first hand-over (step 0) uses one slice only.

Why: nothing in the step is conditional any more, at the price of one forward pass and the
estimator's products on ``m`` examples per step. XLA:CPU runs a convolution's weight
gradient many times slower inside a ``cond`` (or loop) body than at the top level of the
program, so on convolutional networks a whole-batch refresh in a ``cond`` cost tens of
ordinary steps; amortized, a Sophia-G step costs 1.14–1.21× and a Sophia-H or AdaHessian
step 1.17–1.35× an Adam step on a 28×28 CNN and ResNet-20 (``docs/diagonal_lane.md``). On an
accelerator the plain cadence is not penalised.

The totals are kept beside the estimator's own state (:class:`AmortizedState`) and follow
the estimator's ``on_reject``/``on_nonfinite`` policies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["AmortizedState", "init_amortized", "batch_slice", "accumulate", "hand_over"]


class AmortizedState(NamedTuple):
    """``inner``: the estimator's own state; ``total``: ``Σ d̂`` since the last hand-over
    (params-shaped); ``count``: how many statistics ``total`` holds."""

    inner: PyTree
    total: PyTree
    count: jax.Array


def init_amortized(inner: PyTree, params: PyTree) -> AmortizedState:
    """An empty total beside the estimator's initial state ``inner``."""
    return AmortizedState(inner, jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))


def batch_slice(batch: Any, index: jax.Array, parts: int) -> Any:
    """Slice ``index`` of ``parts`` equal slices of every leaf's leading (example) axis.

    Every array leaf of ``batch`` with at least one axis must have the same leading size
    ``b ≥ parts``; slice ``i`` holds examples ``[i·m, (i+1)·m)``, ``m = ⌊b/parts⌋``. Scalar
    (0-d) leaves belong to the whole batch and go to every slice unchanged.
    """
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    sizes = {jax.tree_util.keystr(p): jnp.shape(x)[0] for p, x in leaves if jnp.ndim(x)}
    distinct = set(sizes.values())
    if len(distinct) != 1:
        raise ValueError(
            "amortized estimator: every batch entry with an example axis needs the same leading size to be cut "
            f"into slices; got leading sizes {sizes or 'none (only scalar entries)'}"
        )
    (b,) = distinct
    if b < parts:
        raise ValueError(
            f"amortized estimator: a batch of {b} examples cannot be cut into eval_every_k = {parts} slices "
            "of at least one example; use a larger batch or amortize=False"
        )
    m = b // parts
    start = (index % parts) * m

    def cut(x: Any) -> Any:
        x = jnp.asarray(x)
        return x if x.ndim == 0 else jax.lax.dynamic_slice_in_dim(x, start, m, axis=0)

    return jax.tree_util.tree_map(cut, batch)


def accumulate(state: AmortizedState, statistic: PyTree, inner: PyTree) -> AmortizedState:
    """Add this step's statistic to the total."""
    total = jax.tree_util.tree_map(lambda t, s: t + s.astype(t.dtype), state.total, statistic)
    return AmortizedState(inner, total, state.count + 1)


def hand_over(state: AmortizedState, fire: jax.Array | bool) -> tuple[PyTree, AmortizedState]:
    """``(mean of the total, state)``; where ``fire`` holds, the total restarts from zero."""
    n = jnp.maximum(state.count, 1)
    mean = jax.tree_util.tree_map(lambda t: t / n.astype(t.dtype), state.total)
    total = jax.tree_util.tree_map(lambda t: jnp.where(fire, jnp.zeros_like(t), t), state.total)
    return mean, AmortizedState(state.inner, total, jnp.where(fire, 0, state.count))
