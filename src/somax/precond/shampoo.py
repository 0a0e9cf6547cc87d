"""Shampoo [Gupta, Koren & Singer 2018]: Kronecker-factored AdaGrad with inverse fourth roots.

Each parameter leaf is viewed as a matrix ``G ∈ ℝ^{m×n}`` by :func:`leaf_layout`
(the *merging rule*): unit axes are dropped; a leaf with fewer than two remaining axes
(a bias, a scale, a scalar) takes the diagonal rule; otherwise all axes but the last
are merged into the rows and the last axis is the columns,
``(d₀, …, d_{k−1}) → (d₀·…·d_{k−2}, d_{k−1})`` — for a Flax dense kernel ``(in, out)``
that is the kernel itself, for a convolution kernel ``(H, W, C_in, C_out)`` the
im2col matrix ``(H·W·C_in, C_out)``. From the gradient statistic ``G_t`` (estimator
``"gradient"``) every update folds in

    L_t = β L_{t−1} + G_t G_tᵀ        (m × m),
    R_t = β R_{t−1} + G_tᵀ G_t        (n × n),

and every refresh (the preconditioner's ``refresh_every_k`` cadence) caches the
eigendecompositions ``L = Q_L Λ_L Q_Lᵀ``, ``R = Q_R Λ_R Q_Rᵀ`` (``eigh`` in float32 or,
``eigh_dtype="float64"``, in float64 when ``jax_enable_x64`` is on; negative rounding
eigenvalues are clipped to 0). At every step, for the current damping ``λ``,

    M⁻¹ V = (L + (ε+λ) I)^{−1/4} V (R + (ε+λ) I)^{−1/4}
          = Q_L [ (Λ_L + ε + λ)^{−1/4} ⊙ (Q_Lᵀ V Q_R) ⊙ (Λ_R + ε + λ)^{−1/4} ] Q_Rᵀ,

with the outer product of the two scalings (no matrix root is ever formed, and λ can
change between refreshes). The roots are stale between refreshes: the state's ``Q, Λ``
change only on refresh steps. With ``cache_roots=True`` each refresh instead forms the
roots themselves, ``P_L = Q_L (Λ_L + ε + λ)^{−1/4} Q_Lᵀ`` and ``P_R`` likewise, with the
refresh step's ``λ``, and every step applies ``M⁻¹ V = P_L V P_R``: two matrix products per
leaf instead of four (Gupta et al.'s form); a λ that changes between refreshes reaches the
matrix roots only at the next refresh (exact when λ is constant, as in the ``shampoo``
preset, where λ = 0). A side longer than ``max_dim`` keeps only the diagonal
of its factor (``diag(L) = β diag(L) + Σ_j G_ij²``) and is scaled by
``(diag(L) + ε + λ)^{−1/4}`` without a rotation. With ``block_size = b``, a side longer
than ``b`` (and at most ``max_dim``) is cut into blocks of ``b`` (the last one shorter):
the matrix becomes a grid of blocks ``G_ij`` and each block is preconditioned as a matrix
of its own, ``L_ij = β L_ij + G_ij G_ijᵀ``, ``R_ij = β R_ij + G_ijᵀ G_ij``,
``M⁻¹ V_ij = (L_ij + (ε+λ)I)^{−1/4} V_ij (R_ij + (ε+λ)I)^{−1/4}`` — a block-diagonal
approximation of ``L ⊗ R`` whose ``eigh`` costs ``O(b³)`` per block instead of ``O(m³)``
(Anil et al. 2020). Blocks are stored zero-padded to ``b``: a padded factor is
``[[L_ij, 0], [0, 0]]``, and any function of it acts on the real rows as the same function
of ``L_ij``, so the padding changes nothing (and its output rows are dropped).
Vectors and scalars use the diagonal
(AdaGrad) rule ``h = β h + g ⊙ g``, ``M⁻¹ v = v / (h + ε + λ)^{1/2}``.

Grafting (``graft="adam"`` or ``"rmsprop"``, Anil et al. 2020; Shi et al. 2023): a
second moment ``ν = β₂ ν + (1−β₂) g ⊙ g`` is kept beside the factors and each leaf's
direction is rescaled to the Frobenius norm of the diagonal method's direction on the
same input, ``s ← s · ‖v / (√ν̂ + ε_g)‖ / ‖s‖``, with ``ν̂ = ν / (1 − β₂^t)`` for
``"adam"`` and ``ν̂ = ν`` for ``"rmsprop"``; the first moment (Adam's ``m``) is the
gradient-side ``grad_tx``, so the input ``v`` is already ``m``. Grafting makes ``M⁻¹``
positively homogeneous but not linear: use it in the diagonal lane (``SolverSpec("diagonal")``,
``s = M⁻¹ g̃``), not as a PCG preconditioner (``graft=None`` is linear and symmetric
positive definite, and can precondition CG).

Cost per step: per matrix leaf four products ``O(m²n + mn²)`` for ``M⁻¹`` (two with
``cache_roots``) and two for the update (``G Gᵀ``, ``Gᵀ G``; every ``factor_every_k`` updates);
per refresh one ``eigh`` of each side, ``O(m³ + n³)``.
Memory: ``2(m² + n²)`` per matrix leaf.

References:
  Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018.
  Anil, Gupta, Koren, Regan & Singer, "Scalable Second Order Optimization for Deep
  Learning", arXiv:2002.09018 (grafting, inverse-root cadence).
  Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the Distributed
  Shampoo Optimizer for Training Neural Networks At-Scale", arXiv:2309.06497.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from somax import validate
from somax.contracts import Preconditioner
from somax.estimators.kronecker import GRADIENT
from somax.registry import PRECONDITIONERS

PyTree = Any

__all__ = [
    "LeafLayout",
    "leaf_layout",
    "to_blocks",
    "from_blocks",
    "Shampoo",
    "ShampooState",
    "shampoo",
    "eig_factor",
    "stat_dtype",
]


@dataclass(frozen=True)
class LeafLayout:
    """How a leaf of ``shape`` is preconditioned: as an ``(rows, cols)`` matrix or by the diagonal rule.

    ``rows == cols == 0`` means the diagonal rule (fewer than two non-unit axes).
    ``left_full`` / ``right_full``: that side keeps its full factor (its size is at most
    ``max_dim``); otherwise only its diagonal. ``row_block`` / ``col_block``: the matrix is
    cut into ``⌈rows/row_block⌉ × ⌈cols/col_block⌉`` blocks, each with factors of its own
    (equal to ``rows`` / ``cols`` when that side is not blocked; the last block of a side
    may be shorter).
    """

    shape: tuple[int, ...]
    rows: int
    cols: int
    left_full: bool
    right_full: bool
    row_block: int = 0
    col_block: int = 0

    def __post_init__(self) -> None:
        if self.rows and not self.row_block:
            object.__setattr__(self, "row_block", self.rows)
        if self.cols and not self.col_block:
            object.__setattr__(self, "col_block", self.cols)

    @property
    def matrix(self) -> bool:
        """The leaf is preconditioned as a matrix (two factors)."""
        return self.rows > 0

    @property
    def grid(self) -> tuple[int, int]:
        """Number of blocks along the rows and along the columns."""
        if not self.matrix:
            return (0, 0)
        return (-(-self.rows // self.row_block), -(-self.cols // self.col_block))

    def describe(self) -> str:
        """A short description, e.g. ``"matrix 576x128 (L full, R full)"``, ``"diagonal"``, or
        ``"matrix 1536x64 in 2x1 blocks of 1024x64 (L full, R full)"``."""
        if not self.matrix:
            return "diagonal"
        sides = f"L {'full' if self.left_full else 'diag'}, R {'full' if self.right_full else 'diag'}"
        nr, nc = self.grid
        blocks = f" in {nr}x{nc} blocks of {self.row_block}x{self.col_block}" if nr * nc > 1 else ""
        return f"matrix {self.rows}x{self.cols}{blocks} ({sides})"


def leaf_layout(shape: tuple[int, ...], max_dim: int, block_size: int | None = None) -> LeafLayout:
    """The merging rule: drop unit axes; ``< 2`` axes → diagonal; else ``(Π shape[:-1], shape[-1])``.

    A side longer than ``max_dim`` keeps only the diagonal of its factor. With ``block_size``,
    a side longer than ``block_size`` (and at most ``max_dim``) is cut into blocks of
    ``block_size``.
    """
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return LeafLayout(tuple(shape), 0, 0, False, False)
    rows, cols = math.prod(dims[:-1]), dims[-1]
    left, right = rows <= max_dim, cols <= max_dim

    def block(side: int, full: bool) -> int:
        return block_size if (block_size and full and side > block_size) else side

    return LeafLayout(tuple(shape), rows, cols, left, right, block(rows, left), block(cols, right))


def to_blocks(mat: jax.Array, lay: LeafLayout) -> jax.Array:
    """The ``(rows, cols)`` matrix as ``(n_row_blocks, n_col_blocks, row_block, col_block)``, zero-padded."""
    nr, nc = lay.grid
    br, bc = lay.row_block, lay.col_block
    mat = jnp.pad(mat, ((0, nr * br - lay.rows), (0, nc * bc - lay.cols)))
    return mat.reshape(nr, br, nc, bc).transpose(0, 2, 1, 3)


def from_blocks(blocks: jax.Array, lay: LeafLayout) -> jax.Array:
    """Inverse of :func:`to_blocks` (the padding dropped)."""
    nr, nc = lay.grid
    mat = blocks.transpose(0, 2, 1, 3).reshape(nr * lay.row_block, nc * lay.col_block)
    return mat[: lay.rows, : lay.cols]


def stat_dtype(dtype: Any) -> Any:
    """The dtype statistics are kept in: the leaf's dtype promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def eig_factor(mat: jax.Array, dtype: str, descending: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(Q, Λ)`` of the symmetric part of ``mat`` by ``eigh`` in ``dtype``, ``Λ ≥ 0``, cast back.

    ``mat`` may carry leading batch axes (one matrix per block). ``descending``: eigenvalues
    (and eigenvector columns) in decreasing order.
    """
    work = mat.astype(jnp.float64 if dtype == "float64" else jnp.float32)
    work = 0.5 * (work + jnp.swapaxes(work, -1, -2))
    if work.ndim > 2:
        # One block at a time (lax.map): a batched eigh inside lax.scan hung XLA:CPU (jax 0.10.2)
        # for blocks of 64 and more; one eigh per iteration is also what the unbatched case runs.
        flat = work.reshape(-1, *work.shape[-2:])
        lam, q = jax.lax.map(jnp.linalg.eigh, flat)
        lam, q = lam.reshape(work.shape[:-1]), q.reshape(work.shape)
    else:
        lam, q = jnp.linalg.eigh(work)
    if descending:
        lam, q = lam[..., ::-1], q[..., ::-1]
    return q.astype(mat.dtype), jnp.maximum(lam, 0.0).astype(mat.dtype)


class ShampooState(NamedTuple):
    """``stats``: per leaf (in ``tree_leaves`` order) a dict of its factors (``"L"``, ``"R"``,
    or ``"h"`` for the diagonal rule; a matrix leaf's factors carry the block grid as leading
    axes, ``(n_row_blocks, n_col_blocks, b, b)``, or ``(…, b)`` for a diagonal side);
    ``roots``: per leaf the eigendecompositions cached at the last refresh (``"QL"``,
    ``"lamL"``, ``"QR"``, ``"lamR"``; with ``cache_roots`` a full side caches its root
    ``"PL"``/``"PR"`` instead; a diagonal side or leaf caches its diagonal as
    ``"lamL"``/``"lamR"``/``"h"``); ``graft``: the grafting second moment ``ν``
    (params-shaped, or ``()``); ``count``: updates folded in."""

    stats: list
    roots: list
    graft: PyTree
    count: jax.Array


def _apply_kron(x: jax.Array, roots: dict, lay: LeafLayout, shift: jax.Array, power: float) -> jax.Array:
    """Per block ``Q_L [(Λ_L + shift)^{−p} ⊙ (Q_Lᵀ X Q_R) ⊙ (Λ_R + shift)^{−p}] Q_Rᵀ`` on the leaf as a matrix
    (``P_L X P_R`` where the roots are cached; a diagonal side scales by ``(Λ + shift)^{−p}``)."""
    dt = next(v.dtype for k, v in roots.items() if k in ("lamL", "PL"))
    mat = to_blocks(x.reshape(lay.rows, lay.cols).astype(dt), lay)
    if "PL" in roots or "PR" in roots:
        mat = roots["PL"] @ mat if "PL" in roots else mat * ((roots["lamL"] + shift) ** -power)[..., :, None]
        mat = mat @ roots["PR"] if "PR" in roots else mat * ((roots["lamR"] + shift) ** -power)[..., None, :]
        return from_blocks(mat, lay).reshape(x.shape).astype(x.dtype)
    if lay.left_full:
        mat = jnp.swapaxes(roots["QL"], -1, -2) @ mat
    if lay.right_full:
        mat = mat @ roots["QR"]
    mat = mat * ((roots["lamL"] + shift) ** -power)[..., :, None] * ((roots["lamR"] + shift) ** -power)[..., None, :]
    if lay.left_full:
        mat = roots["QL"] @ mat
    if lay.right_full:
        mat = mat @ jnp.swapaxes(roots["QR"], -1, -2)
    return from_blocks(mat, lay).reshape(x.shape).astype(x.dtype)


@dataclass(frozen=True, kw_only=True)
class Shampoo(Preconditioner):
    """Shampoo: ``M⁻¹ V = (L + εI)^{−1/4} V (R + εI)^{−1/4}`` per leaf, with cached ``eigh`` roots.

    ``L = β L + G Gᵀ``, ``R = β R + Gᵀ G`` from the ``"gradient"`` statistic (see the module
    docstring for the merging rule, the diagonal fallback and grafting); the damping ``λ``
    adds to ``ε`` at every step without a refresh [Gupta et al. 2018].

    Args:
      beta: factor decay ``β`` (1: the original sum; ``< 1``: exponential forgetting).
      eps: ``ε`` added to every eigenvalue (and to the diagonal factors).
      max_dim: a side longer than this keeps only the diagonal of its factor.
      block_size: ``None`` (no blocking) or a side length: a side longer than this (and at
        most ``max_dim``) is cut into blocks of ``block_size``, each block of the matrix with
        its own factors (``eigh`` of ``block_size²`` matrices instead of one of the whole side).
      refresh_every_k: recompute the eigendecompositions on steps ``0, k, 2k, …``.
      factor_every_k: fold the statistic into the matrix factors ``L``, ``R`` on every
        ``factor_every_k``-th update only (updates ``0, k, 2k, …``; the products ``G Gᵀ``,
        ``Gᵀ G`` skipped in between); the diagonal rule's ``h`` and the grafting moment ``ν``
        fold in every update, so that grafting's ``v / (√ν̂ + ε_g)`` never meets a stale ``ν``.
      cache_roots: form the roots ``(L + (ε+λ)I)^{−1/4}``, ``(R + (ε+λ)I)^{−1/4}`` at each refresh
        with that step's ``λ`` (two products per leaf and step instead of four; λ reaches the
        matrix roots at refreshes only).
      eigh_dtype: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
      graft: ``None``, ``"adam"`` or ``"rmsprop"``: per-leaf norm of the diagonal method's direction.
      graft_beta: ``β₂`` of the grafting second moment.
      graft_eps: ``ε_g`` of the grafting direction ``v / (√ν̂ + ε_g)``.
    """

    beta: float = 1.0
    eps: float = 1e-6
    max_dim: int = 2048
    block_size: int | None = None
    refresh_every_k: int = 1
    factor_every_k: int = 1
    cache_roots: bool = False
    eigh_dtype: str = "float32"
    graft: str | None = None
    graft_beta: float = 0.999
    graft_eps: float = 1e-8

    consumes = (GRADIENT,)
    default_estimator = "gradient"
    state_sharding = "replicated"

    def __post_init__(self) -> None:
        where = "PrecondSpec('shampoo')"
        validate.number(f"{where}: beta", self.beta, minimum=0.0, maximum=1.0)
        validate.number(f"{where}: eps", self.eps, minimum=0.0)
        validate.integer(f"{where}: max_dim", self.max_dim, minimum=1)
        if self.block_size is not None:
            validate.integer(f"{where}: block_size", self.block_size, minimum=1)
        validate.cadence(f"{where}: refresh_every_k", self.refresh_every_k)
        validate.integer(f"{where}: factor_every_k", self.factor_every_k, minimum=1)
        validate.boolean(f"{where}: cache_roots", self.cache_roots)
        validate.choice(f"{where}: eigh_dtype", self.eigh_dtype, ("float32", "float64"))
        validate.choice(f"{where}: graft", self.graft, (None, "adam", "rmsprop"))
        validate.number(f"{where}: graft_beta", self.graft_beta, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        validate.number(f"{where}: graft_eps", self.graft_eps, minimum=0.0)

    @property
    def refresh_uses_lam(self) -> bool:  # type: ignore[override]
        return self.cache_roots

    def layouts(self, params: PyTree) -> list[LeafLayout]:
        """The :class:`LeafLayout` of every leaf of ``params`` (``tree_leaves`` order)."""
        return [leaf_layout(tuple(x.shape), self.max_dim, self.block_size) for x in jax.tree_util.tree_leaves(params)]

    def describe(self, params: PyTree) -> str:
        """One line per leaf: its path and how it is preconditioned."""
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        return "\n".join(
            f"{jax.tree_util.keystr(p)}  {lay.describe()}" for (p, _), lay in zip(paths, self.layouts(params))
        )

    def init(self, params: PyTree) -> ShampooState:
        stats, roots = [], []
        for x, lay in zip(jax.tree_util.tree_leaves(params), self.layouts(params)):
            dt = stat_dtype(x.dtype)
            if not lay.matrix:
                stats.append({"h": jnp.zeros(x.shape, dt)})
                roots.append({"h": jnp.zeros(x.shape, dt)})
                continue
            st, rt = {}, {}
            grid = lay.grid
            for side, size, full in (("L", lay.row_block, lay.left_full), ("R", lay.col_block, lay.right_full)):
                st[side] = jnp.zeros((*grid, size, size) if full else (*grid, size), dt)
                if full:  # the identity basis (or root) until the first refresh
                    rt[("P" if self.cache_roots else "Q") + side] = jnp.broadcast_to(
                        jnp.eye(size, dtype=dt), (*grid, size, size)
                    )
                if not (full and self.cache_roots):
                    rt["lam" + side] = jnp.zeros((*grid, size), dt)
            stats.append(st)
            roots.append(rt)
        graft = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, stat_dtype(x.dtype)), params) if self.graft else ()
        return ShampooState(stats, roots, graft, jnp.zeros((), jnp.int32))

    def _fold_factors(self, stats: list, statistic: PyTree) -> list:
        """``L ← β L + G Gᵀ``, ``R ← β R + Gᵀ G`` per matrix leaf (per block)."""
        out = []
        for g, st, lay in zip(jax.tree_util.tree_leaves(statistic), stats, self.layouts(statistic)):
            if not lay.matrix:
                out.append(st)
                continue
            mat = to_blocks(g.reshape(lay.rows, lay.cols).astype(st["L"].dtype), lay)  # (nr, nc, br, bc)
            tr = jnp.swapaxes(mat, -1, -2)
            new = {}
            new["L"] = self.beta * st["L"] + (mat @ tr if lay.left_full else jnp.sum(mat * mat, axis=-1))
            new["R"] = self.beta * st["R"] + (tr @ mat if lay.right_full else jnp.sum(mat * mat, axis=-2))
            out.append(new)
        return out

    def update(self, state: ShampooState, statistic: PyTree, lin: Any = None) -> ShampooState:
        stats = [
            {"h": self.beta * st["h"] + jnp.square(g.astype(st["h"].dtype))} if "h" in st else st
            for g, st in zip(jax.tree_util.tree_leaves(statistic), state.stats)
        ]
        if self.factor_every_k == 1:
            stats = self._fold_factors(stats, statistic)
        else:
            fire = state.count % self.factor_every_k == 0
            stats = jax.lax.cond(fire, lambda s: self._fold_factors(s, statistic), lambda s: s, stats)
        graft = state.graft
        if self.graft:
            b2 = self.graft_beta
            graft = jax.tree_util.tree_map(
                lambda nu, g: b2 * nu + (1.0 - b2) * jnp.square(g.astype(nu.dtype)), state.graft, statistic
            )
        return ShampooState(stats, state.roots, graft, state.count + 1)

    def refresh(self, state: ShampooState, lam: jax.Array | None = None) -> ShampooState:
        roots = []
        for st in state.stats:
            if "h" in st:
                roots.append({"h": st["h"]})
                continue
            rt = {}
            for side in ("L", "R"):
                if st[side].ndim == 4 and self.cache_roots:
                    q, ev = eig_factor(st[side], self.eigh_dtype)
                    shift = jnp.asarray(self.eps, ev.dtype) + jnp.asarray(0.0 if lam is None else lam, ev.dtype)
                    rt["P" + side] = (q * ((ev + shift) ** -0.25)[..., None, :]) @ jnp.swapaxes(q, -1, -2)
                elif st[side].ndim == 4:  # (nr, nc, b, b): full factors, one per block
                    rt["Q" + side], rt["lam" + side] = eig_factor(st[side], self.eigh_dtype)
                else:
                    rt["lam" + side] = st[side]
            roots.append(rt)
        return ShampooState(state.stats, roots, state.graft, state.count)

    def _graft_scale(self, state: ShampooState) -> list | None:
        if not self.graft:
            return None
        nus = jax.tree_util.tree_leaves(state.graft)
        if self.graft == "adam":
            t = jnp.maximum(state.count, 1)
            nus = [nu / (1.0 - jnp.asarray(self.graft_beta, nu.dtype) ** t.astype(nu.dtype)) for nu in nus]
        return [jnp.sqrt(nu) + self.graft_eps for nu in nus]

    def inverse(self, state: ShampooState, lam: jax.Array):
        denoms = self._graft_scale(state)

        def apply(v: PyTree) -> PyTree:
            leaves, treedef = jax.tree_util.tree_flatten(v)
            out = []
            for i, (x, rt, lay) in enumerate(zip(leaves, state.roots, self.layouts(v))):
                dt = stat_dtype(x.dtype)
                shift = jnp.asarray(self.eps, dt) + lam.astype(dt)
                if lay.matrix:
                    s = _apply_kron(x, rt, lay, shift, 0.25)
                else:
                    s = (x.astype(dt) / jnp.sqrt(rt["h"] + shift)).astype(x.dtype)
                if denoms is not None:
                    target = jnp.linalg.norm((x.astype(dt) / denoms[i]).ravel())
                    norm = jnp.linalg.norm(s.astype(dt).ravel())
                    s = (s * jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)).astype(x.dtype)
                out.append(s)
            return jax.tree_util.tree_unflatten(treedef, out)

        return apply


#: the registered factory of ``"shampoo"`` (keyword options as :class:`Shampoo`'s fields)
shampoo = Shampoo

PRECONDITIONERS.register("shampoo", Shampoo)
