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
  ``row_gram="block"`` swaps in :class:`BlockRowCholeskySolver`, a per-shard
  block-diagonal row system — each shard solves its own examples' rows, ``s = Σ_k
  Ĵ_kᵀ(Ĵ_kĴ_kᵀ + μI)⁻¹ r_k`` — which is *not* the exact GGN direction (it drops the
  cross-shard Gram blocks) but depends only on the number of blocks, not on the devices.

See ``docs/multi_device.md`` for the recipe, multi-host use and measurements.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from somax.curvature.rows import row_operator
from somax.method import MethodState, SecondOrderMethod
from somax.solvers._dtypes import check_solve_dtype, solve_dtype_for
from somax.solvers.row import RowCholeskySolver
from somax.step_info import StepInfo

PyTree = Any

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
]

#: Default per-device budget for the gathered exact row Gram when the device does not report its memory.
DEFAULT_ROW_BUDGET_BYTES = 2 * 1024**3


def make_mesh(n_devices: int | None = None, axis: str = "data", *, devices: Any = None) -> Mesh:
    """A one-axis mesh over ``n_devices`` devices (all by default) with *auto* sharding axes.

    Auto axes let XLA propagate shardings through the step; somax's step uses ops (dense
    row Grams, contractions over the batch) whose output sharding an *explicit* mesh axis
    would require annotating by hand.
    """
    devs = list(devices if devices is not None else jax.devices())
    if n_devices is None:
        n_devices = len(devs)
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or not 1 <= n_devices <= len(devs):
        raise ValueError(f"make_mesh: n_devices must be an int in [1, {len(devs)}], got {n_devices!r}")
    return Mesh(np.asarray(devs[:n_devices]), (axis,), axis_types=(AxisType.Auto,))


def _auto(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis *auto* (an explicit mesh from ``jax.make_mesh`` is converted)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _check_axis(mesh: Mesh, axis: str | tuple[str, ...], what: str = "axis") -> tuple[str, ...]:
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing:
        raise ValueError(f"{what}={axis!r} is not an axis of the mesh (axes: {mesh.axis_names})")
    return axes


def _axis_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return int(math.prod(mesh.shape[a] for a in axes))


def _spec_axis(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return axes[0] if len(axes) == 1 else axes


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(_auto(mesh), PartitionSpec())


def batch_shardings(mesh: Mesh, batch: PyTree, axis: str | tuple[str, ...] = "data") -> PyTree:
    """Shardings splitting every batch leaf along its leading axis over ``axis``.

    Scalars (e.g. a loss weight normaliser) are replicated. Raises ``ValueError`` naming
    the leaf whose leading dimension is not divisible by the number of shards.
    """
    mesh = _auto(mesh)
    axes = _check_axis(mesh, axis)
    k = _axis_size(mesh, axes)

    def one(path, leaf):
        shape = np.shape(leaf)
        if not shape:
            return NamedSharding(mesh, PartitionSpec())
        if shape[0] % k:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)}: leading dimension {shape[0]} is not divisible by the "
                f"{k} shards of mesh axis {axis!r}; use a global batch size that is a multiple of {k}"
            )
        return NamedSharding(mesh, PartitionSpec(_spec_axis(axes)))

    return jax.tree_util.tree_map_with_path(one, batch)


_default_batch_shardings = batch_shardings


def fsdp_shardings(mesh: Mesh, params: PyTree, axis: str | tuple[str, ...] = "data", *, min_size: int = 1024) -> PyTree:
    """FSDP shardings for ``params``: each leaf split along its largest dimension divisible by the shard count.

    Leaves with fewer than ``min_size`` entries, or with no divisible dimension, are
    replicated (splitting a bias buys nothing and costs a collective).
    """
    mesh = _auto(mesh)
    axes = _check_axis(mesh, axis)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"fsdp_shardings: min_size must be an int >= 0, got {min_size!r}")
    k = _axis_size(mesh, axes)

    def one(leaf):
        shape = np.shape(leaf)
        if int(np.prod(shape, dtype=np.int64)) < min_size or k == 1:
            return NamedSharding(mesh, PartitionSpec())
        dims = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % k == 0]
        if not dims:
            return NamedSharding(mesh, PartitionSpec())
        spec = [None] * len(shape)
        spec[dims[0]] = _spec_axis(axes)
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree_util.tree_map(one, params)


