"""Multi-device execution of an assembled method on JAX's own SPMD engine.

The step is the same pure function on one device or many: :func:`shard_method` wraps
``method.init`` and ``method.step`` in ``jax.jit`` with explicit ``in_shardings`` and
``out_shardings`` (``jax.sharding.NamedSharding`` over a ``Mesh``). The batch is split
along its leading axis over a mesh axis (data parallel); parameters and method state are
replicated (:func:`data_parallel`) or split over the same axis (:func:`fsdp`, ZeRO-3 /
FSDP style). XLA's SPMD partitioner inserts the collectives, so every quantity of the
step — loss, gradient, curvature products, estimator statistics, rho, traces — is the
*global-batch* quantity, exactly as on one device (no per-shard averaging is written
here, nothing can drift). No communication code lives in somax.

What is exact and what is per-shard:

* Parameter and diagonal lanes (SGN, Newton-CG, AdaHessian, Sophia): exact. Random
  probes (Hutchinson, GNB labels, spectral probes) come from JAX's partitionable
  Threefry (``jax_threefry_partitionable``, on by default), so the numbers drawn do not
  depend on the sharding.
* Row lane, ``row_cg``: exact; the row vectors are batch-sharded (``m/k`` per device),
  the back-projection ``Ĵᵀv`` is all-reduced. No Gram is formed.
* Row lane, ``row_cholesky``: by default the exact global Gram ``ĴĴᵀ`` (``m × m``,
  gathered: every device holds it and its Cholesky factor).
  :func:`row_system_bytes` estimates the per-device size; above ``row_budget_bytes``
  :func:`shard_method` refuses (``row_gram="auto"``) or warns (``row_gram="exact"``).
  ``row_gram="block"`` re-assembles the method with :class:`BlockRowCholeskySolver`
  (``"block_row_cholesky"``), a per-shard block-diagonal row system — each shard solves
  its own examples' rows, ``s = Σ_k Ĵ_kᵀ(Ĵ_kĴ_kᵀ + μI)⁻¹ r_k`` — which is *not* the exact GGN direction (it drops the
  cross-shard Gram blocks) but depends only on the number of blocks, not on the devices.

See ``docs/multi_device.md`` for the recipe, multi-host use and measurements.
"""

from somax.sharding.layouts import batch_shardings, fsdp_shardings, make_mesh, replicated, state_shardings
from somax.sharding.row_system import DEFAULT_ROW_BUDGET_BYTES, row_system_bytes
from somax.sharding.sharded_method import ShardedMethod, data_parallel, fsdp, shard_method
from somax.solvers.row_block import BlockRowCholeskySolver

__all__ = [
    "make_mesh",
    "replicated",
    "batch_shardings",
    "fsdp_shardings",
    "state_shardings",
    "row_system_bytes",
    "BlockRowCholeskySolver",
    "ShardedMethod",
    "shard_method",
    "data_parallel",
    "fsdp",
    "DEFAULT_ROW_BUDGET_BYTES",
]
