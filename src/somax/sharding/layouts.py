"""Meshes and shardings for the step's inputs and state (data parallel, FSDP)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from somax.method import MethodState, SecondOrderMethod

PyTree = Any

__all__ = ["make_mesh", "replicated", "batch_shardings", "fsdp_shardings", "state_shardings"]


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