def state_shardings(
    method: SecondOrderMethod, mesh: Mesh, params: PyTree, param_shardings: PyTree, model_state: PyTree = ()
) -> MethodState:
    """Shardings for ``method.init(params, model_state)``, from its abstract shape (nothing is computed).

    Every parameter-shaped subtree of the state (CG warm start, preconditioner diagonal,
    Optax moments, …: same tree structure and leaf shapes as ``params``) follows
    ``param_shardings`` leaf by leaf; any other leaf whose shape matches exactly one
    parameter sharding follows it; everything else (counters, λ, scalars, model state)
    is replicated.
    """
    mesh = _auto(mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(method.init, params, model_state)
    p_def = jax.tree_util.tree_structure(params)
    p_shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params)]
    p_shard = jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda x: isinstance(x, Sharding))
    if len(p_shard) != len(p_shapes):
        raise ValueError(
            f"param_shardings: expected one sharding per parameter leaf ({len(p_shapes)}), got {len(p_shard)}"
        )
    by_shape: dict[tuple[int, ...], set] = {}
    for shp, s in zip(p_shapes, p_shard):
        by_shape.setdefault(shp, set()).add(s.spec)

    def is_param_tree(x: Any) -> bool:
        try:
            if jax.tree_util.tree_structure(x) != p_def:
                return False
        except Exception:  # noqa: BLE001  (non-pytree objects are simply not parameter trees)
            return False
        return [tuple(np.shape(a)) for a in jax.tree_util.tree_leaves(x)] == p_shapes

    def one(x: Any) -> Any:
        if is_param_tree(x):
            return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x), p_shard)
        specs = by_shape.get(tuple(x.shape), set())
        if x.shape and len(specs) == 1:
            return NamedSharding(mesh, next(iter(specs)))
        return rep

    return jax.tree_util.tree_map(one, shapes, is_leaf=is_param_tree)


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


class ShardedMethod:
    """An assembled method compiled for a mesh: ``init``/``step`` with fixed input and output shardings.

    Built by :func:`shard_method` (or :func:`data_parallel` / :func:`fsdp`). ``step`` is
    ``jax.jit(method.step)`` with ``in_shardings = (params, batch, state, rng)`` and
    ``out_shardings = (params, state, info)`` shardings, so parameters and state keep
    their shardings from step to step (no gather to one device) and one compilation
    serves every step. Use :meth:`put_params` / :meth:`put_batch` to place host data.

    Attributes:
      method: the (possibly solver-swapped) method that runs.
      mesh: the mesh (auto axes).
      param_shardings, batch_shardings, state_shardings: the shardings used.
      row_gram: ``"exact"``, ``"block"`` or ``None`` (not a dense row solver).
      row_info: :func:`row_system_bytes` result for a dense row solver, else ``None``.
    """

    def __init__(
        self,
        method: SecondOrderMethod,
        mesh: Mesh,
        param_shardings: PyTree,
        batch_shardings: PyTree,
        state_shardings: MethodState,
        *,
        donate: bool = False,
        row_gram: str | None = None,
        row_info: dict[str, int] | None = None,
    ) -> None:
        self.method = method
        self.mesh = mesh
        self.param_shardings = param_shardings
        self.batch_shardings = batch_shardings
        self.state_shardings = state_shardings
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.row_gram = row_gram
        self.row_info = row_info
        self.trace_count = 0
        rep = self.replicated
        donate_argnums = (0, 2) if donate else ()

        def step(params: PyTree, batch: PyTree, state: MethodState, rng: jax.Array) -> tuple:
            self.trace_count += 1
            return method.step(params, batch, state, rng)

        def step_no_rng(params: PyTree, batch: PyTree, state: MethodState) -> tuple:
            self.trace_count += 1
            return method.step(params, batch, state, None)

        outs = (param_shardings, state_shardings, rep)
        self._step = jax.jit(
            step,
            in_shardings=(param_shardings, batch_shardings, state_shardings, rep),
            out_shardings=outs,
            donate_argnums=donate_argnums,
        )
        self._step_no_rng = jax.jit(
            step_no_rng,
            in_shardings=(param_shardings, batch_shardings, state_shardings),
            out_shardings=outs,
            donate_argnums=donate_argnums,
        )
        self._init = jax.jit(method.init, in_shardings=(param_shardings, rep), out_shardings=state_shardings)

    def init(self, params: PyTree, model_state: PyTree = ()) -> MethodState:
        """``method.init`` compiled with the state shardings as outputs."""
        return self._init(params, model_state)

    def step(
        self, params: PyTree, batch: PyTree, state: MethodState, rng: jax.Array | None = None
    ) -> tuple[PyTree, MethodState, StepInfo]:
        """One global-batch step; outputs keep the input shardings, ``info`` is replicated."""
        if rng is None:
            return self._step_no_rng(params, batch, state)
        return self._step(params, batch, state, rng)

    def lower(self, params: PyTree, batch: PyTree, state: MethodState, rng: jax.Array | None = None) -> Any:
        """``jax.jit(...).lower`` of the step (for ``.compile().memory_analysis()`` and cost inspection)."""
        if rng is None:
            return self._step_no_rng.lower(params, batch, state)
        return self._step.lower(params, batch, state, rng)

    def put_params(self, params: PyTree) -> PyTree:
        """Place (global) host parameters with the parameter shardings; every process passes the same values."""
        return _put_global(params, self.param_shardings)

    def put_batch(self, batch: PyTree) -> PyTree:
        """Place a batch: the global batch in one process; with several processes, this process's rows.

        Multi-host (``jax.distributed.initialize``): each process passes its local slice (its
        share of the leading axis) and ``jax.make_array_from_process_local_data`` forms the
        global array.
        """
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch_shardings)
        return jax.tree_util.tree_map(
            lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)), self.batch_shardings, batch
        )

    def put_rng(self, rng: jax.Array) -> jax.Array:
        """Replicate a PRNG key over the mesh."""
        return _put_global(rng, self.replicated)


