"""Limited-memory quasi-Newton preconditioner for CG, built from the solver's own curvature pairs.

Each CG iteration computes a direction ``p_k`` and its product ``A p_k`` with
``A = H_t + λ_t I``. Keeping ``m`` of these pairs from one solve gives an L-BFGS
approximation of ``A⁻¹`` that preconditions the next solve (Morales & Nocedal, 2000,
"Automatic preconditioning by limited memory quasi-Newton updating", SIAM J. Optim.
10(4)). CG's directions are ``A``-conjugate, which is what makes them good pairs: on a
fixed quadratic the update built from them inverts ``A`` exactly on their span
(Nocedal & Wright, 2006, Thm. 6.4's hereditary property), so the next solve starts with
the part of the spectrum the previous one resolved already.

The pairs are stored as ``s_i = p_i`` and ``y_i = A s_i``, together with the λ they were
made at; at use, ``y_i + (λ − λ_rec) s_i`` is the product with the current ``H + λI``, so a
damping policy that changes λ between steps keeps exact pairs for the shifted system
(only ``H`` itself moves with the batch). The inverse is the two-loop recursion (Nocedal & Wright,
Alg. 7.4) on top of a base operator ``H₀``: a preconditioner the method already has
(e.g. a diagonal one), or ``γ I`` with ``γ = sᵀy / yᵀy`` of the newest pair (6.21).
A pair with ``sᵢᵀyᵢ ≤ 0`` (possible when ``H`` is indefinite, or after λ fell) is
skipped, so the operator stays symmetric positive definite whenever ``H₀`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from somax._tree import scalar_dtype, tree_axpy, tree_scale, tree_vdot

PyTree = Any

__all__ = ["CurvaturePairs", "empty_pairs", "record_pair", "pair_count", "lbfgs_inverse"]


class CurvaturePairs(NamedTuple):
    """``m`` stored pairs: ``s`` and ``y`` are pytrees like the parameters with a leading axis ``m``.

    ``y[i] = (H + λ_rec I) s[i]`` with ``λ_rec = lam``, the damping at recording; ``valid[i]``
    marks the slots written.
    """

    s: PyTree
    y: PyTree
    lam: jax.Array
    valid: jax.Array


def empty_pairs(like: PyTree, memory: int) -> CurvaturePairs:
    """``memory`` empty slots for pairs shaped like ``like``."""
    stack = lambda x: jnp.zeros((memory, *jnp.shape(x)), jnp.asarray(x).dtype)  # noqa: E731
    zeros = jax.tree_util.tree_map(stack, like)
    return CurvaturePairs(zeros, zeros, jnp.zeros((), scalar_dtype(like)), jnp.zeros((memory,), bool))


def record_pair(pairs: CurvaturePairs, slot: jax.Array | int, s: PyTree, y: PyTree, keep: jax.Array) -> CurvaturePairs:
    """``pairs`` with ``(s, y = A s)`` written to ``slot`` where ``keep`` holds."""

    def put(stack: jax.Array, x: jax.Array) -> jax.Array:
        return stack.at[slot].set(jnp.where(keep, x.astype(stack.dtype), stack[slot]))

    return CurvaturePairs(
        jax.tree_util.tree_map(put, pairs.s, s),
        jax.tree_util.tree_map(put, pairs.y, y),
        pairs.lam,
        pairs.valid.at[slot].set(pairs.valid[slot] | keep),
    )


def pair_count(pairs: CurvaturePairs) -> jax.Array:
    """How many slots hold a pair."""
    return jnp.sum(pairs.valid.astype(jnp.int32))


def _slot(tree: PyTree, i: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def lbfgs_inverse(
    pairs: CurvaturePairs, lam: jax.Array, base: Callable[[PyTree], PyTree] | None = None
) -> Callable[[PyTree], PyTree]:
    """``v ↦ B v``: the L-BFGS approximation of ``(H + λI)⁻¹`` from ``pairs`` (two-loop recursion).

    Slots are used oldest first in index order (``record_pair`` fills ``0, 1, …`` within a
    solve). ``base`` is ``H₀``; ``None`` means ``γI`` with ``γ = sᵀy/yᵀy`` of the last valid
    pair (``1`` when there is none). Invalid slots and pairs with ``sᵀy ≤ 0`` are skipped.
    """
    m = int(pairs.valid.shape[0])
    shift = (lam - pairs.lam).astype(pairs.lam.dtype)
    ys = [tree_axpy(shift, _slot(pairs.s, i), _slot(pairs.y, i)) for i in range(m)]
    ss = [_slot(pairs.s, i) for i in range(m)]
    sy = [tree_vdot(s, y) for s, y in zip(ss, ys)]
    yy = [tree_vdot(y, y) for y in ys]
    ok = [pairs.valid[i] & (sy[i] > 0) & (yy[i] > 0) for i in range(m)]
    rho = [jnp.where(ok[i], 1.0 / jnp.where(ok[i], sy[i], 1.0), 0.0) for i in range(m)]
    gamma = jnp.ones((), pairs.lam.dtype)
    for i in range(m):  # the newest usable pair wins
        gamma = jnp.where(ok[i], sy[i] / jnp.where(ok[i], yy[i], 1.0), gamma)
    h0 = base if base is not None else (lambda q: tree_scale(gamma, q))

    def apply(v: PyTree) -> PyTree:
        q, alphas = v, [None] * m
        for i in reversed(range(m)):
            alphas[i] = rho[i] * tree_vdot(ss[i], q)
            q = tree_axpy(-alphas[i], ys[i], q)
        r = h0(q)
        for i in range(m):
            beta = rho[i] * tree_vdot(ys[i], r)
            r = tree_axpy(alphas[i] - beta, ss[i], r)
        return r

    return apply
