"""The output-loss interface: per-position pieces, weights and the ``1/n`` normalisation.

See :mod:`somax.curvature.losses` for the convention and the built-in losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = ["OutputCurvature", "Pointwise", "RowFactor", "OutputLoss"]


@dataclass(frozen=True)
class OutputCurvature:
    """Loss value and output-space derivatives at one point ``z`` (step-local, normalised)."""

    value: jax.Array
    grad: jax.Array
    hvp: Callable[[jax.Array], jax.Array]


@dataclass(frozen=True)
class Pointwise:
    """Unnormalised per-position pieces: ``loss`` (positions-shaped), ``grad`` and ``hvp`` (z-shaped)."""

    loss: jax.Array
    grad: jax.Array
    hvp: Callable[[jax.Array], jax.Array]


@dataclass(frozen=True)
class RowFactor:
    """Square-root factor of the output Hessian at ``z``, for row-space solves (paper eq. 2.8).

    With ``n`` the loss normaliser (``Σw``, or the number of positions),

    * ``H_z = Rᵀ R / n`` (block-diagonal over positions), and
    * ``residual`` is a row vector ``r`` with ``Rᵀ r = n ∇_z L``,

    so that for ``Ĵ = R J`` the GGN is ``G = Ĵᵀ Ĵ / n``, the gradient is ``g = Ĵᵀ r / n`` and
    ``(G + λI)⁻¹ g = Ĵᵀ (Ĵ Ĵᵀ + μ I)⁻¹ r`` with ``μ = n λ``.

    Attributes:
      n: the normaliser ``n`` (a Python int without weights, else a traced scalar; ``μ = n λ``).
      residual: ``r``, shaped like the rows (``row_shape``).
      row_shape: shape of a row-space vector; its leading axis is the batch axis.
      apply: ``u ↦ R u``, output-shaped (``z.shape``) to row-shaped; linear, vmappable.
      apply_t: ``r ↦ Rᵀ r``, row-shaped to output-shaped; linear, vmappable.
    """

    n: int | jax.Array
    residual: jax.Array
    row_shape: tuple[int, ...]
    apply: Callable[[jax.Array], jax.Array]
    apply_t: Callable[[jax.Array], jax.Array]


def _expand(w: jax.Array, like: jax.Array) -> jax.Array:
    return w.reshape(w.shape + (1,) * (like.ndim - w.ndim))


class OutputLoss:
    """Interface. Subclasses define :meth:`positions`, :meth:`check`, :meth:`pointwise` and,
    for the row-space lane, :meth:`unit_row_factor`; normalisation and weights live here."""

    name: str = "loss"

    def positions(self, z: jax.Array) -> tuple[int, ...]:
        """Shape of the loss positions (default: the batch axis)."""
        if z.ndim == 0:
            raise ValueError(f"{self.name}: model output must have a leading batch axis, got a scalar")
        return z.shape[:1]

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.asarray(y)

    def valid(self, z: jax.Array, y: jax.Array) -> jax.Array | None:
        """Whether the target *values* are admissible (a traced bool), or ``None`` if any value is.

        Shapes and dtypes are checked at trace time by :meth:`check`; values can only be checked
        inside the step, which rejects a step on an inadmissible batch (``info["batch_valid"]``).
        """
        return None

    def pointwise(self, z: jax.Array, y: jax.Array) -> Pointwise:
        raise NotImplementedError

    def unit_row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """Per-position ``R`` with ``H_p = RᵀR`` and ``Rᵀr = ∇ℓ_p`` (``n = 1``, no weights)."""
        raise NotImplementedError(
            f"output loss {self.name!r} ({type(self).__name__}) defines no row_factor(z, y), so it has no "
            f"row-space form; implement unit_row_factor or use a parameter-space solver such as 'cg'"
        )

    def _weights(self, z: jax.Array, w: jax.Array | None) -> tuple[jax.Array | None, int | jax.Array]:
        pos = self.positions(z)
        if w is None:
            count = 1
            for d in pos:
                count *= d
            return None, count
        w = jnp.asarray(w)
        if w.shape != pos:
            raise ValueError(f"{self.name}: weights of shape {w.shape} must have the positions' shape {pos}")
        w = w.astype(z.dtype)
        return w, jnp.sum(w)

    def value(self, z: jax.Array, y: jax.Array, w: jax.Array | None = None) -> jax.Array:
        return self.prepare(z, y, w).value

    def prepare(self, z: jax.Array, y: jax.Array, w: jax.Array | None = None) -> OutputCurvature:
        y = self.check(z, y)
        w, n = self._weights(z, w)
        pw = self.pointwise(z, y)
        if w is None:
            return OutputCurvature(jnp.sum(pw.loss) / n, pw.grad / n, lambda v: pw.hvp(v) / n)
        we = _expand(w, z)
        return OutputCurvature(jnp.sum(w * pw.loss) / n, we * pw.grad / n, lambda v: we * pw.hvp(v) / n)

    def row_factor(self, z: jax.Array, y: jax.Array, w: jax.Array | None = None) -> RowFactor:
        y = self.check(z, y)
        w, n = self._weights(z, w)
        f = self.unit_row_factor(z, y)
        if w is None:
            return RowFactor(n, f.residual, f.row_shape, f.apply, f.apply_t)
        root = _expand(jnp.sqrt(jnp.maximum(w, 0.0)), f.residual)
        return RowFactor(
            n,
            root * f.residual,
            f.row_shape,
            lambda u: root * f.apply(u),
            lambda r: f.apply_t(root * r),
        )