def _put_global(tree: PyTree, shardings: PyTree) -> PyTree:
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(s: Sharding, x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(shardings, Sharding):
        return jax.tree_util.tree_map(lambda x: one(shardings, x), tree)
    return jax.tree_util.tree_map(one, shardings, tree)


_ROW_GRAM = ("auto", "exact", "block")


def _device_budget(mesh: Mesh) -> int:
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats, e.g. CPU)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 4
    return DEFAULT_ROW_BUDGET_BYTES


def shard_method(
    method: SecondOrderMethod,
    mesh: Mesh,
    params: PyTree,
    batch: PyTree,
    *,
    axis: str | tuple[str, ...] = "data",
    param_shardings: PyTree | str = "replicated",
    batch_shardings: PyTree | None = None,
    model_state: PyTree = (),
    row_gram: str = "auto",
    row_budget_bytes: int | None = None,
    donate: bool = False,
    fsdp_min_size: int = 1024,
) -> ShardedMethod:
    """Compile ``method`` for ``mesh``: data-parallel batch, replicated or FSDP parameters and state.

    Args:
      method: an assembled method (:func:`somax.assemble` / :func:`somax.make`).
      mesh: a ``jax.sharding.Mesh`` (explicit axes are converted to auto axes).
      params, batch: example parameters and batch — arrays or ``jax.ShapeDtypeStruct``s;
        only shapes are used (for shardings and the row-lane size check).
      axis: the mesh axis (or axes) the batch is split over.
      param_shardings: ``"replicated"``, ``"fsdp"`` (:func:`fsdp_shardings` over ``axis``)
        or a pytree of shardings like ``params``. State shardings are derived from it
        (:func:`state_shardings`).
      batch_shardings: a pytree of shardings like ``batch``; default
        :func:`batch_shardings` over ``axis``.
      model_state: the model's initial state, if any (replicated).
      row_gram: dense row solvers (``row_cholesky``) only. ``"auto"``: the exact gathered
        Gram if :func:`row_system_bytes` fits ``row_budget_bytes``, else ``ValueError``;
        ``"exact"``: the exact Gram, with a ``UserWarning`` above the budget;
        ``"block"``: :class:`BlockRowCholeskySolver` with one block per shard (not exact).
      row_budget_bytes: per-device budget for the gathered Gram; default a quarter of the
        device's ``bytes_limit`` when it reports one, else 2 GiB.
      donate: donate the parameter and state buffers to the step.
      fsdp_min_size: leaves smaller than this stay replicated under ``"fsdp"``.
    """
    if not isinstance(method, SecondOrderMethod):
        raise TypeError(f"shard_method: method must be an assembled SecondOrderMethod, got {type(method).__name__}")
    mesh = _auto(mesh)
    axes = _check_axis(mesh, axis)
    k = _axis_size(mesh, axes)
    if row_gram not in _ROW_GRAM:
        raise ValueError(f"shard_method: row_gram must be one of {_ROW_GRAM}, got {row_gram!r}")
    if row_budget_bytes is not None and (
        isinstance(row_budget_bytes, bool) or not isinstance(row_budget_bytes, int) or row_budget_bytes < 0
    ):
        raise ValueError(f"shard_method: row_budget_bytes must be an int >= 0 or None, got {row_budget_bytes!r}")

    if isinstance(param_shardings, str):
        if param_shardings == "replicated":
            p_sh = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
        elif param_shardings == "fsdp":
            p_sh = fsdp_shardings(mesh, params, axes, min_size=fsdp_min_size)
        else:
            raise ValueError(
                f"shard_method: param_shardings must be 'replicated', 'fsdp' or a pytree of shardings, "
                f"got {param_shardings!r}"
            )
    else:
        p_sh = _rebind(param_shardings, mesh, "param_shardings")
    if batch_shardings is None:
        b_sh = _default_batch_shardings(mesh, batch, axes)
    else:
        b_sh = _rebind(batch_shardings, mesh, "batch_shardings")

    row_mode, row_info = None, None
    solver = method.solver
    if isinstance(solver, RowCholeskySolver) or isinstance(solver, BlockRowCholeskySolver):
        if isinstance(solver, BlockRowCholeskySolver):
            row_mode = "block"
            row_info = row_system_bytes(method, params, batch, solver.n_blocks, model_state)
        elif row_gram == "block":
            row_mode = "block"
            row_info = row_system_bytes(method, params, batch, k, model_state)
            blocks = BlockRowCholeskySolver(
                n_blocks=k,
                solve_dtype=solver.solve_dtype,
                sharding=NamedSharding(mesh, PartitionSpec(_spec_axis(axes))),
            )
            method = dataclasses.replace(method, solver=blocks)
        else:
            row_mode = "exact"
            row_info = row_system_bytes(method, params, batch, 1, model_state)
            budget = _device_budget(mesh) if row_budget_bytes is None else row_budget_bytes
            if row_info["bytes"] > budget:
                msg = (
                    f"shard_method: the exact row_cholesky system needs ≈{row_info['bytes'] / 2**20:.1f} MiB per "
                    f"device "
                    f"(m={row_info['m']} rows, d={row_info['d']}; the m × m Gram is held by every device), over "
                    f"row_budget_bytes={budget}. Use SolverSpec('row_cg') (egn_*_cg: exact, matrix-free, rows stay "
                    f"sharded), row_gram='block' (per-shard block-diagonal system, not exact), a smaller batch, or "
                    f"raise row_budget_bytes"
                )
                if row_gram == "auto":
                    raise ValueError(msg)
                warnings.warn(msg, UserWarning, stacklevel=2)
    elif row_gram == "block":
        raise ValueError(f"shard_method: row_gram='block' needs a row_cholesky solver, got {type(solver).__name__}")

    if method.plan.needs_rng and not jax.config.jax_threefry_partitionable:
        warnings.warn(
            "shard_method: jax_threefry_partitionable is off, so the random numbers this plan draws (for "
            f"{', '.join(method.plan.needs_rng)}) may depend on the sharding; turn it back on "
            "(jax.config.update('jax_threefry_partitionable', True)) for sharding-independent steps",
            UserWarning,
            stacklevel=2,
        )
    s_sh = state_shardings(method, mesh, params, p_sh, model_state)
    return ShardedMethod(method, mesh, p_sh, b_sh, s_sh, donate=donate, row_gram=row_mode, row_info=row_info)


