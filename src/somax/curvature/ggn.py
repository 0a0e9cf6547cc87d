"""Generalized Gauss-Newton curvature (paper eq. 2.6), matrix-free.

``H_GGN v = Jᵀ H_z J v`` with ``J`` from one ``jax.linearize`` of the model and
``H_z`` the closed-form output-space Hessian of the loss. The gradient is
``g = Jᵀ ∇_z L`` from the same linearization, so one forward pass serves the loss,
the gradient, every CG matvec and the predicted decrease.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from somax._tree import tree_vdot
from somax.curvature.base import Linearization, get_batch_entry
from somax.curvature.losses import MSELoss, OutputLoss, SoftmaxCELoss, get_output_loss
from somax.registry import CURVATURES

__all__ = ["GGNCurvature", "ggn", "ggn_mse", "ggn_ce"]


@dataclass(frozen=True)
class GGNCurvature:
    """GGN of ``L(f(w, x), y)`` for an output-space loss ``L``."""

    predict_fn: Callable[[Any, Any], jax.Array]
    loss: OutputLoss
    x_key: str = "x"
    y_key: str = "y"
    name: str = "ggn"

    has_rows: bool = True
    needs_model_outputs: bool = True

    def __post_init__(self) -> None:
        if not callable(self.predict_fn):
            raise TypeError(f"CurvatureSpec({self.name!r}): predict_fn must be callable, got {self.predict_fn!r}")

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        x = get_batch_entry(batch, self.x_key, kind=self.name, role="inputs")
        y = get_batch_entry(batch, self.y_key, kind=self.name, role="targets")
        return x, y

    def linearize(self, params: Any, batch: Any) -> Linearization:
        x, y = self.split_batch(batch)
        z, jvp = jax.linearize(lambda p: self.predict_fn(p, x), params)
        transpose = jax.linear_transpose(jvp, params)

        def vjp(u: jax.Array) -> Any:
            return transpose(u)[0]

        out = self.loss.prepare(z, y)

        def matvec(v: Any) -> Any:
            return vjp(out.hvp(jvp(v)))

        def quad(v: Any) -> jax.Array:
            jv = jvp(v)
            return tree_vdot(jv, out.hvp(jv))

        def loss_at(p: Any) -> jax.Array:
            return self.loss.value(self.predict_fn(p, x), y)

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
            # For per-example row primitives (somax.curvature.rows): the linearization point,
            # the inputs and the model; nothing is computed unless a row solver asks for it.
            extras={"params": params, "inputs": x, "predict_fn": self.predict_fn},
        )


def ggn(*, predict_fn: Callable, loss: str | OutputLoss = "mse", x_key: str = "x", y_key: str = "y") -> GGNCurvature:
    """GGN for any output-space loss object (or ``"mse"`` / ``"ce"``)."""
    return GGNCurvature(predict_fn, get_output_loss(loss), x_key, y_key, name="ggn")


def ggn_mse(*, predict_fn: Callable, x_key: str = "x", y_key: str = "y") -> GGNCurvature:
    """GGN for mean squared error ``1/(2b) Σ‖f(x_i) − y_i‖²`` (``H_z = I/b``)."""
    return GGNCurvature(predict_fn, MSELoss(), x_key, y_key, name="ggn_mse")


def ggn_ce(*, predict_fn: Callable, x_key: str = "x", y_key: str = "y") -> GGNCurvature:
    """GGN for softmax cross-entropy, integer or one-hot labels, logits ``(B, C)`` or ``(B, T, C)``."""
    return GGNCurvature(predict_fn, SoftmaxCELoss(), x_key, y_key, name="ggn_ce")


CURVATURES.register("ggn", ggn)
CURVATURES.register("ggn_mse", ggn_mse)
CURVATURES.register("ggn_ce", ggn_ce)
