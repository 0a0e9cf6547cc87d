"""Damping policies for ``λ_t`` in (2.4).

* ``constant``: ``λ_t = λ_0``.
* ``trust_region``: Levenberg–Marquardt control on the gain ratio

      rho_t = (L(w_t) − L(w_t + u_t)) / −(g_tᵀu_t + ½ u_tᵀ H_t u_t),

  computed from the update ``u_t`` actually applied by the Optax chain. On its own
  cadence (steps 0, k, 2k, …): ``λ ← λ·increase`` if rho < lower, ``λ ← λ·decrease``
  if rho > upper, clipped to ``[lam_min, lam_max]``; rho is clipped above at
  ``rho_clip``. With ``reject_below`` set, a step whose rho falls below it is
  rejected: parameters and Optax state stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from somax.registry import DAMPINGS
from somax.specs import OFF, check_cadence

__all__ = ["DampingState", "ConstantDamping", "TrustRegion", "constant", "trust_region"]


class DampingState(NamedTuple):
    lam: jax.Array


@dataclass(frozen=True)
class ConstantDamping:
    """``λ_t = λ_0`` for every step."""

    needs_rho = False
    every_k = OFF

    def init(self, lam0: float, dtype) -> DampingState:
        return DampingState(jnp.asarray(lam0, dtype))

    def update(self, state: DampingState, rho: jax.Array) -> tuple[DampingState, jax.Array]:
        return state, jnp.asarray(True)


@dataclass(frozen=True)
class TrustRegion:
    """Levenberg–Marquardt trust region on the gain ratio (see module docstring)."""

    every_k: int = 1
    lower: float = 0.25
    upper: float = 0.75
    decrease: float = 0.5
    increase: float = 1.5
    lam_min: float = 1e-12
    lam_max: float = 1e6
    rho_clip: float = 5.0
    reject_below: float | None = 0.0

    needs_rho = True

    def __post_init__(self) -> None:
        check_cadence("DampingSpec('trust_region').every_k", self.every_k)
        if self.every_k == OFF:
            raise ValueError("DampingSpec('trust_region'): every_k must be >= 1 (use 'constant' damping for no updates)")
        if not self.lower < self.upper:
            raise ValueError(f"DampingSpec('trust_region'): need lower < upper, got ({self.lower}, {self.upper})")
        if not (0 < self.decrease <= 1 <= self.increase):
            raise ValueError(
                f"DampingSpec('trust_region'): need 0 < decrease <= 1 <= increase, got ({self.decrease}, {self.increase})"
            )
        if not 0 <= self.lam_min <= self.lam_max:
            raise ValueError(f"DampingSpec('trust_region'): need 0 <= lam_min <= lam_max, got ({self.lam_min}, {self.lam_max})")

    def init(self, lam0: float, dtype) -> DampingState:
        return DampingState(jnp.asarray(lam0, dtype))

    def update(self, state: DampingState, rho: jax.Array) -> tuple[DampingState, jax.Array]:
        r = jnp.minimum(rho, self.rho_clip)
        factor = jnp.where(r < self.lower, self.increase, jnp.where(r > self.upper, self.decrease, 1.0))
        lam = jnp.clip(state.lam * factor.astype(state.lam.dtype), self.lam_min, self.lam_max)
        accept = jnp.asarray(True) if self.reject_below is None else r >= self.reject_below
        return DampingState(lam.astype(state.lam.dtype)), accept


def constant() -> ConstantDamping:
    """Factory for :class:`ConstantDamping` (``"constant"``)."""
    return ConstantDamping()


def trust_region(
    *,
    every_k: int = 1,
    lower: float = 0.25,
    upper: float = 0.75,
    decrease: float = 0.5,
    increase: float = 1.5,
    lam_min: float = 1e-12,
    lam_max: float = 1e6,
    rho_clip: float = 5.0,
    reject_below: float | None = 0.0,
) -> TrustRegion:
    """Factory for :class:`TrustRegion` (``"trust_region"``)."""
    return TrustRegion(every_k, lower, upper, decrease, increase, lam_min, lam_max, rho_clip, reject_below)


DAMPINGS.register("constant", constant)
DAMPINGS.register("trust_region", trust_region)
