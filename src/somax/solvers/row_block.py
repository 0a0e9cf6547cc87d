"""Per-block row-space solve (lane ``"row"``): the block-diagonal part of ``row_cholesky``'s system.

Under data parallelism each data shard can solve the rows of its own examples, which
needs no gathered ``m × m`` Gram; :func:`somax.sharding.shard_method` assembles it for
``row_gram="block"``. It is an approximation of the exact row solve; see the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax import validate
from somax.contracts import Solver
from somax.curvature.rows import row_operator
from somax.registry import SOLVERS
from somax.solvers._dtypes import check_solve_dtype, solve_dtype_for

PyTree = Any

__all__ = ["BlockRowCholeskySolver"]


@dataclass(frozen=True, kw_only=True)
class BlockRowCholeskySolver(Solver):
    """Per-shard block-diagonal row system (lane ``"row"``): an *approximation* of ``row_cholesky``.

    The ``m`` rows are cut into ``n_blocks`` contiguous blocks along the batch axis (one
    per data shard), and each block solves its own damped system:

        (Ĵ_k Ĵ_kᵀ + μ I) v_k = r_k,     s = Σ_k Ĵ_kᵀ v_k = Ĵᵀ v,     μ = n λ.

    With ``n_blocks = 1`` this is ``row_cholesky`` exactly. Otherwise it drops the
    cross-block Gram entries ``Ĵ_j Ĵ_kᵀ`` (exact only when examples in different blocks
    have orthogonal whitened Jacobian rows). It depends on ``n_blocks`` only, not on
    the devices: the same numbers on 1 device or ``n_blocks``. Per block: ``(m/k)²``
    Gram, ``(m/k)³/3`` factorisation, computed on the shard that owns the block.

    Args:
      n_blocks: number of blocks; must divide the batch size.
      solve_dtype: as for ``row_cholesky``.
      sharding: optional sharding for the ``(n_blocks, …)`` block arrays
        (:func:`somax.sharding.shard_method` sets it to split the blocks over the data axis).
    """

    n_blocks: int = 1
    solve_dtype: str | None = None
    sharding: Any = None

    lane = "row"
    needs_gradient_rhs = True
    per_example_model = True

    def __post_init__(self) -> None:
        validate.integer("SolverSpec('block_row_cholesky'): n_blocks", self.n_blocks, minimum=1)
        where = "SolverSpec('block_row_cholesky')"
        object.__setattr__(self, "solve_dtype", check_solve_dtype(where, self.solve_dtype))

    def _constrain(self, x: jax.Array) -> jax.Array:
        return x if self.sharding is None else jax.lax.with_sharding_constraint(x, self.sharding)

    def solve(self, lin: Any, rhs: PyTree, lam: jax.Array, precond: Any, state: PyTree):
        """Direction ``s = Σ_k Ĵ_kᵀ (Ĵ_k Ĵ_kᵀ + μI)⁻¹ r_k`` (``rhs`` is ``g``, rebuilt from ``r``)."""
        rows = row_operator(lin)
        r = rows.residual
        k, m = self.n_blocks, rows.num_rows
        if rows.row_shape[0] % k:
            raise ValueError(
                f"SolverSpec('block_row_cholesky'): n_blocks={k} does not divide the batch axis of the rows "
                f"{rows.row_shape}"
            )
        mb = m // k
        dtype = solve_dtype_for(self.solve_dtype, r.dtype)
        mu = rows.mu(lam).astype(dtype)
        gram = None
        for blk in rows.whitened_blocks(dtype):
            b3 = self._constrain(blk.reshape(k, mb, -1))
            part = jnp.einsum("kid,kjd->kij", b3, b3, precision=jax.lax.Precision.HIGHEST)
            gram = part if gram is None else gram + part
        gram = self._constrain(gram + mu * jnp.eye(mb, dtype=dtype))
        chol = jnp.linalg.cholesky(gram)
        rk = self._constrain(r.reshape(k, mb, 1).astype(dtype))
        v = jax.lax.linalg.triangular_solve(chol, rk, left_side=True, lower=True)
        v = jax.lax.linalg.triangular_solve(chol, v, left_side=True, lower=True, transpose_a=True)
        s = rows.vjp(v.reshape(rows.row_shape).astype(r.dtype))
        return jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), s, rhs), state, {}


SOLVERS.register("block_row_cholesky", BlockRowCholeskySolver)
