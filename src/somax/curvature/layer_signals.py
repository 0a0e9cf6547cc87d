"""Per-example layer inputs ``a`` and output gradients ``δ`` of dense/conv kernels.

The model's jaxpr (:mod:`somax.curvature.layer_walk`) is re-evaluated per example with a
zero perturbation added to each product's output; one reverse pass gives every ``δ`` as the
perturbations' cotangents, and the products' other operands ``a`` are recorded on the way
(im2col patches for a convolution). Public through :mod:`somax.curvature.layers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from somax.curvature.conv_layout import canonical_convolutions
from somax.curvature.layer_map import Layer, LayerMap, Path
from somax.curvature.layer_walk import _CALLS, PyTree, _discover, _prod, _single_example_jaxpr
from somax.curvature.losses import RowFactor

__all__ = ["layer_inputs_and_output_grads", "row_cotangents"]


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

    def batched(leaves: list, x_leaves: list, cot: jax.Array) -> tuple[dict, dict, list]:
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

    # the reverse pass's convolutions in the canonical layout, as the curvature products'
    # (a step inside a user's scan over steps would otherwise run XLA:CPU's slow loop emitter)
    return canonical_convolutions(batched)(list(leaves), list(x_leaves), cot)


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
