"""The jaxpr walk of layer discovery: trace ``predict_fn`` on one example and follow every leaf.

:func:`_discover` turns the jaxpr of :func:`_single_example_jaxpr` into a :class:`LayerMap`
(the kinds are described in :mod:`somax.curvature.layers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from somax.curvature.layer_map import ConvGeometry, Layer, LayerMap, Path

PyTree = Any

_LAYOUT_OPS = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "transpose", "squeeze", "expand_dims"})
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}


def _single_example_jaxpr(predict_fn: Callable, params: PyTree, inputs: PyTree) -> tuple[jcore.ClosedJaxpr, Any]:
    """Jaxpr of ``(param leaves, x_i leaves) ↦ predict_fn(params, x_i[None])[0]`` and its output shape."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(inputs)

    def single(p_leaves: list, xi_leaves: list) -> jax.Array:
        p = jax.tree_util.tree_unflatten(treedef, p_leaves)
        xi = jax.tree_util.tree_unflatten(x_def, [a[None] for a in xi_leaves])
        return predict_fn(p, xi)[0]

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
    x_specs = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in x_leaves]
    closed, out_shape = jax.make_jaxpr(single, return_shape=True)(specs, x_specs)
    return closed, out_shape


def _prod(xs: Any) -> int:
    return int(np.prod(list(xs), dtype=np.int64))


@dataclass(frozen=True)
class _Src:
    """A variable derived from parameter leaf ``leaf``; ``axes``: the variable's axes that carry
    the leaf's entries (the others are broadcast or of size 1); ``direct``: no reshape/transpose;
    ``size``: the leaf's size."""

    leaf: int
    axes: tuple[int, ...]
    direct: bool
    size: int

    def image(self, v: Any) -> bool:
        """Whether ``v`` holds each of the leaf's entries once (not broadcast)."""
        return v.aval.size == self.size


def _dense_pattern(eqn: Any, operand: int) -> tuple | None:
    """``(a_contract, a_ndim, T, n_in, n_out, kernel_perm, out_free_axes)`` if operand ``operand``
    of this ``dot_general`` is a kernel of ``y = a W`` (no batch dimensions), else None."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or eqn.invars[0] is eqn.invars[1]:
        return None
    kernel, other = eqn.invars[operand], eqn.invars[1 - operand]
    k_contract, a_contract = (lc, rc) if operand == 0 else (rc, lc)
    k_shape, a_shape = kernel.aval.shape, other.aval.shape
    k_free = [d for d in range(len(k_shape)) if d not in k_contract]
    a_free = len(a_shape) - len(a_contract)
    out_free = tuple(range(len(k_free))) if operand == 0 else tuple(range(a_free, a_free + len(k_free)))
    t = _prod(a_shape[d] for d in range(len(a_shape)) if d not in a_contract)
    n_in, n_out = _prod(k_shape[d] for d in k_contract), _prod(k_shape[d] for d in k_free)
    perm = tuple(int(d) for d in k_contract) + tuple(k_free)
    return tuple(int(d) for d in a_contract), len(a_shape), t, n_in, n_out, perm, out_free


def _conv_pattern(eqn: Any) -> tuple | None:
    """``(geometry, n_in, n_out, kernel_perm, out_free_axes)`` of an ungrouped convolution's kernel."""
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn
    spatial = tuple(rhs_spec[2:])
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or list(spatial) != sorted(spatial):
        return None
    k_shape, out_shape = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
    geometry = ConvGeometry(
        kernel_shape=tuple(int(k_shape[d]) for d in spatial),
        strides=tuple(p["window_strides"]),
        padding=tuple(tuple(int(v) for v in pad) for pad in p["padding"]),
        lhs_dilation=tuple(p["lhs_dilation"]),
        rhs_dilation=tuple(p["rhs_dilation"]),
        dimension_numbers=dn,
        out_spatial=tuple(int(out_shape[d]) for d in out_spec[2:]),
    )
    n_in = int(k_shape[rhs_spec[1]]) * _prod(geometry.kernel_shape)
    perm = (int(rhs_spec[1]),) + tuple(int(d) for d in spatial) + (int(rhs_spec[0]),)
    return geometry, n_in, int(k_shape[rhs_spec[0]]), perm, (int(out_spec[1]),)


def _use_counts(jaxpr: Any) -> dict:
    counts: dict = {}
    for v in [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars):
        if not isinstance(v, jcore.Literal):
            counts[v] = counts.get(v, 0) + 1
    return counts


def _non_unit(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d, s in enumerate(shape) if s != 1)


