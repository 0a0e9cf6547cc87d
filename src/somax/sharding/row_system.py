"""Dense row systems under sharding: their per-device size, and the per-shard block solver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from somax.curvature.rows import row_operator
from somax.method import SecondOrderMethod
from somax.solvers._dtypes import check_solve_dtype, solve_dtype_for

PyTree = Any

__all__ = ["DEFAULT_ROW_BUDGET_BYTES", "row_system_bytes", "BlockRowCholeskySolver", "device_budget"]

#: Default per-device budget for the gathered exact row Gram when the device does not report its memory.
DEFAULT_ROW_BUDGET_BYTES = 2 * 1024**3


def _row_solver(method: SecondOrderMethod) -> Any:
    return method.solver if getattr(method.solver, "lane", None) == "row" else None


def row_system_bytes(
    method: SecondOrderMethod, params: PyTree, batch: PyTree, n_blocks: int = 1, model_state: PyTree = ()
) -> dict[str, int]:
    """Per-device size of a dense row system for ``batch`` (shapes only; nothing is computed).

    Returns ``m`` (rows), ``d`` (parameters), and ``bytes`` in the solve dtype:

    * exact (``n_blocks = 1``): the ``m × m`` Gram and its Cholesky factor, ``2m²`` entries,
      held by every device; plus the whitened Jacobian rows ``m·d`` when the solver forms
      them (``gram="per_example"``; the default structured Gram of dense kernels does not);
    * ``k = n_blocks`` blocks (:class:`BlockRowCholeskySolver`): one block per device,
      ``2(m/k)² + (m/k)·d`` entries (it builds its blocks from per-example Jacobian rows).
    """
    solver = _row_solver(method)
    if solver is None:
        raise ValueError(f"row_system_bytes: method's solver {type(method.solver).__name__} is not a row solver")
    rng = jax.random.PRNGKey(0)

    def residual(p: PyTree, b: PyTree) -> jax.Array:
        work = method._working(p)
        lin = method.curvature.linearize(work, b, model_state, rng if method.curvature.uses_rng else None)
        return row_operator(lin).residual

    r = jax.eval_shape(residual, params, batch)
    m = int(np.prod(r.shape, dtype=np.int64))
    d = int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(params)))
    dtype = solve_dtype_for(getattr(solver, "solve_dtype", None), r.dtype)
    mb = m // n_blocks
    rows = mb * d if (n_blocks > 1 or getattr(solver, "gram", "per_example") == "per_example") else 0
    return {"m": m, "d": d, "bytes": int((2 * mb * mb + rows) * jnp.dtype(dtype).itemsize)}


@dataclass(frozen=True)
class BlockRowCholeskySolver:
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
      sharding: optional sharding for the ``(n_blocks, …)`` block arrays (set by
        :func:`shard_method` to split blocks over the data axis).
    """

    n_blocks: int = 1
    solve_dtype: str | None = None
    sharding: Any = None

    lane = "row"
    uses_precond = False
    needs_gradient_rhs = True
    info_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int) or self.n_blocks < 1:
            raise ValueError(f"BlockRowCholeskySolver: n_blocks must be an int >= 1, got {self.n_blocks!r}")
        object.__setattr__(self, "solve_dtype", check_solve_dtype("BlockRowCholeskySolver", self.solve_dtype))

    def init(self, params: PyTree) -> PyTree:
        return ()

    def _constrain(self, x: jax.Array) -> jax.Array:
        return x if self.sharding is None else jax.lax.with_sharding_constraint(x, self.sharding)

    def solve(self, lin: Any, rhs: PyTree, lam: jax.Array, precond: Any, state: PyTree):
        """Direction ``s = Σ_k Ĵ_kᵀ (Ĵ_k Ĵ_kᵀ + μI)⁻¹ r_k`` (``rhs`` is ``g``, rebuilt from ``r``)."""
        rows = row_operator(lin)
        r = rows.residual
        k, m = self.n_blocks, rows.num_rows
        if rows.row_shape[0] % k:
            raise ValueError(
                f"BlockRowCholeskySolver: n_blocks={k} does not divide the batch axis of the rows {rows.row_shape}"
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


def device_budget(mesh: Mesh) -> int:
    """Per-device budget for a gathered row Gram: a quarter of ``bytes_limit``, else the default."""
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats, e.g. CPU)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 4
    return DEFAULT_ROW_BUDGET_BYTES
