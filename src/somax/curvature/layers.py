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

The code: :mod:`somax.curvature.layer_map` (the result types), :mod:`somax.curvature.layer_walk`
(the trace and the walk), :mod:`somax.curvature.layer_signals` (``a`` and ``δ``); every public
name is exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from somax.curvature.layer_map import LAYER_KINDS, ConvGeometry, Layer, LayerMap
from somax.curvature.layer_signals import layer_inputs_and_output_grads, row_cotangents
from somax.curvature.layer_walk import PyTree, _discover, _single_example_jaxpr

__all__ = [
    "LAYER_KINDS",
    "ConvGeometry",
    "Layer",
    "LayerMap",
    "discover_layers",
    "layer_inputs_and_output_grads",
    "row_cotangents",
]


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
