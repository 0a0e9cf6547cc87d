"""Exact Hessian curvature, matrix-free (paper §2.3).

Forward-over-reverse [Pearlmutter 1994], in one of two forms (``hvp=``):

* ``"linearize"`` (default): ``jax.linearize`` of ``w ↦ (∇L(w), L(w))`` gives the gradient,
  the loss and ``v ↦ ∇²L(w) v`` from one trace; each product is one tangent pass over
  residuals kept from the gradient's computation. Cheapest per product (a CG loop), but the
  residuals (about the backward pass's intermediates) are held for the whole step.
* ``"jvp"``: the gradient from ``jax.value_and_grad``, and each product a fresh
  ``jax.jvp`` of the gradient function (the forward and backward pass again, with
  tangents): one gradient's work more per product, nothing held between products. For
  one product per step or fewer (a diagonal estimator on a cadence) it needs far less
  memory (the 2-layer transformer of ``real_sizes``: 90 MiB of temporaries against 155 MiB).

The Hessian may be indefinite; damping and the solver's negative-curvature exit make the
direction well defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from somax import validate
from somax._tree import tree_vdot
from somax.contracts import Curvature
from somax.curvature.base import Linearization
from somax.curvature.conv_layout import canonical_convolutions
from somax.curvature.losses import OutputLoss, get_output_loss
from somax.curvature.model import BatchReader, Model, as_model
from somax.registry import CURVATURES

__all__ = ["HessianCurvature", "hessian", "HVP_FORMS"]

#: the ``hvp`` forms of :class:`HessianCurvature` (see the module docstring)
HVP_FORMS = ("linearize", "jvp")

#: ``loss(params, batch, model_state, rng) -> (value, (new_model_state, aux))``
StatefulLoss = Callable[[Any, Any, Any, Any], tuple[jax.Array, tuple[Any, Any]]]


@dataclass(frozen=True)
class HessianCurvature(Curvature):
    """Exact Hessian of a scalar loss of the parameters."""

    loss: StatefulLoss
    uses_rng: bool = False
    has_aux: bool = False
    name: str = "hessian"
    hvp: str = "linearize"

    def __post_init__(self) -> None:
        validate.choice("CurvatureSpec('hessian'): hvp", self.hvp, HVP_FORMS)

    def linearize(
        self, params: Any, batch: Any, model_state: Any = None, rng: jax.Array | None = None
    ) -> Linearization:
        # the gradient's convolutions in the canonical layout too: in a user's scan over steps
        # XLA:CPU would otherwise run the weight gradients in its slow loop emitter
        @canonical_convolutions
        def grad_and_loss(p: Any) -> tuple[Any, tuple[jax.Array, Any, Any]]:
            (value, (new_state, aux)), g = jax.value_and_grad(self.loss, has_aux=True)(p, batch, model_state, rng)
            return g, (value, new_state, aux)

        if self.hvp == "jvp":
            g, (value, new_state, aux) = grad_and_loss(params)

            def hvp(v: Any) -> Any:
                return jax.jvp(lambda p: grad_and_loss(p)[0], (params,), (v,))[1]

        else:
            g, hvp, (value, new_state, aux) = jax.linearize(grad_and_loss, params, has_aux=True)
        hvp = canonical_convolutions(hvp)
        return Linearization(
            loss=value,
            grad=g,
            matvec=hvp,
            quad=lambda v: tree_vdot(v, hvp(v)),
            loss_at=lambda p: self.loss(p, batch, model_state, rng)[0],
            model_state=new_state,
            aux=aux,
        )


def hessian(
    *,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    predict_fn: Callable[[Any, Any], jax.Array] | None = None,
    model: Model | None = None,
    loss: str | OutputLoss | None = None,
    x_key: str | None = None,
    y_key: str | None = None,
    weight_key: str | None = None,
    x_fn: Callable | None = None,
    y_fn: Callable | None = None,
    weight_fn: Callable | None = None,
    hvp: str = "linearize",
) -> HessianCurvature:
    """Exact Hessian of ``loss_fn(params, batch)``, or of ``loss(model(params, x), y)``.

    The batch options (``x_key="x"``, ``y_key="y"``, ``weight_key``, ``x_fn``, ``y_fn``,
    ``weight_fn``) say where the composed form reads inputs, targets and weights; ``loss_fn``
    reads the batch itself, so they are refused with it. ``hvp``: ``"linearize"`` or ``"jvp"``
    (the module docstring: speed per product against memory held).
    """
    where = "CurvatureSpec('hessian')"
    readers = {"x_key": x_key, "y_key": y_key, "weight_key": weight_key, "x_fn": x_fn, "y_fn": y_fn,
               "weight_fn": weight_fn}  # fmt: skip
    if loss_fn is not None:
        if predict_fn is not None or model is not None or loss is not None:
            raise TypeError(f"{where}: pass either loss_fn, or predict_fn/model with loss — not both")
        given = [k for k, v in readers.items() if v is not None]
        if given:
            raise TypeError(f"{where}: loss_fn(params, batch) reads the batch itself, so {', '.join(given)} "
                            "would be ignored; drop them, or use predict_fn/model with loss")  # fmt: skip
        if not callable(loss_fn):
            raise TypeError(f"{where}: loss_fn must be callable, got {loss_fn!r}")
        fn = loss_fn
        return HessianCurvature(lambda p, batch, s, r: (fn(p, batch), (s, None)), hvp=hvp)
    if (predict_fn is None and model is None) or loss is None:
        raise TypeError(
            f"{where} needs loss_fn(params, batch), or predict_fn(params, x) / model= together with "
            "loss ('mse', 'ce', …)"
        )
    out_loss = get_output_loss(loss)
    mdl = as_model(predict_fn=predict_fn, model=model, where=where)
    reader = BatchReader(x_key or "x", y_key or "y", weight_key, x_fn, y_fn, weight_fn, where=where)

    def composed(params: Any, batch: Any, model_state: Any, rng: Any) -> tuple[jax.Array, tuple[Any, Any]]:
        z, new_state, aux = mdl.apply(params, model_state, reader.inputs(batch), rng)
        return out_loss.value(z, reader.targets(batch), reader.weights(batch)), (new_state, aux)

    return HessianCurvature(composed, uses_rng=mdl.uses_rng, has_aux=mdl.has_aux, hvp=hvp)


CURVATURES.register("hessian", hessian)
