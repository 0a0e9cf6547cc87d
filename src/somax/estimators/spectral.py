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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "rademacher",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "top_eigenvalues",
    "slq_density",
    "block_top_eigenvalues",
    "parameter_blocks",
]

FlatMatvec = Callable[[jax.Array], jax.Array]


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Independent Rademacher (±1) entries of ``shape`` in ``dtype``, drawn as int8."""
    return jax.random.rademacher(key, shape, dtype=jnp.int8).astype(dtype)


def hutchinson_trace(matvec: FlatMatvec, dim: int, key: jax.Array, n_probes: int, dtype) -> jax.Array:
    """Unbiased ``tr(H)`` from ``n_probes`` Rademacher quadratic forms (vectorised)."""
    v = rademacher(key, (n_probes, dim), dtype)
    hv = jax.vmap(matvec)(v)
    return jnp.mean(jnp.sum(v * hv, axis=-1))


def hutchpp_trace(matvec: FlatMatvec, dim: int, key: jax.Array, n_matvecs: int, dtype) -> jax.Array:
    """Hutch++ with ``n_matvecs`` products split in thirds (sketch, range, residual)."""
    k = max(1, n_matvecs // 3)
    ks, kg = jax.random.split(key)
    s = rademacher(ks, (k, dim), dtype)
    g = rademacher(kg, (k, dim), dtype)
    q, _ = jnp.linalg.qr(jax.vmap(matvec)(s).T)  # (dim, k) orthonormal basis of range(H S)
    q = q.T
    exact = jnp.sum(q * jax.vmap(matvec)(q))
    g_perp = g - (g @ q.T) @ q
    rest = jnp.sum(g_perp * jax.vmap(matvec)(g_perp)) / k
    return exact + rest


def lanczos(matvec: FlatMatvec, v0: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """``m`` Lanczos steps from ``v0`` with full reorthogonalisation.

    Returns ``(alpha, beta)``: the diagonal (m,) and off-diagonal (m−1,) of ``T``.
    After an invariant subspace is found (``β ≈ 0``) the remaining rows decouple,
    so their Ritz values carry zero quadrature weight.
    """
    dim = v0.shape[0]
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(q0)
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
        return basis.at[j + 1].set(nxt), alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))

    _, alpha, beta = jax.lax.fori_loop(0, m, body, (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype)))
    return alpha, beta[:-1]


def _tridiag(alpha: jax.Array, beta: jax.Array) -> jax.Array:
    return jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)


def top_eigenvalues(matvec: FlatMatvec, dim: int, key: jax.Array, k: int, m: int, dtype) -> jax.Array:
    """Top-``k`` eigenvalues (descending) from ``m`` Lanczos steps on a random start."""
    m = min(m, dim)
    v0 = jax.random.normal(key, (dim,), dtype)
    alpha, beta = lanczos(matvec, v0, m)
    ritz = jnp.linalg.eigvalsh(_tridiag(alpha, beta))
    top = ritz[::-1][:k]
    if top.shape[0] < k:
        top = jnp.concatenate([top, jnp.full((k - top.shape[0],), jnp.nan, dtype)])
    return top


def slq_density(
    matvec: FlatMatvec, dim: int, key: jax.Array, n_probes: int, m: int, dtype
) -> tuple[jax.Array, jax.Array]:
    """SLQ nodes and weights, each ``(n_probes, m)``; each probe's weights sum to 1."""
    v = rademacher(key, (n_probes, dim), dtype)

    def one(v0):
        alpha, beta = lanczos(matvec, v0, m)
        theta, vecs = jnp.linalg.eigh(_tridiag(alpha, beta))
        return theta, vecs[0, :] ** 2

    return jax.vmap(one)(v)


def parameter_blocks(params: Any) -> dict[str, list[int]]:
    """Group leaf indices into blocks: leaves sharing a parent container form one block (a layer)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    blocks: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        name = jax.tree_util.keystr(path[:-1]) if len(path) > 1 else jax.tree_util.keystr(path)
        blocks.setdefault(name or "params", []).append(i)
    return blocks


def block_top_eigenvalues(matvec: FlatMatvec, masks: jax.Array, key: jax.Array, m: int, dtype) -> jax.Array:
    """Top eigenvalue of each diagonal block ``H_bb = P_b H P_b`` (``masks``: (n_blocks, dim) 0/1)."""
    dim = masks.shape[1]
    keys = jax.random.split(key, masks.shape[0])

    def one(mask, k):
        v0 = jax.random.normal(k, (dim,), dtype) * mask
        alpha, beta = lanczos(lambda v: mask * matvec(mask * v), v0, m)
        return jnp.max(jnp.linalg.eigvalsh(_tridiag(alpha, beta)))

    return jax.vmap(one)(masks, keys)
