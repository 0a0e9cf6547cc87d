"""``StepInfo``: the read-only mapping every step returns, packed into a few arrays.

A step reports some twenty scalars (loss, ‖g‖, λ, rho, CG statistics, …). Returned
as twenty separate outputs of the jitted step, each costs an output buffer and its
own small copy in the compiled program: on a 6 ms CPU step that was 3 % of the
step time. ``StepInfo`` packs the scalars into two vectors, one of the float
dtype and one of ``int32`` (``bool`` fields travel there as 0/1: a third vector
was a third concatenate kernel for XLA to compile), and keeps array-valued fields
(``top_eigs``, ``block_top_eig``, the model's ``aux``) as they are, so a step has
two info outputs plus the arrays, whatever the number of keys.

To the user it is a ``Mapping`` with a fixed key order: ``info["loss"]`` is a
scalar array of the field's dtype, inside ``jit`` (a slice of the packed vector)
and outside (the first read unpacks each vector with one dispatch, and stays
asynchronous). It is a pytree, so it passes through ``jit``, ``lax.scan`` (every
field gains the leading step axis: ``infos["loss"]`` has shape ``(T,)``),
``jax.device_get`` and sharding rules unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

__all__ = ["StepInfo", "InfoLayout"]

#: The packed vectors, and which one holds each field kind (bools as int32 0/1).
VECTORS = ("float", "int")
STORED_IN = {"float": 0, "int": 1, "bool": 1}


@dataclass(frozen=True)
class InfoLayout:
    """Static layout: key order, and for each scalar key its kind and position in its packed vector."""

    order: tuple[str, ...]
    slots: tuple[tuple[str, str, int], ...]  # (key, kind, position in its vector) of the packed scalars

    def slot(self, key: str) -> tuple[str, int] | None:
        for k, kind, pos in self.slots:
            if k == key:
                return kind, pos
        return None

    def without(self, keys: frozenset[str]) -> InfoLayout:
        return InfoLayout(
            tuple(k for k in self.order if k not in keys), tuple(s for s in self.slots if s[0] not in keys)
        )


@jax.tree_util.register_pytree_with_keys_class
class StepInfo(Mapping):
    """One step's statistics: a fixed-key ``Mapping`` of scalar and array fields.

    Build it with :func:`somax.telemetry.fill_info`; read it like a dict.
    :meth:`numpy` fetches everything to the host in one transfer per packed vector.
    """

    __slots__ = ("_layout", "_vectors", "_arrays", "_unpacked")

    def __init__(self, layout: InfoLayout, vectors: tuple[Any, Any], arrays: dict[str, Any]):
        # No checks or conversions: JAX rebuilds pytrees with arbitrary leaves (shardings, shape structs).
        self._layout = layout
        self._vectors = tuple(vectors)
        self._arrays = arrays
        self._unpacked: dict[int, tuple[Any, ...]] = {}

    # -- Mapping -----------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        slot = self._layout.slot(key)
        if slot is None:
            if key in self._arrays and key in self._layout.order:
                return self._arrays[key]
            raise KeyError(f"StepInfo has no key {key!r}; keys: {', '.join(self._layout.order)}")
        kind, pos = slot
        i = STORED_IN[kind]
        vec = self._vectors[i]
        if isinstance(vec, jax.Array) and not isinstance(vec, jax.core.Tracer):
            if i not in self._unpacked:  # one dispatch for all fields of this vector
                bools = tuple(p for _, k, p in self._layout.slots if k == "bool" and STORED_IN[k] == i)
                self._unpacked[i] = _unstack(vec, bools)
            return self._unpacked[i][pos]
        value = vec[..., pos]
        return value != 0 if kind == "bool" else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout.order)

    def __len__(self) -> int:
        return len(self._layout.order)

    def __contains__(self, key: object) -> bool:
        return key in self._layout.order

    def __repr__(self) -> str:
        leaves = jax.tree_util.tree_leaves(self)
        if all(isinstance(v, np.ndarray | jax.Array) and not isinstance(v, jax.core.Tracer) for v in leaves):
            body = ", ".join(f"{k}={_short(v)}" for k, v in self.numpy().items())
        else:  # abstract values (inside a trace, from eval_shape): the keys only
            body = ", ".join(self._layout.order)
        return f"StepInfo({body})"

    # -- helpers -----------------------------------------------------------------
    def without(self, *keys: str) -> StepInfo:
        """A copy without ``keys`` (e.g. ``"aux"``, whose structure is the model's)."""
        drop = frozenset(keys)
        arrays = {k: v for k, v in self._arrays.items() if k not in drop}
        return StepInfo(self._layout.without(drop), self._vectors, arrays)

    def numpy(self) -> dict[str, Any]:
        """Every field as NumPy values (one host transfer per packed vector); blocks until ready."""
        host = [np.asarray(v) for v in self._vectors]
        arrays = jax.tree_util.tree_map(np.asarray, self._arrays)
        out: dict[str, Any] = {}
        for key in self._layout.order:
            slot = self._layout.slot(key)
            if slot is None:
                out[key] = arrays[key]
            else:
                kind, pos = slot
                value = host[STORED_IN[kind]][..., pos]
                out[key] = value != 0 if kind == "bool" else value
        return out

    # -- pytree ------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        gk = jax.tree_util.GetAttrKey
        children = [(gk(k), v) for k, v in zip(VECTORS, self._vectors, strict=True)]
        children.append((gk("arrays"), self._arrays))
        return children, self._layout

    @classmethod
    def tree_unflatten(cls, layout: InfoLayout, children: list[Any]) -> StepInfo:
        *vectors, arrays = children
        return cls(layout, tuple(vectors), arrays)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(vec: jax.Array, bools: tuple[int, ...]) -> tuple[jax.Array, ...]:
    return tuple(vec[..., i] != 0 if i in bools else vec[..., i] for i in range(vec.shape[-1]))


def _short(value: Any) -> str:
    arr = np.asarray(value) if not isinstance(value, Mapping) else None
    if arr is not None and arr.shape == ():
        return repr(arr.item())
    if arr is not None:
        return f"{arr.dtype}{list(arr.shape)}"
    return "{…}"
