"""Layer discovery: which parameter leaves are dense/conv kernels, biases, scales, embeddings.

Structured curvature (the structured row Gram, Kronecker-factored preconditioners) needs
to know, per parameter leaf, how it enters the model. This module finds that out from the
model itself, without layer registration: ``predict_fn`` on a batch of one example is
traced to a jaxpr (:func:`jax.make_jaxpr`, no FLOPs) and every parameter leaf is followed
through layout-only ops (``convert_element_type``, ``copy``, ``reshape``, ``transpose``,
``squeeze``, ``expand_dims``, same-size ``broadcast_in_dim``) and into ``jit`` /
``closed_call`` bodies. A leaf with exactly one use of a recognised form gets that kind:

* ``"dense"`` — one operand ``W`` of a ``dot_general`` without batch dimensions,
  ``y = a W`` (``x @ W``, ``x @ W.T``, ``jnp.einsum``, Flax ``nn.Dense`` / ``DenseGeneral``).
* ``"conv"`` — the kernel of a ``conv_general_dilated`` (Flax ``nn.Conv``), ungrouped.
* ``"bias"`` — added to the output of a dense/conv product (that output used only there),
  broadcast over the product's positions: ``y = a W + b``.
* ``"scale"`` — a vector multiplied elementwise along the last axis (LayerNorm/BatchNorm
  scales, ``h * s``).
* ``"embedding"`` — a 2-D table read by rows with a ``gather`` (``jnp.take``, ``table[ids]``,
  Flax ``nn.Embed``).
* ``"other"`` — anything else (used twice, inside ``custom_jvp``/``custom_vjp``/``scan``/
  ``cond``, a batched contraction, a grouped convolution…); ``"unused"`` — no use.

For a dense or conv kernel, write ``a_{i,t}`` for the input row of example ``i`` at position
``t`` (one position for an MLP; every output pixel for a convolution, with ``a`` the
im2col patch) and ``δ_{i,t} = ∂(uᵀ f(w, x_i)) / ∂y_{i,t}`` for the gradient at the product's
output ``y`` of the output cotangent ``u``. Then the kernel's gradient (as the
``(n_in, n_out)`` matrix :meth:`Layer.kernel_matrix`) is

    ∇_W (uᵀ f) = Σ_i Σ_t a_{i,t}ᵀ δ_{i,t},

and with a bias, ``a`` gets a trailing 1 (``d_in = n_in + 1``) so the last row of the same
sum is ``∇_b``. :func:`layer_inputs_and_output_grads` returns these ``a`` and ``δ`` for a
batch in one batched pass, for any number of cotangents per example (e.g. the rows of
the GGN square-root factor, :func:`row_cotangents`).

Assumption: examples do not interact (``predict_fn`` can be evaluated on one example).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from somax.curvature.losses import RowFactor

PyTree = Any
Path = tuple[int, ...]

__all__ = [
    "LAYER_KINDS",
    "ConvGeometry",
    "Layer",
    "LayerMap",
    "discover_layers",
    "layer_inputs_and_output_grads",
    "row_cotangents",
]

#: Every kind :func:`discover_layers` reports.
LAYER_KINDS = ("dense", "conv", "bias", "scale", "embedding", "other", "unused")

_LAYOUT_OPS = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "transpose", "squeeze", "expand_dims"})
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}


@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs of a ``conv_general_dilated`` (arguments of :func:`jax.lax.conv_general_dilated`).

    Attributes:
      kernel_shape: the kernel's spatial sizes (in ``dimension_numbers.rhs_spec`` order).
      strides, padding, lhs_dilation, rhs_dilation: the convolution's window parameters.
      dimension_numbers: the :class:`jax.lax.ConvDimensionNumbers` of the equation.
      out_spatial: spatial sizes of one example's output (``positions`` is their product).
    """

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    dimension_numbers: Any
    out_spatial: tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """How one parameter leaf enters the model.

    Attributes:
      name: ``jax.tree_util.keystr`` path of the leaf.
      kind: one of :data:`LAYER_KINDS`.
      leaf: index of the leaf in ``jax.tree_util.tree_leaves(params)``.
      n_in: dense: product of the contracted sizes; conv: ``C_in · Π kernel_shape`` (0 otherwise).
      n_out: dense: product of the kernel's free sizes; conv: ``C_out`` (0 otherwise).
      positions: ``T``, rows of ``a`` per example (dense: the product of the input's free
        axes, 1 for an MLP; conv: output pixels).
      bias: name of the bias leaf added to this kernel's output, or None; for a ``"bias"``
        leaf: None (see ``kernel``).
      kernel: for a ``"bias"`` leaf, the name of its kernel; else None.
      conv: the convolution geometry (``"conv"`` only).
      kernel_perm: kernel-operand axes in ``(n_in…, n_out…)`` order (see :meth:`kernel_matrix`).
      direct: the leaf is the product's kernel operand as is (no reshape/transpose in between).
      eqn, kernel_operand, a_contract, a_ndim, bias_leaf: trace details (equation path into
        nested ``jit`` bodies, which operand is the kernel, the other operand's contracted axes
        and rank, the bias leaf's index).
    """

    name: str
    kind: str
    leaf: int
    n_in: int = 0
    n_out: int = 0
    positions: int = 1
    bias: str | None = None
    kernel: str | None = None
    conv: ConvGeometry | None = None
    kernel_perm: tuple[int, ...] = ()
    direct: bool = False
    eqn: Path = ()
    kernel_operand: int = 1
    a_contract: tuple[int, ...] = ()
    a_ndim: int = 0
    bias_leaf: int | None = None

    @property
    def d_in(self) -> int:
        """Columns of ``a``: ``n_in``, plus 1 for the bias's column of ones."""
        return self.n_in + (self.bias is not None)

    @property
    def d_out(self) -> int:
        """Columns of ``δ`` (``n_out``)."""
        return self.n_out

    def kernel_matrix(self, w: jax.Array) -> jax.Array:
        """The kernel leaf (or a leaf-shaped array, e.g. its gradient) as the ``(n_in, n_out)``
        matrix whose rows match ``a``'s columns and whose columns match ``δ``'s.

        Conv: rows ordered ``(c_in, *kernel spatial)`` (im2col order). Requires ``direct``.
        """
        self._check_direct()
        return jnp.transpose(w, self.kernel_perm).reshape(self.n_in, self.n_out)

    def unmatrix(self, mat: jax.Array, kernel_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        """Inverse of :meth:`kernel_matrix` on a ``(d_in, n_out)`` matrix: ``(kernel-shaped, bias or None)``.

        With a bias the last row is returned as the bias (flat ``(n_out,)``; reshape it to the
        bias leaf's shape).
        """
        self._check_direct()
        shape = tuple(kernel_shape[d] for d in self.kernel_perm)
        kernel = jnp.transpose(mat[: self.n_in].reshape(shape), np.argsort(self.kernel_perm))
        return kernel, (mat[self.n_in] if self.bias is not None else None)

    def _check_direct(self) -> None:
        if self.kind not in ("dense", "conv") or not self.direct:
            raise ValueError(f"layer {self.name}: kernel_matrix needs a dense/conv kernel used as is (no reshape)")

    def __str__(self) -> str:
        if self.kind == "dense" or self.kind == "conv":
            s = f"{self.kind} d_in={self.d_in} d_out={self.d_out} positions={self.positions}"
            s += f" bias={self.bias}" if self.bias else ""
            if self.conv is not None:
                c = self.conv
                s += f" kernel={c.kernel_shape} strides={c.strides} padding={c.padding} dilation={c.rhs_dilation}"
            return s
        return f"bias of {self.kernel}" if self.kind == "bias" else self.kind


class LayerMap(Mapping[str, Layer]):
    """Read-only mapping ``leaf name -> Layer`` in ``tree_leaves`` order; ``print`` it for a table."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self._layers = {layer.name: layer for layer in layers}

    def __getitem__(self, name: str) -> Layer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def kinds(self) -> dict[str, str]:
        """``{leaf name: kind}``."""
        return {name: layer.kind for name, layer in self._layers.items()}

    def of_kind(self, *kinds: str) -> tuple[Layer, ...]:
        """The layers of the given kinds, in ``tree_leaves`` order."""
        return tuple(layer for layer in self._layers.values() if layer.kind in kinds)

    def __str__(self) -> str:
        width = max((len(n) for n in self._layers), default=0)
        return "\n".join(f"{name:<{width}}  {layer}" for name, layer in self._layers.items())

    def __repr__(self) -> str:
        return f"LayerMap({self.kinds()!r})"


# ----------------------------------------------------------------------------- tracing and the walk


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


def discover_layers(predict_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, inputs: PyTree) -> LayerMap:
    """How every parameter leaf enters ``predict_fn`` (``print`` the result for a table).

    Args:
      predict_fn: ``predict_fn(params, x) -> outputs`` on a batch (leading axis = examples).
      params: the parameters (arrays or :class:`jax.ShapeDtypeStruct`; only shapes are used).
      inputs: a batch of inputs (leading axis = examples, any size ≥ 1; only shapes are used).

    Returns:
      A :class:`LayerMap` keyed by ``jax.tree_util.keystr`` of every leaf. The model is traced
      on a batch of one example; nothing is evaluated.
    """
    closed, _ = _single_example_jaxpr(predict_fn, params, inputs)
    return _discover(closed, params)


# ----------------------------------------------------------------------------- evaluation with perturbations


def _eval(jaxpr: Any, consts: Sequence, args: Sequence, perts: dict, kernels: dict, record: dict, path: Path) -> list:
    """``jax.core.eval_jaxpr`` that adds ``perts[p]`` to the output of product equation ``p``
    (kernel operand ``kernels[p]``) and records its other operand ``a`` in ``record[p]``;
    ``jit`` bodies containing such an equation are inlined."""
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for e, eqn in enumerate(jaxpr.eqns):
        here = path + (e,)
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and any(p[: len(here)] == here and len(p) > len(here) for p in perts):
            sub = eqn.params[_CALLS[name]]
            outvals = _eval(sub.jaxpr, sub.consts, invals, perts, kernels, record, here)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = ans if eqn.primitive.multiple_results else [ans]
            if here in perts:
                record[here] = invals[1 - kernels[here]]
                outvals = [outvals[0] + perts[here].astype(outvals[0].dtype)]
        for v, val in zip(eqn.outvars, outvals):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _find_eqn(jaxpr: Any, path: Path) -> Any:
    eqn = jaxpr.eqns[path[0]]
    for e in path[1:]:
        eqn = eqn.params[_CALLS[eqn.primitive.name]].jaxpr.eqns[e]
    return eqn


def _perturbed_pass(
    closed: jcore.ClosedJaxpr, leaves: list, x_leaves: list, layers: Sequence[Layer], cot: jax.Array, wrt: Sequence[int]
) -> tuple[dict, dict, list]:
    """One batched reverse pass: ``(a, δ, ∂)`` with ``a[eqn]`` the recorded other operand
    ``(b, *a_shape)``, ``δ[eqn]`` the product-output cotangents ``(b, rows, *y_shape)`` and
    ``∂[k]`` the cotangent of leaf ``wrt[k]`` per example and row, for cotangents ``cot``
    ``(b, rows, *out_shape)``."""
    kernels = {u.eqn: u.kernel_operand for u in layers}
    y_avals = {u.eqn: _find_eqn(closed.jaxpr, u.eqn).outvars[0].aval for u in layers}

    def per_example(xi_leaves: list, cot_i: jax.Array) -> tuple[dict, dict, list]:
        def f(perts: dict, fb: list) -> tuple[jax.Array, dict]:
            args = list(leaves)
            for i, v in zip(wrt, fb):
                args[i] = v
            record: dict[Path, jax.Array] = {}
            (out,) = _eval(closed.jaxpr, closed.consts, args + list(xi_leaves), perts, kernels, record, ())
            return out, record

        zeros = {p: jnp.zeros(a.shape, a.dtype) for p, a in y_avals.items()}
        _, vjp_fn, acts = jax.vjp(f, zeros, [leaves[i] for i in wrt], has_aux=True)
        deltas, grads = jax.vmap(vjp_fn)(cot_i)
        return acts, deltas, grads

    return jax.vmap(per_example)(x_leaves, cot)


def _as_matrices(layer: Layer, a: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Recorded operand ``(b, *a_shape)`` and product cotangent ``(b, rows, *y_shape)`` as
    ``a: (b, T, n_in)`` and ``δ: (b, rows, T, n_out)``."""
    b, rows = delta.shape[:2]
    if layer.kind == "conv":
        c = layer.conv
        _, _, out_spec = c.dimension_numbers

        def patches(lhs: jax.Array) -> jax.Array:
            return jax.lax.conv_general_dilated_patches(
                lhs, c.kernel_shape, c.strides, c.padding, c.lhs_dilation, c.rhs_dilation, c.dimension_numbers,
                precision=jax.lax.Precision.HIGHEST,
            )  # fmt: skip

        order = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)  # (batch of one, *spatial, features)
        a = jnp.transpose(jax.vmap(patches)(a), (0,) + tuple(1 + d for d in order)).reshape(b, layer.positions, -1)
        delta = jnp.transpose(delta, (0, 1) + tuple(2 + d for d in order))
        return a, delta.reshape(b, rows, layer.positions, layer.n_out)
    free = [d for d in range(layer.a_ndim) if d not in layer.a_contract]
    perm = (0,) + tuple(1 + d for d in free + list(layer.a_contract))
    a = jnp.transpose(a, perm).reshape(b, layer.positions, layer.n_in)
    if layer.kernel_operand == 0:  # y = (kernel free, a free): bring the positions first
        delta = delta.reshape(b, rows, layer.n_out, layer.positions).swapaxes(-1, -2)
    return a, delta.reshape(b, rows, layer.positions, layer.n_out)


