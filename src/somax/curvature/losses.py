"""Output-space losses ``L(z, y)`` with their gradient and Hessian-vector product in ``z``.

A GGN curvature (2.6) needs, besides the model's Jacobian ``J``, the output-space
Hessian ``H_z``. Each loss here returns the batch-mean loss and closed forms for
``∇_z L`` and ``∇²_z L · v`` that share exactly the same normalisation, so the
reported loss, the gradient ``g = Jᵀ∇_z L`` and the GGN ``Jᵀ H_z J`` agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = ["OutputCurvature", "OutputLoss", "MSELoss", "SoftmaxCELoss", "OUTPUT_LOSSES", "get_output_loss"]


@dataclass(frozen=True)
class OutputCurvature:
    """Loss value and output-space derivatives at one point ``z`` (step-local)."""

    value: jax.Array
    grad: jax.Array
    hvp: Callable[[jax.Array], jax.Array]


class OutputLoss:
    """Interface: ``value(z, y)`` and ``prepare(z, y) -> OutputCurvature``."""

    name: str = "loss"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        return y

    def value(self, z: jax.Array, y: jax.Array) -> jax.Array:
        raise NotImplementedError

    def prepare(self, z: jax.Array, y: jax.Array) -> OutputCurvature:
        raise NotImplementedError


def _num_examples(z: jax.Array) -> int:
    if z.ndim == 0:
        raise ValueError("model output must have a leading batch axis, got a scalar")
    return z.shape[0]


@dataclass(frozen=True)
class MSELoss(OutputLoss):
    """Mean squared error ``L(z, y) = 1/(2b) Σ_i ‖z_i − y_i‖²``, so ``H_z = I / b``.

    ``b`` is the batch size (leading axis); output dimensions are summed, never
    averaged, so vector outputs keep the same normalisation for loss, gradient and GGN.
    """

    name: str = "mse"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = jnp.asarray(y)
        if y.shape != z.shape:
            if y.size == z.size and y.ndim >= 1 and z.ndim >= 1 and y.shape[0] == z.shape[0]:
                y = y.reshape(z.shape)
            else:
                raise ValueError(
                    f"mse: targets y of shape {y.shape} do not match model outputs of shape {z.shape}"
                )
        return y.astype(z.dtype)

    def value(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = self.check(z, y)
        return 0.5 * jnp.sum(jnp.square(z - y)) / _num_examples(z)

    def prepare(self, z: jax.Array, y: jax.Array) -> OutputCurvature:
        y = self.check(z, y)
        b = _num_examples(z)
        resid = z - y
        return OutputCurvature(
            value=0.5 * jnp.sum(jnp.square(resid)) / b,
            grad=resid / b,
            hvp=lambda v: v / b,
        )


@dataclass(frozen=True)
class SoftmaxCELoss(OutputLoss):
    """Softmax cross-entropy ``L = −1/N Σ_n Σ_c y_nc log softmax(z_n)_c``.

    Logits ``z`` are ``(B, C)`` or ``(B, T, C)``; ``N`` counts all positions
    (``B`` or ``B·T``). Labels are integers of shape ``z.shape[:-1]`` or one-hot
    (probability) vectors of shape ``z.shape``. ``H_z = (diag(p) − ppᵀ)/N`` per position.
    """

    name: str = "ce"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = jnp.asarray(y)
        if z.ndim < 2:
            raise ValueError(f"ce: logits must have shape (B, C) or (B, T, C), got {z.shape}")
        if jnp.issubdtype(y.dtype, jnp.integer):
            if y.shape != z.shape[:-1]:
                raise ValueError(
                    f"ce: integer labels y of shape {y.shape} must have shape {z.shape[:-1]} for logits {z.shape}"
                )
            return jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
        if y.shape != z.shape:
            raise ValueError(
                f"ce: one-hot labels y of shape {y.shape} must match logits {z.shape} "
                f"(or pass integer labels of shape {z.shape[:-1]})"
            )
        return y.astype(z.dtype)

    def value(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = self.check(z, y)
        n = z.size // z.shape[-1]
        return -jnp.sum(y * jax.nn.log_softmax(z, axis=-1)) / n

    def prepare(self, z: jax.Array, y: jax.Array) -> OutputCurvature:
        y = self.check(z, y)
        n = z.size // z.shape[-1]
        logp = jax.nn.log_softmax(z, axis=-1)
        p = jnp.exp(logp)
        mass = jnp.sum(y, axis=-1, keepdims=True)

        def hvp(v: jax.Array) -> jax.Array:
            pv = p * v
            return (pv - p * jnp.sum(pv, axis=-1, keepdims=True)) * mass / n

        return OutputCurvature(value=-jnp.sum(y * logp) / n, grad=(p * mass - y) / n, hvp=hvp)


OUTPUT_LOSSES: dict[str, OutputLoss] = {"mse": MSELoss(), "ce": SoftmaxCELoss()}


def get_output_loss(loss: str | OutputLoss) -> OutputLoss:
    if isinstance(loss, OutputLoss):
        return loss
    if loss not in OUTPUT_LOSSES:
        import difflib

        close = difflib.get_close_matches(str(loss), list(OUTPUT_LOSSES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown loss {loss!r}.{hint} Known: {', '.join(OUTPUT_LOSSES)}.")
    return OUTPUT_LOSSES[loss]
