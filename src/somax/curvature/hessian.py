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
  An estimator's probe products on a refresh come with the gradient from that one JVP
  (``linearize_with_products``), so a refresh costs one forward-over-reverse pass, not a
  gradient and a product.

The Hessian may be indefinite; damping and the solver's negative-curvature exit make the
direction well defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax import validate
from somax._tree import tree_vdot
from somax.contracts import Curvature
from somax.curvature.base import Linearization
from somax.curvature.conv_layout import canonical_convolutions
from somax.curvature.losses import OutputLoss, get_output_loss
from somax.curvature.model import BatchReader, Model, as_model
from somax.plan import gated
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

    @property
    def fuses_products(self) -> bool:
        """With ``hvp="jvp"`` one JVP of the gradient function gives ``g`` and the products."""
        return self.hvp == "jvp"

    def _grad_and_loss(self, batch: Any, model_state: Any, rng: Any) -> Callable[[Any], tuple[Any, tuple]]:
        """``p ↦ (∇L(p), (L(p), new model state, aux))`` on this batch."""

        # the gradient's convolutions in the canonical layout too: in a user's scan over steps
        # XLA:CPU would otherwise run the weight gradients in its slow loop emitter
        @canonical_convolutions
        def grad_and_loss(p: Any) -> tuple[Any, tuple[jax.Array, Any, Any]]:
            (value, (new_state, aux)), g = jax.value_and_grad(self.loss, has_aux=True)(p, batch, model_state, rng)
            return g, (value, new_state, aux)

        return grad_and_loss

    def linearize(
        self, params: Any, batch: Any, model_state: Any = None, rng: jax.Array | None = None
    ) -> Linearization:
        grad_and_loss = self._grad_and_loss(batch, model_state, rng)
        if self.hvp == "jvp":
            g, rest = grad_and_loss(params)
            return self._linearization(params, batch, model_state, rng, grad_and_loss, g, rest)
        g, hvp, rest = jax.linearize(grad_and_loss, params, has_aux=True)
        return self._linearization(params, batch, model_state, rng, hvp, g, rest)

    def linearize_with_products(
        self,
        params: Any,
        batch: Any,
        model_state: Any,
        rng: Any,
        probes: Any,
        n: int | None,
        fire: bool | jax.Array,
    ) -> tuple[Linearization, Any]:
        """With ``hvp="jvp"``: where ``fire`` holds, one JVP of the gradient function along the probes
        gives ``g`` (its primal output) and ``H z`` (its tangent) — the forward and backward pass run
        once with tangents instead of once without and once with; elsewhere the gradient alone.
        A ``lax.cond`` chooses, so the gradient sits inside the branch (on XLA:CPU a product left
        outside a branch that holds the model's derivatives made every step about a third slower)."""
        if self.hvp != "jvp":
            return super().linearize_with_products(params, batch, model_state, rng, probes, n, fire)
        grad_and_loss = self._grad_and_loss(batch, model_state, rng)

        def with_products() -> tuple[Any, Any, tuple]:
            def one(z: Any) -> tuple[Any, Any, tuple]:
                return jax.jvp(grad_and_loss, (params,), (z,), has_aux=True)

            if n is None:
                return one(probes)
            return jax.vmap(one, out_axes=(None, 0, None))(probes)

        def gradient_only() -> tuple[Any, Any, tuple]:
            g, rest = grad_and_loss(params)
            return g, jax.tree_util.tree_map(jnp.zeros_like, probes), rest

        g, products, rest = gated(fire, with_products, gradient_only)
        return self._linearization(params, batch, model_state, rng, grad_and_loss, g, rest), products

    def _linearization(
        self, params: Any, batch: Any, model_state: Any, rng: Any, product: Callable, g: Any, rest: tuple
    ) -> Linearization:
        """The snapshot from the gradient and ``product``: the linearized HVP (``hvp="linearize"``)
        or, for ``"jvp"``, the gradient function itself, whose JVP each product takes."""
        value, new_state, aux = rest
        if self.hvp == "jvp":

            def hvp(v: Any) -> Any:
                return jax.jvp(lambda p: product(p)[0], (params,), (v,))[1]

        else:
            hvp = product
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