def layer_inputs_and_output_grads(
    predict_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    inputs: PyTree,
    cotangents: jax.Array,
    layers: LayerMap | Sequence[str] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-example layer inputs ``a`` and output gradients ``δ`` of every dense/conv kernel.

    For kernel ``W`` of ``y = a W`` and output cotangents ``u_i`` (one or several per
    example), ``δ_{i,t} = ∂(u_iᵀ f(w, x_i))/∂y_{i,t}`` and ``Σ_{i,t} a_{i,t}ᵀ δ_{i,t}`` is the
    gradient ``∇ Σ_i u_iᵀ f(w, x_i)`` w.r.t. ``layer.kernel_matrix(W)`` (and, when the layer
    has a bias, the bias in the last row). One batched pass: the model is evaluated per
    example (``vmap``) with a zero perturbation at each product's output; one reverse pass
    gives every ``δ``.

    Args:
      predict_fn: ``predict_fn(params, x) -> outputs`` on a batch.
      params: the linearization point.
      inputs: the batch inputs (leading axis = ``n`` examples).
      cotangents: ``(n, *out)`` (one per example) or ``(n, rows, *out)``, where ``out`` is
        the per-example output shape (e.g. :func:`row_cotangents` of the GGN square root).
      layers: which layers (a :class:`LayerMap` or leaf names; default: every dense/conv
        kernel discovered). Only ``"dense"`` and ``"conv"`` layers are accepted.

    Returns:
      ``{name: (a, δ)}`` with ``a: (n, T, d_in)`` (a trailing column of ones when the layer
      has a bias; conv: im2col patches, columns ordered ``(c_in, *kernel spatial)``, rows ``t``
      over output pixels in row-major spatial order) and ``δ: (n, T, d_out)``, or
      ``(n, rows, T, d_out)`` for cotangents with a rows axis.
    """
    closed, single_out = _single_example_jaxpr(predict_fn, params, inputs)
    found = _discover(closed, params)
    if layers is None or isinstance(layers, LayerMap):
        names = [n for n in layers or found if found[n].kind in ("dense", "conv")]
    else:
        names = list(layers)
    for n in names:
        if n not in found or found[n].kind not in ("dense", "conv"):
            kind = found[n].kind if n in found else "not a parameter leaf"
            raise ValueError(f"layer_inputs_and_output_grads: {n} is {kind}, not a dense/conv kernel")
    out_shape = tuple(single_out.shape)
    cot = jnp.asarray(cotangents)
    if cot.shape[1:] == out_shape:
        has_rows, cot = False, cot[:, None]
    elif cot.shape[2:] == out_shape:
        has_rows = True
    else:
        raise ValueError(f"cotangents of shape {cot.shape}: expected (n, {out_shape}) or (n, rows, {out_shape})")
    selected = [found[n] for n in names]
    leaves, x_leaves = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(inputs)
    acts, deltas, _ = _perturbed_pass(closed, leaves, x_leaves, selected, cot.astype(single_out.dtype), ())
    result = {}
    for layer in selected:
        a, delta = _as_matrices(layer, acts[layer.eqn], deltas[layer.eqn])
        if layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        result[layer.name] = (a, delta if has_rows else delta[:, 0])
    return result


def row_cotangents(factor: RowFactor, out_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``Rᵢᵀ e_c`` for every example ``i`` and row ``c`` of a row factor ``R``: ``(b, m/b, *out_shape)``.

    ``R`` (e.g. the GGN square root ``H_z = Rᵀ R / n``) is block diagonal over examples, so
    one ``apply_t`` of ``e_c`` placed in every example's rows gives the ``c``-th row of every
    ``Rᵢ`` at once. Used as ``cotangents`` of :func:`layer_inputs_and_output_grads`, ``δ`` are
    the whitened rows ``Ĵ = R J`` at each layer output.
    """
    row_shape = tuple(factor.row_shape)
    per = _prod(row_shape[1:])
    basis = jnp.eye(per, dtype=dtype).reshape((per, 1) + row_shape[1:])
    basis = jnp.broadcast_to(basis, (per,) + row_shape)
    cot = jax.vmap(factor.apply_t)(basis)  # (per, b, *out_shape)
    return jnp.moveaxis(cot, 0, 1).astype(dtype)
