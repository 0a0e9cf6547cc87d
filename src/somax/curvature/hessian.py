"""Exact Hessian curvature, matrix-free (paper §2.3).

Forward-over-reverse: ``jax.linearize`` of ``w ↦ (∇L(w), L(w))`` gives the
gradient, the loss and the Hessian-vector product ``v ↦ ∇²L(w) v`` [Pearlmutter 1994]
from a single trace of the loss. The Hessian may be indefinite; damping and the
solver's negative-curvature exit make the direction well defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from somax._tree import tree_vdot
from somax.curvature.base import Linearization, get_batch_entry
from somax.curvature.losses import OutputLoss, get_output_loss
from somax.registry import CURVATURES

__all__ = ["HessianCurvature", "hessian"]


@dataclass(frozen=True)
class HessianCurvature:
    """Exact Hessian of ``loss_fn(params, batch)``."""

    loss_fn: Callable[[Any, Any], jax.Array]
    name: str = "hessian"
    has_rows: bool = False
    needs_model_outputs: bool = False

    def linearize(self, params: Any, batch: Any) -> Linearization:
        def grad_and_loss(p: Any) -> tuple[Any, jax.Array]:
            value, g = jax.value_and_grad(self.loss_fn)(p, batch)
            return g, value

        g, hvp, value = jax.linearize(grad_and_loss, params, has_aux=True)
        return Linearization(
            loss=value,
            grad=g,
            matvec=hvp,
            quad=lambda v: tree_vdot(v, hvp(v)),
            loss_at=lambda p: self.loss_fn(p, batch),
        )


def hessian(
    *,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    predict_fn: Callable[[Any, Any], jax.Array] | None = None,
    loss: str | OutputLoss | None = None,
    x_key: str = "x",
    y_key: str = "y",
) -> HessianCurvature:
    """Exact Hessian of ``loss_fn(params, batch)``, or of ``loss(predict_fn(params, x), y)``."""
    if loss_fn is not None:
        if predict_fn is not None or loss is not None:
            raise TypeError("CurvatureSpec('hessian'): pass either loss_fn, or predict_fn with loss — not both")
        if not callable(loss_fn):
            raise TypeError(f"CurvatureSpec('hessian'): loss_fn must be callable, got {loss_fn!r}")
        return HessianCurvature(loss_fn)
    if predict_fn is None or loss is None:
        raise TypeError(
            "CurvatureSpec('hessian') needs loss_fn(params, batch), or predict_fn(params, x) together with "
            "loss ('mse' or 'ce')"
        )
    out_loss = get_output_loss(loss)

    def composed(params: Any, batch: Any) -> jax.Array:
        x = get_batch_entry(batch, x_key, kind="hessian", role="inputs")
        y = get_batch_entry(batch, y_key, kind="hessian", role="targets")
        return out_loss.value(predict_fn(params, x), y)

    return HessianCurvature(composed)


CURVATURES.register("hessian", hessian)
