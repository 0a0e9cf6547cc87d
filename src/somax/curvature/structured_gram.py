"""Structured row Gram ``Ĵ Ĵᵀ`` from dense-layer structure (paper §2.3 eq. 2.8; EGN).

The row-Cholesky solver needs the dense Gram ``Ĵ Ĵᵀ`` (``m × m``) of the whitened
Jacobian ``Ĵ = R J``. Materialising per-example Jacobians and contracting them costs
``m² d`` flops. For a parameter leaf ``W`` that enters the model only as the kernel of one
dense product ``y = a W`` the per-example Jacobian has structure: with ``a_{i,t}`` the
input rows of example ``i`` (``t`` runs over positions; one position for an MLP) and
``δ_{i,c,t} = ∂(R z)_{i,c} / ∂y_{i,t}`` the backprop vector of whitened row ``(i, c)`` at
the layer output,

    ∂(R z)_{i,c} / ∂W = Σ_t a_{i,t} ⊗ δ_{i,c,t},
    ⟨Ĵ_{ic}, Ĵ_{jd}⟩_W = Σ_{t,t'} (a_{i,t} · a_{j,t'}) (δ_{i,c,t} · δ_{j,d,t'}),

which costs ``(bT)² n_in + (mT)² n_out + m² T²`` instead of ``m² n_in n_out`` (the
"structured derivatives" trick of the fast empirical NTK). The Gram does not depend on
how ``W``'s entries are laid out, so a kernel used transposed or reshaped is the same.

How the dense uses are found, without any layer registration:

1. :mod:`somax.curvature.layers` traces ``predict_fn`` on one example and reports every
   leaf's kind. Its ``"dense"`` kernels (the only use of the leaf is one operand of a
   ``dot_general`` without batch dimensions) are structured; every other leaf (convolution
   kernels, norm scales, a kernel used twice or inside a ``custom_jvp``/``custom_vjp``/
   ``scan``…) is a *fallback* leaf; an ``"unused"`` leaf contributes nothing. A ``"bias"``
   of a structured kernel with one position is folded into it: ``∂(Rz)_{ic}/∂b = δ_{ic}``,
   so its Gram term ``δ_{ic}·δ_{jd}`` joins the kernel's as ``(a_i·a_j + 1)(δ_{ic}·δ_{jd})``
   at no extra cost (other biases fall back).
2. The jaxpr is re-evaluated with a zero perturbation added to each dense kernel's
   ``dot_general`` output and the other operand ``a`` recorded. One reverse pass per
   example, ``vmap``-ed over the ``m/b`` whitened rows ``Rᵢᵀ e_c`` as cotangents, gives
   every ``δ`` (the perturbations' cotangents) **and** the whitened per-example
   Jacobians of the fallback leaves (the same pass differentiates them).

Assumptions (shared with the per-example Gram of :mod:`somax.curvature.rows`): examples
do not interact (``predict_fn`` can be evaluated on a batch of one), and the row factor
``R`` is block diagonal over examples (true of every loss in the library: ``H_z`` of a
sum over examples is block diagonal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax.curvature.layer_signals import _as_matrices, _perturbed_pass
from somax.curvature.layer_signals import row_cotangents as _row_cotangents
from somax.curvature.layer_walk import _discover, _single_example_jaxpr
from somax.curvature.layers import Layer, LayerMap
from somax.curvature.losses import RowFactor

PyTree = Any

__all__ = ["GRAM_MODES", "GramPlan", "gram_plan", "structured_gram"]

#: ``"auto"``: dense kernels structured where that is cheaper than their per-example
#: Jacobian (always, for one position); ``"structured"``: every recognised kernel
#: structured; ``"per_example"``: the reference path of :mod:`somax.curvature.rows`.
GRAM_MODES = ("auto", "structured", "per_example")


@dataclass(frozen=True)
class GramPlan:
    """Per-leaf plan of the structured Gram (static; decided at trace time).

    Attributes:
      names: ``jax.tree_util.keystr`` of every leaf.
      dense: structured dense kernels (:class:`~somax.curvature.layers.Layer`; a bias folded
        into a kernel is its ``bias_leaf``, else ``bias_leaf`` is None).
      fallback: leaves whose whitened per-example Jacobian is materialised.
      unused: leaves the outputs do not depend on (no Gram contribution).
    """

    names: tuple[str, ...]
    dense: tuple[Layer, ...]
    fallback: tuple[int, ...]
    unused: tuple[int, ...]

    def kinds(self) -> dict[str, str]:
        """``{leaf name: "dense" | "bias" | "per_example" | "unused"}``."""
        out = {self.names[u.leaf]: "dense" for u in self.dense}
        out.update({self.names[u.bias_leaf]: "bias" for u in self.dense if u.bias_leaf is not None})
        out.update({self.names[i]: "per_example" for i in self.fallback})
        out.update({self.names[i]: "unused" for i in self.unused})
        return out

    def __str__(self) -> str:
        return "\n".join(f"{name}: {kind}" for name, kind in self.kinds().items())


def _analyse(layers: LayerMap, rows_per_example: int, batch: int, mode: str) -> GramPlan:
    """Which of the discovered dense kernels (and their biases) the Gram structures."""
    dense, fallback, unused = [], [], []
    m = batch * rows_per_example
    for layer in layers.values():
        if layer.kind == "unused":
            unused.append(layer.leaf)
        elif layer.kind == "dense":
            t, n_in, n_out = layer.positions, layer.n_in, layer.n_out
            structured = True
            if mode == "auto":  # flops of the structured contraction vs the per-example Jacobian product
                cost_structured = (batch * t) ** 2 * n_in + (m * t) ** 2 * n_out + (m * t) ** 2
                cost_per_example = m * t * n_in * n_out + m * m * n_in * n_out
                structured = cost_structured < cost_per_example
            if structured and (layer.bias_leaf is None or t == 1):
                dense.append(layer)
            elif structured:  # a bias broadcast over positions: per-example Jacobian
                dense.append(dataclasses.replace(layer, bias=None, bias_leaf=None))
                fallback.append(layer.bias_leaf)
            else:
                fallback += [layer.leaf] + ([layer.bias_leaf] if layer.bias_leaf is not None else [])
        elif layer.kind != "bias":
            fallback.append(layer.leaf)
        elif layers[layer.kernel].kind != "dense":
            fallback.append(layer.leaf)  # a convolution's bias
    return GramPlan(tuple(layers), tuple(dense), tuple(sorted(fallback)), tuple(unused))


def gram_plan(
    predict_fn: Callable, params: PyTree, inputs: PyTree, *, rows_per_example: int = 1, mode: str = "auto"
) -> GramPlan:
    """Which leaves the structured Gram treats as dense kernels (``print`` it for a summary).

    ``inputs`` is a batch (leading axis = examples); ``rows_per_example`` (``m/b``) only
    matters for ``mode="auto"``'s cost comparison.
    """
    _check_mode(mode)
    closed, _ = _single_example_jaxpr(predict_fn, params, inputs)
    batch = int(jax.tree_util.tree_leaves(inputs)[0].shape[0])
    return _analyse(_discover(closed, params), rows_per_example, batch, mode)


def _check_mode(mode: str) -> None:
    if mode not in GRAM_MODES:
        raise ValueError(f"gram must be one of {GRAM_MODES}, got {mode!r}")


def structured_gram(
    predict_fn: Callable,
    params: PyTree,
    inputs: PyTree,
    factor: RowFactor,
    out_shape: tuple[int, ...],
    dtype: Any,
    *,
    mode: str = "auto",
) -> jax.Array:
    """Dense ``Ĵ Ĵᵀ`` (``m × m``, accumulated in ``dtype``) from dense-kernel structure.

    Args:
      predict_fn: ``predict_fn(params, x)``, evaluated here on single examples.
      params: the linearization point.
      inputs: the batch inputs (leading axis = examples).
      factor: the output loss's row factor (``R`` block diagonal over examples).
      out_shape: the batch outputs' shape ``(b, *per-example shape)``.
      dtype: dtype of the Gram products.
      mode: ``"auto"`` or ``"structured"`` (see :data:`GRAM_MODES`).
    """
    _check_mode(mode)
    if mode == "per_example":
        raise ValueError("structured_gram: mode 'per_example' is RowOperator.gram's reference path")
    leaves = jax.tree_util.tree_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(inputs)
    b = int(out_shape[0])
    per = int(np.prod(tuple(factor.row_shape)[1:], dtype=np.int64))
    m = b * per
    closed, single_out = _single_example_jaxpr(predict_fn, params, inputs)
    if tuple(single_out.shape) != tuple(out_shape[1:]):
        raise ValueError(
            f"row Gram: predict_fn on one example gave outputs of shape {tuple(single_out.shape)}, "
            f"but the batch outputs have shape {tuple(out_shape)}; predict_fn must map a batch of one "
            f"example to outputs of shape (1, ...) like the full batch"
        )
    plan = _analyse(_discover(closed, params), per, b, mode)
    cot = _row_cotangents(factor, tuple(single_out.shape), single_out.dtype)  # (b, per, *out)
    acts, deltas, fb_rows = _perturbed_pass(closed, leaves, x_leaves, plan.dense, cot, plan.fallback)
    hi = jax.lax.Precision.HIGHEST
    parts = []
    for u in plan.dense:
        a, delta = _as_matrices(u, acts[u.eqn].astype(dtype), deltas[u.eqn].astype(dtype))
        if u.positions == 1:
            ka = jnp.dot(a[:, 0], a[:, 0].T, precision=hi)  # (b, b)
            if u.bias_leaf is not None:  # y = aW + b: the bias is a column of ones appended to a
                ka = ka + 1
            d2 = delta.reshape(m, u.n_out)
            dd = jnp.dot(d2, d2.T, precision=hi).reshape(b, per, b, per)
            parts.append((dd * ka[:, None, :, None]).reshape(m, m))
        else:
            ka = jnp.einsum("itk,jsk->itjs", a, a, precision=hi)
            dd = jnp.einsum("icto,jdso->ictjds", delta, delta, precision=hi)
            parts.append(jnp.einsum("ictjds,itjs->icjd", dd, ka, precision=hi).reshape(m, m))
    for rows in fb_rows:
        blk = rows.reshape(m, -1).astype(dtype)
        parts.append(jnp.dot(blk, blk.T, precision=hi))
    if not parts:
        return jnp.zeros((m, m), dtype)
    return sum(parts[1:], parts[0])
