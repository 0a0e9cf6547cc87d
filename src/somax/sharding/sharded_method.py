"""``shard_method``: an assembled method compiled for a mesh (``jax.jit`` with shardings)."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from somax.method import MethodState, SecondOrderMethod
from somax.sharding.layouts import _auto, _axis_size, _check_axis, _spec_axis, fsdp_shardings, state_shardings
from somax.sharding.layouts import batch_shardings as _default_batch_shardings
from somax.sharding.row_system import device_budget, row_system_bytes
from somax.solvers.row import RowCholeskySolver
from somax.solvers.row_block import BlockRowCholeskySolver
from somax.step_info import StepInfo

PyTree = Any

__all__ = ["ShardedMethod", "shard_method", "data_parallel", "fsdp"]


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
        ``"block"``: the method re-assembled with ``BlockRowCholeskySolver`` (``"block_row_cholesky"``),
        one block per shard (not exact); the plan shows it.
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
            method = method.replace(solver=blocks)
        else:
            row_mode = "exact"
            row_info = row_system_bytes(method, params, batch, 1, model_state)
            budget = device_budget(mesh) if row_budget_bytes is None else row_budget_bytes
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
