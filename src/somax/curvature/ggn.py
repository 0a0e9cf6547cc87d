"""Generalized Gauss-Newton curvature (paper eq. 2.6), matrix-free.

``H_GGN v = Jᵀ H_z J v`` with ``J`` from one ``jax.linearize`` of the model and
``H_z`` the closed-form output-space Hessian of the loss. The gradient is
``g = Jᵀ ∇_z L`` from the same linearization, so one forward pass serves the loss,
the gradient, every CG matvec and the predicted decrease.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from somax._tree import tree_vdot
from somax.contracts import Curvature
from somax.curvature.base import Linearization
from somax.curvature.conv_layout import canonical_convolutions
from somax.curvature.losses import OutputLoss, get_output_loss
from somax.curvature.model import BatchReader, Model, as_model
from somax.registry import CURVATURES

__all__ = ["GGNCurvature", "ggn", "ggn_mse", "ggn_ce"]


@dataclass(frozen=True)
class ModelLossCurvature(Curvature):
    """A curvature of ``L(f(w, x), y)``: a :class:`Model` ``f``, an output loss ``L`` and the batch
    reader; the model's declarations (randomness, aux outputs, coupled examples) are the curvature's."""

    model: Model
    loss: OutputLoss
    reader: BatchReader

    @property
    def uses_rng(self) -> bool:  # type: ignore[override]
        return self.model.uses_rng

    @property
    def has_aux(self) -> bool:  # type: ignore[override]
        return self.model.has_aux

    @property
    def couples_examples(self) -> bool:  # type: ignore[override]
        return self.model.couples_examples


@dataclass(frozen=True)
class GGNCurvature(ModelLossCurvature):
    """GGN of ``L(f(w, x), y)`` for an output-space loss ``L`` and a :class:`Model` ``f``."""

    name: str = "ggn"

    has_rows = True
    has_model_outputs = True

    def linearize(
        self, params: Any, batch: Any, model_state: Any = None, rng: jax.Array | None = None
    ) -> Linearization:
        x, y = self.reader.inputs(batch), self.reader.targets(batch)
        w = self.reader.weights(batch)
        apply = self.model.apply
        z, jvp, (new_state, aux) = jax.linearize(
            lambda p: _split_aux(apply(p, model_state, x, rng)), params, has_aux=True
        )
        transpose = jax.linear_transpose(jvp, params)
        jvp = canonical_convolutions(jvp)

        @canonical_convolutions
        def vjp(u: jax.Array) -> Any:
            return transpose(u)[0]

        out = self.loss.prepare(z, y, w)

        def matvec(v: Any) -> Any:
            return vjp(out.hvp(jvp(v)))

        def quad(v: Any) -> jax.Array:
            jv = jvp(v)
            return tree_vdot(jv, out.hvp(jv))

        def loss_at(p: Any) -> jax.Array:
            return self.loss.value(apply(p, model_state, x, rng)[0], y, w)

        return Linearization(
            loss=out.value,
            grad=vjp(out.grad),
            matvec=matvec,
            quad=quad,
            loss_at=loss_at,
            outputs=z,
            jvp=jvp,
            vjp=vjp,
            output_hvp=out.hvp,
            output_loss=self.loss,
            targets=y,
            weights=w,
            model_state=new_state,
            aux=aux,
            valid=self.loss.valid(z, y),
            # For per-example row primitives (somax.curvature.rows): the linearization point,
            # the inputs and the model; nothing is computed unless a row solver asks for it.
            extras={
                "params": params,
                "inputs": x,
                "predict_fn": self.model.predict_fn(model_state, rng),
                "couples_examples": self.model.couples_examples,
            },
        )


def _split_aux(result: tuple[Any, Any, Any]) -> tuple[Any, tuple[Any, Any]]:
    outputs, new_state, aux = result
    return outputs, (new_state, aux)


def ggn(
    *,
    loss: str | OutputLoss,
    predict_fn: Callable | None = None,
    model: Model | None = None,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str | None = None,
    x_fn: Callable | None = None,
    y_fn: Callable | None = None,
    weight_fn: Callable | None = None,
) -> GGNCurvature:
    """GGN for an output-space loss (``"mse"``, ``"ce"``, … or an :class:`OutputLoss`).

    The model is ``predict_fn(params, x)`` or a :class:`~somax.curvature.model.Model`;
    ``x``/``y``/weights are read from the batch by key or function.
    """
    out = get_output_loss(loss)
    where = f"CurvatureSpec({'ggn_' + out.name if out.name in ('mse', 'ce') else 'ggn'!r})"
    reader = BatchReader(x_key, y_key, weight_key, x_fn, y_fn, weight_fn, where=where)
    return GGNCurvature(as_model(predict_fn=predict_fn, model=model, where=where), out, reader, name="ggn_" + out.name)


def _fixed_loss(loss: str, doc: str) -> Callable[..., GGNCurvature]:
    def factory(**kwargs: Any) -> GGNCurvature:
        return ggn(loss=loss, **kwargs)

    sig = inspect.signature(ggn)
    factory.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "loss"])  # type: ignore[attr-defined]
    factory.__name__ = factory.__qualname__ = f"ggn_{loss}"
    factory.__doc__ = doc
    return factory


ggn_mse = _fixed_loss("mse", "GGN for mean squared error ``1/(2b) Σ‖f(x_i) − y_i‖²`` (``H_z = I/b``).")
ggn_ce = _fixed_loss("ce", "GGN for softmax cross-entropy, integer or one-hot labels, logits ``(B, C)``/``(B, T, C)``.")

CURVATURES.register("ggn", ggn)
CURVATURES.register("ggn_mse", ggn_mse)
CURVATURES.register("ggn_ce", ggn_ce)
