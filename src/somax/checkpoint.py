"""Checkpoints of parameters and method state: plain pytrees of arrays.

``save(path, tree)`` / ``restore(path, like)`` use only NumPy (one ``.npz`` file
keyed by pytree path), so resuming needs no extra dependency; ``like`` supplies the
structure (e.g. ``method.init(params)``). With Orbax installed, any of its
checkpointers works on the same pytrees, e.g.
``orbax.checkpoint.StandardCheckpointer().save(path, {"params": p, "state": s})``.
A resumed run reproduces the uninterrupted one exactly (tested).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save", "restore"]


def _keys(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write every array leaf of ``tree`` to ``path`` (``.npz``), bfloat16 included."""
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {}
    for key, leaf in zip(_keys(tree), leaves):
        arr = np.asarray(leaf)
        if arr.dtype == jnp.bfloat16:
            arrays[key + "::bfloat16"] = arr.view(np.uint16)
        else:
            arrays[key] = arr
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def restore(path: str | os.PathLike, like: Any) -> Any:
    """Read ``path`` into a pytree with the structure, shapes and dtypes of ``like``."""
    with np.load(path) as data:
        stored = dict(data)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out = []
    for key, leaf in zip(_keys(like), leaves):
        ref = np.asarray(leaf)
        if key + "::bfloat16" in stored:
            arr = stored.pop(key + "::bfloat16").view(jnp.bfloat16)
        elif key in stored:
            arr = stored.pop(key)
        else:
            raise KeyError(f"restore: checkpoint {os.fspath(path)!r} has no entry {key!r}")
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise ValueError(
                f"restore: entry {key!r} is {arr.dtype}{list(arr.shape)} in the checkpoint, "
                f"but {ref.dtype}{list(ref.shape)} in `like`"
            )
        out.append(jnp.asarray(arr))
    if stored:
        raise ValueError(f"restore: checkpoint has entries not in `like`: {sorted(stored)[:5]}")
    return jax.tree_util.tree_unflatten(treedef, out)
