"""Damping policies for ``λ_t`` in (2.4).

A policy updates λ on its own cadence (steps 0, k, 2k, …) from the step's signals
(``rho``, ``update_norm``, ``rel_update``) and may reject the step.

* ``constant``: ``λ_t = λ_0``.
* ``trust_region``: Levenberg–Marquardt control on the gain ratio

      rho_t = (L(w_t) − L(w_t + u_t)) / −(g_tᵀu_t + ½ u_tᵀ H_t u_t),

  computed from the update ``u_t`` actually applied by the Optax chain:
  ``λ ← λ·increase`` if rho < lower, ``λ ← λ·decrease`` if rho > upper, clipped to
  ``[lam_min, lam_max]``; rho is clipped above at ``rho_clip``. With
  ``reject_below`` set (default 0), a step whose rho falls below it is rejected:
  parameters and Optax state stay as they were.
* ``step_norm``: keeps the update norm ``‖u_t‖`` (or ``‖u_t‖/‖w_t‖`` with
  ``relative=True``) in the band ``[low, high]``: ``λ ← λ·increase`` above it,
  ``λ ← λ·decrease`` below it. Needs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from somax.registry import DAMPINGS
from somax.specs import OFF, check_cadence

__all__ = [
    "DampingState",
    "ConstantDamping",
    "TrustRegion",
    "StepNormDamping",
    "constant",
    "trust_region",
    "step_norm",
    "KEEP",
    "INCREASED",
    "DECREASED",
]

#: ``tr_action`` codes in StepInfo (``-1``: no damping update this step).
KEEP, INCREASED, DECREASED = 0, 1, 2


class DampingState(NamedTuple):
    lam: jax.Array


def _scale_lam(state: DampingState, up: jax.Array, down: jax.Array, increase: float, decrease: float,
               lo: float, hi: float) -> tuple[DampingState, jax.Array]:  # fmt: skip
    factor = jnp.where(up, increase, jnp.where(down, decrease, 1.0)).astype(state.lam.dtype)
    lam = jnp.clip(state.lam * factor, lo, hi).astype(state.lam.dtype)
    action = jnp.where(up, INCREASED, jnp.where(down, DECREASED, KEEP)).astype(jnp.int32)
    return DampingState(lam), action


def _check_factors(where: str, decrease: float, increase: float, lam_min: float, lam_max: float) -> None:
    if not (0 < decrease <= 1 <= increase):
        raise ValueError(f"{where}: need 0 < decrease <= 1 <= increase, got ({decrease}, {increase})")
    if not 0 <= lam_min <= lam_max:
        raise ValueError(f"{where}: need 0 <= lam_min <= lam_max, got ({lam_min}, {lam_max})")


@dataclass(frozen=True)
class ConstantDamping:
    """``λ_t = λ_0`` for every step."""

    needs_rho = False
    can_reject = False
    every_k = OFF

    def init(self, lam0: float, dtype) -> DampingState:
        return DampingState(jnp.asarray(lam0, dtype))

    def update(self, state: DampingState, signals: Mapping[str, jax.Array]):
        return state, jnp.asarray(True), jnp.asarray(KEEP, jnp.int32)


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

    @property
    def can_reject(self) -> bool:
        return self.reject_below is not None

    def __post_init__(self) -> None:
        where = "DampingSpec('trust_region')"
        check_cadence(f"{where}.every_k", self.every_k)
        if self.every_k == OFF:
            raise ValueError(f"{where}: every_k must be >= 1 (use 'constant' damping for no updates)")
        if not self.lower < self.upper:
            raise ValueError(f"{where}: need lower < upper, got ({self.lower}, {self.upper})")
        _check_factors(where, self.decrease, self.increase, self.lam_min, self.lam_max)

    def init(self, lam0: float, dtype) -> DampingState:
        return DampingState(jnp.asarray(lam0, dtype))

    def update(self, state: DampingState, signals: Mapping[str, jax.Array]):
        r = jnp.minimum(signals["rho"], self.rho_clip)
        new, action = _scale_lam(state, r < self.lower, r > self.upper, self.increase, self.decrease,
                                 self.lam_min, self.lam_max)  # fmt: skip
        accept = jnp.asarray(True) if self.reject_below is None else r >= self.reject_below
        return new, accept, action


@dataclass(frozen=True)
class StepNormDamping:
    """Keep ``‖u_t‖`` (or ``‖u_t‖/‖w_t‖``) inside ``[low, high]`` by scaling λ."""

    low: float = 1e-3
    high: float = 1e-1
    relative: bool = False
    every_k: int = 1
    decrease: float = 0.5
    increase: float = 2.0
    lam_min: float = 1e-12
    lam_max: float = 1e6

    needs_rho = False
    can_reject = False

    @property
    def needs_norms(self) -> bool:
        """``relative=True`` reads ``rel_update``, which needs ``‖w_t‖`` (the "norms" probe)."""
        return self.relative

    def __post_init__(self) -> None:
        where = "DampingSpec('step_norm')"
        check_cadence(f"{where}.every_k", self.every_k)
        if self.every_k == OFF:
            raise ValueError(f"{where}: every_k must be >= 1")
        if not 0 <= self.low < self.high:
            raise ValueError(f"{where}: need 0 <= low < high, got ({self.low}, {self.high})")
        _check_factors(where, self.decrease, self.increase, self.lam_min, self.lam_max)

    def init(self, lam0: float, dtype) -> DampingState:
        return DampingState(jnp.asarray(lam0, dtype))

    def update(self, state: DampingState, signals: Mapping[str, jax.Array]):
        norm = signals["rel_update"] if self.relative else signals["update_norm"]
        new, action = _scale_lam(state, norm > self.high, norm < self.low, self.increase, self.decrease,
                                 self.lam_min, self.lam_max)  # fmt: skip
        return new, jnp.asarray(True), action


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


def step_norm(
    *,
    low: float = 1e-3,
    high: float = 1e-1,
    relative: bool = False,
    every_k: int = 1,
    decrease: float = 0.5,
    increase: float = 2.0,
    lam_min: float = 1e-12,
    lam_max: float = 1e6,
) -> StepNormDamping:
    """Factory for :class:`StepNormDamping` (``"step_norm"``)."""
    return StepNormDamping(low, high, relative, every_k, decrease, increase, lam_min, lam_max)


DAMPINGS.register("constant", constant)
DAMPINGS.register("trust_region", trust_region)
DAMPINGS.register("step_norm", step_norm)
