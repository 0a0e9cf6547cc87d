"""Checkpoints of parameters and method state: plain pytrees of arrays.

``save(path, tree, method=method)`` / ``restore(path, like, method=method)`` use only
NumPy (one ``.npz`` file keyed by pytree path), so resuming needs no extra dependency;
``like`` supplies the structure (e.g. ``{"params": params, "state": method.init(params)}``).

* **Atomic.** ``save`` writes a temporary file in the target's folder, flushes and
  ``fsync``\\ s it, then renames it over the target: a write that fails (disk full, a
  file-size limit, an interrupt) leaves the previous checkpoint as it was.
* **It knows its method.** With ``method=``, the checkpoint records the method's
  :func:`fingerprint` (somax version, lane, components with their options, cadences,
  ``StepInfo`` keys, and a preset's name and options). ``restore(..., method=m)``
  refuses a checkpoint written by a different method, naming what differs, unless
  ``allow_method_mismatch=True``: a state of the right shapes from another method
  (another ``maxiter``, ``lam0``, learning rate, another preset) would otherwise load
  silently.

With Orbax installed, its checkpointers work on the same pytrees and are atomic by
themselves; store ``fingerprint(method)`` next to them (e.g. as JSON metadata) and
compare it on restore with :func:`check_fingerprint`. A resumed run reproduces the
uninterrupted one exactly (tested).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save", "restore", "fingerprint", "check_fingerprint", "MethodMismatchError"]

_FINGERPRINT_KEY = "__somax_fingerprint__"


class MethodMismatchError(ValueError):
    """A checkpoint written by a different method than the one restoring it."""


def _keys(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _simple(value: Any) -> Any:
    """A JSON value for an option: numbers, strings, bools and None as they are; anything else by type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_simple(v) for v in value]
    return f"<{type(value).__name__}>"


def fingerprint(method: Any) -> dict[str, Any]:
    """What identifies ``method`` for a checkpoint, as a JSON-serialisable dict."""
    from somax import __version__  # the package imports this module: read the version when called

    plan = method.plan
    out: dict[str, Any] = {
        "somax": __version__,
        "lane": plan.lane,
        "components": dict(plan.components),
        "cadences": sorted([r.probe, r.requester, r.every_k] for r in plan.requests if r.every_k != -1),
        "info_keys": list(plan.info_schema),
        "lam0": float(method.lam0),
    }
    if method.preset is not None:
        name, options = method.preset
        out["preset"] = {"name": name, "options": {k: _simple(v) for k, v in options.items()}}
    return out


def check_fingerprint(method: Any, stored: dict[str, Any] | None, *, where: str = "checkpoint") -> None:
    """Raise :class:`MethodMismatchError` naming every entry where ``stored`` differs from ``method``'s."""
    if stored is None:
        raise MethodMismatchError(
            f"restore: {where} records no method (it was saved without method=); pass "
            f"allow_method_mismatch=True to load it into this method anyway"
        )
    now = json.loads(json.dumps(fingerprint(method)))
    diffs = []
    for key in sorted(set(stored) | set(now)):
        if key == "somax":
            continue  # a newer somax reads an older checkpoint; the rest must agree
        a, b = stored.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} in the {where}, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]  # fmt: skip
        elif a != b:
            diffs.append(f"{key}: {a!r} in the {where}, {b!r} now")
    if diffs:
        raise MethodMismatchError(
            f"restore: the {where} was written by a different method: "
            + "; ".join(diffs[:8])
            + (f"; … ({len(diffs)} differences)" if len(diffs) > 8 else "")
            + ". Pass allow_method_mismatch=True to load it anyway"
        )


def save(path: str | os.PathLike, tree: Any, *, method: Any = None) -> None:
    """Write every array leaf of ``tree`` to ``path`` (``.npz``, bfloat16 included), atomically.

    Args:
      path: the checkpoint file (written as given; no extension is added).
      tree: a pytree of arrays (e.g. ``{"params": p, "state": s}``).
      method: the method whose state ``tree`` holds; its :func:`fingerprint` is recorded.
    """
    path = os.fspath(path)
    arrays = {}
    for key, leaf in zip(_keys(tree), jax.tree_util.tree_leaves(tree), strict=True):
        arr = np.asarray(leaf)
        if arr.dtype == jnp.bfloat16:
            arrays[key + "::bfloat16"] = arr.view(np.uint16)
        else:
            arrays[key] = arr
    if method is not None:
        arrays[_FINGERPRINT_KEY] = np.asarray(json.dumps(fingerprint(method), sort_keys=True))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as err:
        raise OSError(err.errno, f"save: cannot write checkpoint {path!r}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise OSError(
                err.errno,
                f"save: writing checkpoint {path!r} failed ({err.strerror}); the file at that path, if "
                f"any, is unchanged",
            ) from err
        raise
    try:  # make the rename itself durable; not every platform can open a folder
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def restore(path: str | os.PathLike, like: Any, *, method: Any = None, allow_method_mismatch: bool = False) -> Any:
    """Read ``path`` into a pytree with the structure, shapes and dtypes of ``like``.

    Args:
      path: a file written by :func:`save`.
      like: a pytree with the wanted structure, shapes and dtypes.
      method: the method that will use the state; refused if the checkpoint was written by
        another method (see the module docstring).
      allow_method_mismatch: load even if the recorded method differs or is missing.
    """
    try:
        with np.load(path) as data:
            stored = dict(data)
    except OSError as err:
        raise OSError(err.errno, f"restore: cannot read checkpoint {os.fspath(path)!r}: {err.strerror}") from err
    recorded = stored.pop(_FINGERPRINT_KEY, None)
    if method is not None and not allow_method_mismatch:
        check_fingerprint(method, json.loads(str(recorded)) if recorded is not None else None,
                          where=f"checkpoint {os.fspath(path)!r}")  # fmt: skip
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out = []
    for key, leaf in zip(_keys(like), leaves, strict=True):
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
