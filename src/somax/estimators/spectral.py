"""Spectral telemetry from matrix-vector products of the step's own linearization.

All estimators take ``matvec: v ↦ H v`` (Hessian or GGN, from the step's single
``jax.linearize``; no second linearization) on flat vectors and an rng:

* :func:`hutchinson_trace` — ``tr(H) ≈ 1/n Σ vᵢᵀ H vᵢ`` with Rademacher ``vᵢ`` [Hutchinson 1989].
* :func:`hutchpp_trace` — Hutch++ [Meyer et al. 2021]: exact trace on a sketched
  range ``Q = orth(H S)`` plus Hutchinson on the deflated rest; unbiased, lower variance.
* :func:`lanczos` — ``m`` Lanczos steps with full reorthogonalisation: tridiagonal ``T``.
* :func:`top_eigenvalues` — top-``k`` Ritz values of ``T`` (Lanczos).
* :func:`slq_density` — stochastic Lanczos quadrature [Ubaru et al. 2017; PyHessian,
  Yao et al. 2020]: per probe, nodes ``θ_j`` (eigenvalues of ``T``) and weights
  ``τ_j = (e₁ᵀ y_j)²``; the spectral density is ``1/n Σ_probes Σ_j τ_j δ(x − θ_j)``, and
  ``Σ_j τ_j θ_j^p = qᵀ H^p q`` exactly for ``p ≤ 2m − 1``.
* :func:`block_top_eigenvalues` — top eigenvalue of each diagonal block ``H_bb`` (per layer).

**Memory.** Independent runs (trace probes, SLQ probes, blocks) are evaluated one after
another, never batched with ``vmap``: a batched product holds the temporaries of every
probe at once (10 trace probes: 10 linearised passes), and batched Lanczos runs hold one
``(m, dim)`` basis each. Inside a ``lax.cond`` (a probe on a cadence) XLA reserves a
branch's temporaries whether or not it fires, so this is what an idle probe costs.

**Unrolled loops.** ``unroll=True`` writes the Lanczos steps and the sequence of runs as
straight-line code instead of ``fori_loop``/``lax.map``: same operations, but XLA:CPU runs
a convolution that is not in the canonical layout inside a loop body tens of times slower
than outside (see
:mod:`somax.solvers.cg`, whose ``"auto"`` rule, :func:`~somax.solvers.cg.resolve_unroll`,
the spectral probes of a step apply to their total number of products).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "rademacher",
    "rademacher_probe",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "top_eigenvalues",
    "slq_density",
    "block_top_eigenvalues",
    "block_top_eigenvalues_by_id",
    "parameter_blocks",
]

FlatMatvec = Callable[[jax.Array], jax.Array]


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Independent Rademacher (±1) entries of ``shape`` in ``dtype``, drawn as int8."""
    return jax.random.rademacher(key, shape, dtype=jnp.int8).astype(dtype)


def rademacher_probe(key: jax.Array, i: int | jax.Array, dim: int, dtype) -> jax.Array:
    """The ``i``-th Rademacher probe of ``key`` (``(dim,)`` in ``dtype``), drawn on its own from
    ``fold_in(key, i)``: the probes of one estimate never exist as one ``(n, dim)`` array (drawing
    that takes several times its size in temporary random bits)."""
    return rademacher(jax.random.fold_in(key, i), (dim,), dtype)


def _sequential(fn: Callable[[Any, jax.Array], Any], xs: Any, n: int, unroll: bool) -> Any:
    """``fn(x, zero)`` for each ``x`` along the leading axis of ``xs`` (``n`` entries), outputs
    stacked: one call after another, so the temporaries are those of one call (``vmap``
    would batch all ``n``). ``fn`` adds the scalar ``zero`` (always ±0) to ``x`` or to its start vector.

    ``unroll``: straight-line code instead of a ``lax.map`` loop (see the module docstring).
    Then ``zero`` is ``0 · (the previous call's finite outputs)``: a data dependency that
    makes XLA run the calls in order and reuse one call's buffers for the next; without it
    XLA keeps the temporaries of every call (an ``optimization_barrier`` does not prevent that).
    """
    if not unroll:
        return jax.lax.map(lambda x: fn(x, jnp.zeros(())), xs)
    outs: list[Any] = []
    zero = jnp.zeros(())
    for i in range(n):
        outs.append(fn(jax.tree_util.tree_map(lambda a: a[i], xs), zero))  # noqa: B023
        leaves = [jnp.sum(jnp.where(jnp.isfinite(v), v, 0)) for v in jax.tree_util.tree_leaves(outs[-1])]
        zero = 0 * sum(leaves)
    return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)


