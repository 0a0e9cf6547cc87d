"""Meshes and shardings for the step's inputs and state (data parallel, FSDP)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from somax.contracts import shard_like_params
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

    Each component's state follows the component's own declaration
    (:meth:`somax.contracts.Component.state_shardings`: by default every subtree with the
    parameters' structure and leaf shapes follows ``param_shardings`` leaf by leaf, and
    everything else is replicated). The Optax states follow the same parameter-tree rule;
    counters and the model state are replicated.
    """
    mesh = _auto(mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(method.init, params, model_state)
    n_params = len(jax.tree_util.tree_leaves(params))
    n_shardings = len(jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda x: isinstance(x, Sharding)))
    if n_shardings != n_params:
        raise ValueError(f"param_shardings: expected one sharding per parameter leaf ({n_params}), got {n_shardings}")
    parts = {
        name: comp.state_shardings(getattr(shapes, name), params, param_shardings, rep)
        for name, comp in method.components().items()
    }
    return MethodState(
        count=rep,
        solver=parts["solver"],
        precond=parts["precond"],
        damping=parts["damping"],
        estimator=parts.get("estimator", ()),
        grad_tx=shard_like_params(shapes.grad_tx, params, param_shardings, rep),
        tx=shard_like_params(shapes.tx, params, param_shardings, rep),
        model_state=jax.tree_util.tree_map(lambda _: rep, shapes.model_state),
        nonfinite_count=rep,
        line_search=parts.get("line_search", ()),
    )