def _walk(jaxpr: Any, origin: dict, uses: dict[int, list], path: Path) -> None:
    """Record every use of a leaf-derived variable: ``("dense", path, operand, pattern, direct)``,
    ``("conv", path, pattern, direct)``, ``("bias", path of the product)``, ``("scale",)``,
    ``("embedding",)`` or ``("other",)``."""
    prod_out: dict = {}  # output var of a dense/conv product with one tracked kernel -> (path, free axes)
    counts = _use_counts(jaxpr)
    for e, eqn in enumerate(jaxpr.eqns):
        name, here = eqn.primitive.name, path + (e,)
        tracked = [(k, origin[v]) for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in origin]
        if not tracked:
            continue
        out = eqn.outvars[0].aval
        inexact = jnp.issubdtype(out.dtype, jnp.inexact)
        same_size = eqn.invars[0].aval.size == out.size
        src = tracked[0][1]
        bias = _bias_of(eqn, tracked[0], prod_out, counts) if name in ("add", "add_any") and len(tracked) == 1 else None
        if inexact and len(eqn.invars) == 1 and (name in _LAYOUT_OPS or (name == "broadcast_in_dim" and same_size)):
            if not src.image(eqn.invars[0]):  # a layout op on a broadcast value: no longer tracked by axes
                uses[src.leaf].append(("other",))
                continue
            direct = src.direct and name in ("convert_element_type", "copy", "copy_p")
            origin[eqn.outvars[0]] = _Src(src.leaf, _non_unit(out.shape), direct, src.size)
        elif inexact and name == "broadcast_in_dim" and len(eqn.invars) == 1:
            dims = eqn.params["broadcast_dimensions"]
            origin[eqn.outvars[0]] = _Src(src.leaf, tuple(dims[d] for d in src.axes), False, src.size)
        elif bias is not None:
            uses[src.leaf].append(("bias", bias))
        elif name == "mul" and len(tracked) == 1 and _is_scale(eqn, tracked[0]):
            uses[src.leaf].append(("scale",))
        elif name == "gather" and [k for k, _ in tracked] == [0] and src.image(eqn.invars[0]) and _is_row_gather(eqn):
            uses[src.leaf].append(("embedding",))
        elif name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]].jaxpr
            _walk(sub, {sub.invars[k]: s for k, s in tracked}, uses, here)
        elif name == "dot_general":
            for k, s in tracked:
                pattern = _dense_pattern(eqn, k) if s.image(eqn.invars[k]) else None
                uses[s.leaf].append(("dense", here, k, pattern, s.direct) if pattern else ("other",))
                if pattern and len(tracked) == 1:
                    prod_out[eqn.outvars[0]] = (here, pattern[-1])
        elif name == "conv_general_dilated" and [k for k, _ in tracked] == [1] and src.image(eqn.invars[1]):
            if (pattern := _conv_pattern(eqn)) is None:
                uses[src.leaf].append(("other",))
                continue
            uses[src.leaf].append(("conv", here, pattern, src.direct))
            prod_out[eqn.outvars[0]] = (here, pattern[-1])
        else:
            for _, s in tracked:
                uses[s.leaf].append(("other",))
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal) and v in origin:
            uses[origin[v].leaf].append(("other",))


def _bias_of(eqn: Any, tracked: tuple[int, _Src], prod_out: dict, counts: dict) -> Path | None:
    """Path of the product ``y`` if this is ``y + b`` with ``b`` along ``y``'s kernel axes and ``y`` used only here."""
    k, src = tracked
    y, b = eqn.invars[1 - k], eqn.invars[k]
    if isinstance(y, jcore.Literal) or y not in prod_out or counts.get(y, 0) != 1:
        return None
    path, free = prod_out[y]
    shape = y.aval.shape
    if eqn.outvars[0].aval.shape != shape or b.aval.ndim != len(shape):
        return None
    if src.axes != tuple(d for d in free if shape[d] != 1) or any(b.aval.shape[d] != shape[d] for d in free):
        return None
    return path


def _is_scale(eqn: Any, tracked: tuple[int, _Src]) -> bool:
    """``h * s`` with ``s`` a vector along the output's last axis (the other factor not a parameter)."""
    k, src = tracked
    out, s = eqn.outvars[0].aval, eqn.invars[k].aval
    return out.ndim > 0 and s.ndim == out.ndim and src.axes == (out.ndim - 1,) and s.shape[-1] == out.shape[-1]


def _is_row_gather(eqn: Any) -> bool:
    """``table[ids]`` on a 2-D table: whole rows gathered by one index."""
    table, dn = eqn.invars[0].aval, eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    return table.ndim == 2 and sizes == (1, table.shape[1]) and tuple(dn.collapsed_slice_dims) == (0,)


def _discover(closed: jcore.ClosedJaxpr, params: PyTree) -> LayerMap:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [jax.tree_util.keystr(k) for k, _ in flat]
    invars = closed.jaxpr.invars[: len(names)]
    origin = {v: _Src(i, _non_unit(v.aval.shape), True, v.aval.size) for i, v in enumerate(invars)}
    uses: dict[int, list] = {i: [] for i in range(len(names))}
    _walk(closed.jaxpr, origin, uses, ())
    layers: list[Layer] = []
    by_eqn: dict[Path, int] = {}
    for i, name in enumerate(names):
        u = uses[i]
        kind = "unused" if not u else u[0][0] if len(u) == 1 else "other"
        if kind == "dense" and u[0][1] not in by_eqn:  # a product of two leaves: the first is its kernel
            _, path, operand, (a_contract, a_ndim, t, n_in, n_out, perm, _), direct = u[0]
            by_eqn[path] = i
            layers.append(Layer(name, "dense", i, n_in, n_out, t, kernel_perm=perm, direct=direct, eqn=path,
                                kernel_operand=operand, a_contract=a_contract, a_ndim=a_ndim))  # fmt: skip
        elif kind == "conv":
            _, path, (geometry, n_in, n_out, perm, _), direct = u[0]
            by_eqn[path] = i
            layers.append(Layer(name, "conv", i, n_in, n_out, _prod(geometry.out_spatial), conv=geometry,
                                kernel_perm=perm, direct=direct, eqn=path))  # fmt: skip
        else:
            layers.append(Layer(name, "other" if kind in ("dense", "conv") else kind, i))
    for j, layer in enumerate(layers):
        if layer.kind != "bias":
            continue
        k = by_eqn.get(uses[j][0][1])
        if k is None or layers[k].bias is not None or invars[j].aval.size != layers[k].n_out:
            layers[j] = replace(layer, kind="other")
            continue
        layers[k] = replace(layers[k], bias=layer.name, bias_leaf=j)
        layers[j] = replace(layer, kernel=layers[k].name)
    return LayerMap(layers)