def hutchinson_trace(
    matvec: FlatMatvec, dim: int, key: jax.Array, n_probes: int, dtype, *, unroll: bool = False
) -> jax.Array:
    """Unbiased ``tr(H)`` from ``n_probes`` Rademacher quadratic forms (probe ``i``:
    :func:`rademacher_probe` ``(key, i, …)``), one product at a time."""

    def one(i: jax.Array, zero: jax.Array) -> jax.Array:
        z = rademacher_probe(key, i + zero.astype(i.dtype), dim, dtype)
        return jnp.vdot(z, matvec(z))

    return jnp.mean(_sequential(one, jnp.arange(n_probes), n_probes, unroll))


def hutchpp_trace(
    matvec: FlatMatvec, dim: int, key: jax.Array, n_matvecs: int, dtype, *, unroll: bool = False
) -> jax.Array:
    """Hutch++ with ``n_matvecs`` products split in thirds (sketch, range, residual)."""
    k = max(1, n_matvecs // 3)
    ks, kg = jax.random.split(key)
    s = rademacher(ks, (k, dim), dtype)
    g = rademacher(kg, (k, dim), dtype)
    products = lambda vs: _sequential(lambda v, zero: matvec(v + zero.astype(dtype)), vs, k, unroll)  # noqa: E731
    q, _ = jnp.linalg.qr(products(s).T)  # (dim, k) orthonormal basis of range(H S)
    q = q.T
    exact = jnp.sum(q * products(q))
    g_perp = g - (g @ q.T) @ q
    rest = jnp.sum(g_perp * products(g_perp)) / k
    return exact + rest


def lanczos(matvec: FlatMatvec, v0: jax.Array, m: int, *, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
    """``m`` Lanczos steps from ``v0`` with full reorthogonalisation.

    Returns ``(alpha, beta)``: the diagonal (m,) and off-diagonal (m−1,) of ``T``.
    After an invariant subspace is found (``β ≈ 0``) the remaining rows decouple,
    so their Ritz values carry zero quadrature weight. The basis kept is ``(m, dim)``:
    the last step's next vector is never used, so it is not stored.
    ``unroll``: the steps as straight-line code instead of a ``fori_loop`` (see the
    module docstring).
    """
    dim = v0.shape[0]
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m, dim), dtype).at[0].set(q0)
    tiny = jnp.finfo(dtype).eps * 10

    def body(j, carry):
        basis, alpha, beta = carry
        q = basis[j]
        w = matvec(q)
        a = jnp.vdot(q, w)
        for _ in range(2):  # classical Gram-Schmidt twice against the whole basis
            w = w - basis.T @ (basis @ w)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(jnp.max(jnp.abs(alpha)), jnp.abs(a))
        ok = b > tiny * jnp.maximum(scale, 1.0)
        nxt = jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0)
        if isinstance(j, int):  # unrolled: the last step writes nothing
            basis = basis if j + 1 == m else basis.at[j + 1].set(nxt)
        else:  # in the loop the last step rewrites row m − 1 with itself
            row = jnp.minimum(j + 1, m - 1)
            basis = basis.at[row].set(jnp.where(j + 1 < m, nxt, basis[row]))
        return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))

    carry = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype))
    if unroll:
        for j in range(m):
            carry = body(j, carry)
    else:
        carry = jax.lax.fori_loop(0, m, body, carry)
    _, alpha, beta = carry
    return alpha, beta[:-1]


