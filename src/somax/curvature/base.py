"""The step-local curvature snapshot shared by every module of one step (paper Table 6).

A curvature component's ``linearize(params, batch)`` is called exactly once per
step. It returns a :class:`Linearization` whose closures reuse that single
``jax.linearize``: loss, gradient, the matrix-free product ``v ↦ H v``, the
quadratic form ``vᵀ H v`` for the predicted decrease, and (for GGN kinds) the
model's JVP/VJP for row-space solves and estimators. Only ``loss_at`` evaluates
the model again, and only post-update probes call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from somax._tree import tree_vdot
from somax.plan import gated

PyTree = Any

__all__ = ["Linearization", "apply_to_probes", "gated_products"]


@dataclass(frozen=True)
class Linearization:
    """Curvature snapshot at ``w_t`` for one batch.

    Attributes:
      loss: mini-batch loss ``L_B(w_t)`` (2.2).
      grad: ``g_t = ∇L_B(w_t)``.
      matvec: ``v ↦ H_t v`` (undamped).
      quad: ``v ↦ vᵀ H_t v``.
      loss_at: ``w ↦ L_B(w)`` on the same batch (a new forward pass).
      outputs: model outputs ``z`` (GGN kinds), else ``None``.
      jvp: ``v ↦ J v`` (GGN kinds), else ``None``.
      vjp: ``u ↦ Jᵀ u`` (GGN kinds), else ``None``.
      output_hvp: ``u ↦ H_z u`` at ``z`` (GGN kinds), else ``None``.
      output_loss: the :class:`~somax.curvature.losses.OutputLoss` (GGN kinds), else ``None``.
      targets: the batch targets ``y`` as given in the batch (GGN kinds), else ``None``.
      weights: per-example weights/mask from the batch, or ``None``.
      model_state: the model state returned by this forward pass (e.g. new BatchNorm statistics).
      aux: auxiliary model outputs of this forward pass, or ``None``.
      valid: a traced bool, False when the batch's target values are inadmissible for the loss
        (e.g. integer labels outside ``[0, C)``); ``None`` when nothing can be wrong.
      extras: kind-specific step-local values (for user components).
    """

    loss: jax.Array
    grad: PyTree
    matvec: Callable[[PyTree], PyTree]
    quad: Callable[[PyTree], jax.Array]
    loss_at: Callable[[PyTree], jax.Array]
    outputs: jax.Array | None = None
    jvp: Callable[[PyTree], jax.Array] | None = None
    vjp: Callable[[jax.Array], PyTree] | None = None
    output_hvp: Callable[[jax.Array], jax.Array] | None = None
    output_loss: Any = None
    targets: Any = None
    weights: Any = None
    model_state: Any = None
    aux: Any = None
    valid: jax.Array | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def quad_from_matvec(self, v: PyTree) -> jax.Array:
        return tree_vdot(v, self.matvec(v))


def apply_to_probes(fn: Callable[[PyTree], PyTree], probes: PyTree, n: int | None) -> PyTree:
    """``fn`` on each probe: ``fn(probes)`` for one probe (``n`` is ``None``), else ``vmap(fn)`` over the
    leading axis of ``n`` stacked probes (one batched pass)."""
    return fn(probes) if n is None else jax.vmap(fn)(probes)


def gated_products(matvec: Callable[[PyTree], PyTree], probes: PyTree, n: int | None, fire: bool | jax.Array) -> PyTree:
    """``H z`` for the probes (:func:`apply_to_probes`) where ``fire`` holds, zeros where it does not
    (a ``lax.cond`` for a traced ``fire``, so a step that does not fire makes no product)."""
    return gated(fire, lambda: apply_to_probes(matvec, probes, n),
                 lambda: jax.tree_util.tree_map(jnp.zeros_like, probes))  # fmt: skip