def _rebind(shardings: PyTree, mesh: Mesh, what: str) -> PyTree:
    """User shardings, re-expressed on the auto-axes ``mesh`` (same devices, same specs)."""

    def one(s: Any) -> NamedSharding:
        if isinstance(s, PartitionSpec):
            return NamedSharding(mesh, s)
        if isinstance(s, NamedSharding):
            if s.mesh.devices.shape != mesh.devices.shape or not np.array_equal(
                np.vectorize(lambda d: d.id)(s.mesh.devices), np.vectorize(lambda d: d.id)(mesh.devices)
            ):
                raise ValueError(f"{what}: a NamedSharding is on a different mesh than `mesh`")
            return NamedSharding(mesh, s.spec)
        raise TypeError(f"{what}: leaves must be NamedSharding or PartitionSpec, got {type(s).__name__}")

    return jax.tree_util.tree_map(one, shardings, is_leaf=lambda x: isinstance(x, (Sharding, PartitionSpec)))


def data_parallel(
    method: SecondOrderMethod, mesh: Mesh, params: PyTree, batch: PyTree, *, axis: str = "data", **kwargs: Any
) -> ShardedMethod:
    """:func:`shard_method` with the batch split over ``axis`` and parameters/state replicated."""
    return shard_method(method, mesh, params, batch, axis=axis, param_shardings="replicated", **kwargs)


def fsdp(
    method: SecondOrderMethod, mesh: Mesh, params: PyTree, batch: PyTree, *, axis: str = "data", **kwargs: Any
) -> ShardedMethod:
    """:func:`shard_method` with the batch *and* parameters/state split over ``axis`` (FSDP / ZeRO-3)."""
    return shard_method(method, mesh, params, batch, axis=axis, param_shardings="fsdp", **kwargs)