def _tridiag(alpha: jax.Array, beta: jax.Array) -> jax.Array:
    return jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)


def top_eigenvalues(
    matvec: FlatMatvec, dim: int, key: jax.Array, k: int, m: int, dtype, *, unroll: bool = False
) -> jax.Array:
    """Top-``k`` eigenvalues (descending) from ``m`` Lanczos steps on a random start."""
    m = min(m, dim)
    v0 = jax.random.normal(key, (dim,), dtype)
    alpha, beta = lanczos(matvec, v0, m, unroll=unroll)
    ritz = jnp.linalg.eigvalsh(_tridiag(alpha, beta))
    top = ritz[::-1][:k]
    if top.shape[0] < k:
        top = jnp.concatenate([top, jnp.full((k - top.shape[0],), jnp.nan, dtype)])
    return top


def slq_density(
    matvec: FlatMatvec, dim: int, key: jax.Array, n_probes: int, m: int, dtype, *, unroll: bool = False
) -> tuple[jax.Array, jax.Array]:
    """SLQ nodes and weights, each ``(n_probes, m)``; each probe's weights sum to 1.

    Probe ``i`` starts from :func:`rademacher_probe` ``(key, i, dim, dtype)``; the probes run
    one after another (one Lanczos basis at a time).
    """

    def one(i, zero):
        alpha, beta = lanczos(matvec, rademacher_probe(key, i + zero.astype(i.dtype), dim, dtype), m, unroll=unroll)
        theta, vecs = jnp.linalg.eigh(_tridiag(alpha, beta))
        return theta, vecs[0, :] ** 2

    return _sequential(one, jnp.arange(n_probes), n_probes, unroll)


def parameter_blocks(params: Any) -> dict[str, list[int]]:
    """Group leaf indices into blocks: leaves sharing a parent container form one block (a layer)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    blocks: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        name = jax.tree_util.keystr(path[:-1]) if len(path) > 1 else jax.tree_util.keystr(path)
        blocks.setdefault(name or "params", []).append(i)
    return blocks


def block_top_eigenvalues(
    matvec: FlatMatvec, masks: jax.Array, key: jax.Array, m: int, dtype, *, unroll: bool = False
) -> jax.Array:
    """Top eigenvalue of each diagonal block ``H_bb = P_b H P_b`` (``masks``: (n_blocks, dim) 0/1),
    the blocks one after another (one Lanczos basis at a time)."""
    n = masks.shape[0]
    return _block_tops(matvec, lambda i: masks[i].astype(dtype), n, masks.shape[1], key, m, dtype, unroll)


def block_top_eigenvalues_by_id(
    matvec: FlatMatvec, block_ids: jax.Array, n_blocks: int, key: jax.Array, m: int, dtype, *, unroll: bool = False
) -> jax.Array:
    """:func:`block_top_eigenvalues` with the blocks given as one ``(dim,)`` integer array of block
    indices ``0 … n_blocks − 1`` (entry ``i`` belongs to block ``block_ids[i]``): no
    ``(n_blocks, dim)`` mask array is built, each block's mask is made when its turn comes."""
    mask_of = lambda i: (block_ids == i).astype(dtype)  # noqa: E731
    return _block_tops(matvec, mask_of, n_blocks, block_ids.shape[0], key, m, dtype, unroll)


def _block_tops(matvec, mask_of, n_blocks: int, dim: int, key, m: int, dtype, unroll: bool) -> jax.Array:
    keys = jax.random.split(key, n_blocks)

    def one(i, zero):
        i = i + zero.astype(i.dtype)
        mask = mask_of(i)
        v0 = jax.random.normal(keys[i], (dim,), dtype) * mask
        alpha, beta = lanczos(lambda v: mask * matvec(mask * v), v0, m, unroll=unroll)
        return jnp.max(jnp.linalg.eigvalsh(_tridiag(alpha, beta)))

    return _sequential(one, jnp.arange(n_blocks), n_blocks, unroll)
