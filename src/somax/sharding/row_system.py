"""Dense row systems under sharding: their per-device size and the device budget."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from somax.curvature.rows import row_operator
from somax.method import SecondOrderMethod
from somax.solvers._dtypes import solve_dtype_for

PyTree = Any

__all__ = ["DEFAULT_ROW_BUDGET_BYTES", "row_system_bytes", "device_budget"]

#: Default per-device budget for the gathered exact row Gram when the device does not report its memory.
DEFAULT_ROW_BUDGET_BYTES = 2 * 1024**3


def _row_solver(method: SecondOrderMethod) -> Any:
    return method.solver if method.solver.lane == "row" else None


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


def device_budget(mesh: Mesh) -> int:
    """Per-device budget for a gathered row Gram: a quarter of ``bytes_limit``, else the default."""
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats, e.g. CPU)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 4
    return DEFAULT_ROW_BUDGET_BYTES
