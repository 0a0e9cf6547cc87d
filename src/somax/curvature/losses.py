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

__all__ = [
    "OutputCurvature",
    "RowFactor",
    "OutputLoss",
    "MSELoss",
    "SoftmaxCELoss",
    "OUTPUT_LOSSES",
    "get_output_loss",
]


@dataclass(frozen=True)
class OutputCurvature:
    """Loss value and output-space derivatives at one point ``z`` (step-local)."""

    value: jax.Array
    grad: jax.Array
    hvp: Callable[[jax.Array], jax.Array]


@dataclass(frozen=True)
class RowFactor:
    """Square-root factor of the output Hessian at ``z``, for row-space solves (paper eq. 2.8).

    With ``n`` the loss normaliser (``b`` for MSE, the number of positions ``N`` for CE),

    * ``H_z = Rᵀ R / n`` (block-diagonal over examples/positions), and
    * ``residual`` is a row vector ``r`` with ``Rᵀ r = n ∇_z L``,

    so that for ``Ĵ = R J`` the GGN is ``G = Ĵᵀ Ĵ / n``, the gradient is ``g = Ĵᵀ r / n`` and
    ``(G + λI)⁻¹ g = Ĵᵀ (Ĵ Ĵᵀ + μ I)⁻¹ r`` with ``μ = n λ``.

    Attributes:
      n: the normaliser ``n`` (a Python int; ``μ = n λ``).
      residual: ``r``, shaped like the rows (``row_shape``).
      row_shape: shape of a row-space vector; its leading axis is the batch axis.
      apply: ``u ↦ R u``, output-shaped (``z.shape``) to row-shaped; linear, vmappable.
      apply_t: ``r ↦ Rᵀ r``, row-shaped to output-shaped; linear, vmappable.
    """

    n: int
    residual: jax.Array
    row_shape: tuple[int, ...]
    apply: Callable[[jax.Array], jax.Array]
    apply_t: Callable[[jax.Array], jax.Array]


class OutputLoss:
    """Interface: ``value(z, y)``, ``prepare(z, y) -> OutputCurvature`` and, for the
    row-space lane, ``row_factor(z, y) -> RowFactor``."""

    name: str = "loss"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        return y

    def value(self, z: jax.Array, y: jax.Array) -> jax.Array:
        raise NotImplementedError

    def prepare(self, z: jax.Array, y: jax.Array) -> OutputCurvature:
        raise NotImplementedError

    def row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """Square-root factor of ``H_z`` for the row-space lane; losses without one raise."""
        raise NotImplementedError(
            f"output loss {self.name!r} ({type(self).__name__}) defines no row_factor(z, y), so it has no "
            f"row-space form; implement row_factor or use a parameter-space solver such as 'cg'"
        )


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

    def row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """``R = I`` and ``r = z − y``: ``H_z = I/b = RᵀR/b`` and ``Rᵀr = b ∇_z L``; rows are ``z``'s entries."""
        y = self.check(z, y)
        identity = lambda u: u  # noqa: E731
        return RowFactor(n=_num_examples(z), residual=z - y, row_shape=tuple(z.shape), apply=identity, apply_t=identity)


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

    def row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """Exact rank-``(C−1)`` square root of the softmax Hessian, closed form (no eigh/Cholesky).

        Per position, with ``q = √p`` (``‖q‖ = 1``) and label mass ``m = Σ_c y_c``,
        ``m(diag(p) − ppᵀ) = m·diag(q) P diag(q)`` where ``P = I − qqᵀ``. The Householder
        reflector ``Q = I − w wᵀ/(1 + q_C)``, ``w = q + e_C``, maps ``q`` to ``−e_C``, so its
        first ``C−1`` rows ``E Q`` are an orthonormal basis of ``q⊥`` and ``(EQ)ᵀ(EQ) = P``.
        Hence ``R = √m · E Q diag(q)`` (``(C−1)×C``) satisfies ``RᵀR = m(diag(p) − ppᵀ)``.
        (``w`` is never small: ``‖w‖² = 2(1 + q_C) ≥ 2``.)

        Residual: ``t = (m p − y)/q = m q − y/q`` is orthogonal to ``q`` (``qᵀt = m − Σy = 0``),
        so ``r = E Q t / √m`` gives ``Rᵀr = diag(q) P t = m p − y = N ∇_z L`` exactly.
        ``1/q = exp(−log p / 2)`` is computed from the log-softmax; in float32 it is finite
        for ``log p > −176`` (a true-class probability below ~1e-76 cannot occur in float32
        softmax anyway). Positions with zero label mass get ``R = 0`` and ``r = 0``.
        Rows have shape ``z.shape[:-1] + (C−1,)``.
        """
        y = self.check(z, y)
        c = z.shape[-1]
        if c < 2:
            raise ValueError(f"ce: the row-space factor needs at least 2 classes, got logits of shape {z.shape}")
        n = z.size // c
        logp = jax.lax.stop_gradient(jax.nn.log_softmax(z, axis=-1))
        q = jnp.exp(0.5 * logp)
        mass = jnp.sum(y, axis=-1, keepdims=True)
        root_m = jnp.sqrt(jnp.maximum(mass, 0.0))
        w = q.at[..., -1].add(1.0)
        denom = 1.0 + q[..., -1:]

        def reflect(x: jax.Array) -> jax.Array:  # Q x, Q = I − w wᵀ/(1 + q_C)
            return x - w * jnp.sum(w * x, axis=-1, keepdims=True) / denom

        def apply(u: jax.Array) -> jax.Array:  # R u
            return (root_m * reflect(q * u))[..., :-1]

        def apply_t(r: jax.Array) -> jax.Array:  # Rᵀ r
            padded = jnp.concatenate([r, jnp.zeros(r.shape[:-1] + (1,), r.dtype)], axis=-1)
            return q * reflect(root_m * padded)

        t = mass * q - y * jnp.exp(-0.5 * logp)
        safe = jnp.where(root_m > 0, root_m, 1.0)
        residual = jnp.where(root_m > 0, reflect(t) / safe, 0.0)[..., :-1]
        return RowFactor(n=n, residual=residual, row_shape=tuple(z.shape[:-1]) + (c - 1,), apply=apply, apply_t=apply_t)


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
