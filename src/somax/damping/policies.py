"""Damping policies for ``λ_t`` in (2.4).

A policy updates λ on its own cadence (steps 0, k, 2k, …) from the step's signals
(``rho``, ``update_norm``, ``rel_update``, ``finite``) and may reject the step. Every
adaptive policy raises λ (``λ ← λ·increase``) after a step whose loss, gradient or
update was not finite, whatever its cadence, and keeps that λ (``on_nonfinite =
"keep"``): restoring the old λ would repeat the same failing step for ever.

* ``constant``: ``λ_t = λ_0``.
* ``trust_region``: Levenberg–Marquardt control on the gain ratio

      rho_t = (L(w_t) − L(w_t + u_t)) / −(g_tᵀu_t + ½ u_tᵀ H_t u_t),

  computed from the update ``u_t`` actually applied by the Optax chain:
  ``λ ← λ·increase`` if rho < lower, ``λ ← λ·decrease`` if rho > upper, clipped to
  ``[lam_min, lam_max]``; rho is clipped above at ``rho_clip``. A rho of ``nan``
  (the predicted decrease is below the loss's rounding level, e.g. at a stationary
  point: the step says nothing about the model's quality) keeps λ and the step. With
  ``reject_below`` set (default 0), a step whose rho falls below it is rejected:
  parameters and Optax state stay as they were.

  On mini-batches the same-batch rho stays near 1 while the step grows in directions
  the batch says little about, so three safeguards are on by default: every step, checked
  or not, is bounded by ``‖u_t‖ ≤ max_rel_update · max(‖w_t‖, 1)`` (a check whose step
  hit the bound raises λ); λ never falls below ``lam0_floor · λ_0`` (default λ_0 itself:
  the trust region raises λ when steps fail and lowers it back, not below the damping the
  method started from); and λ is floored at ``curvature_floor · λ̂_max(H_t)``, with
  ``λ̂_max`` tracked by one power-iteration product per check, which protects a λ_0 far
  below the problem's curvature. ``max_rel_update=None, lam0_floor=None,
  curvature_floor=None`` is the textbook policy (measurements: ``docs/telemetry.md``).
* ``step_norm``: keeps the update norm ``‖u_t‖`` (or ``‖u_t‖/‖w_t‖`` with
  ``relative=True``) in the band ``[low, high]``: ``λ ← λ·increase`` above it,
  ``λ ← λ·decrease`` below it. Needs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from somax import validate
from somax._tree import scalar_dtype, tree_norm, tree_scale, tree_size, tree_vdot, tree_where
from somax.contracts import Damping
from somax.estimators.base import rademacher_like
from somax.registry import DAMPINGS

__all__ = [
    "DampingState",
    "TrustRegionState",
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
    """``lam``: the damping ``λ_t`` of (2.4), a scalar in the parameters' dtype."""

    lam: jax.Array


class TrustRegionState(NamedTuple):
    """``lam``: λ; ``top``: the running estimate of ``λ_max(H)``; ``v``: its power-iteration vector;
    ``floor``: ``lam0_floor · λ_0`` (0 without that floor)."""

    lam: jax.Array
    top: jax.Array
    v: Any
    floor: jax.Array


def _scale_lam(state: DampingState, up: jax.Array, down: jax.Array, increase: float, decrease: float,
               lo: float, hi: float) -> tuple[DampingState, jax.Array]:  # fmt: skip
    factor = jnp.where(up, increase, jnp.where(down, decrease, 1.0)).astype(state.lam.dtype)
    lam = jnp.clip(state.lam * factor, lo, hi).astype(state.lam.dtype)
    action = jnp.where(up, INCREASED, jnp.where(down, DECREASED, KEEP)).astype(jnp.int32)
    return DampingState(lam), action


def _check_factors(where: str, decrease: float, increase: float, lam_min: float, lam_max: float) -> None:
    for name, value in (("decrease", decrease), ("increase", increase), ("lam_min", lam_min), ("lam_max", lam_max)):
        validate.number(f"{where}: {name}", value)
    if not (0 < decrease <= 1 <= increase):
        raise ValueError(f"{where}: need 0 < decrease <= 1 <= increase, got ({decrease}, {increase})")
    if not 0 <= lam_min <= lam_max:
        raise ValueError(f"{where}: need 0 <= lam_min <= lam_max, got ({lam_min}, {lam_max})")


@dataclass(frozen=True)
class ConstantDamping(Damping):
    """``λ_t = λ_0`` for every step."""

    def init(self, params: Any, lam0: float) -> DampingState:
        return DampingState(jnp.asarray(lam0, scalar_dtype(params)))

    def update(self, state: DampingState, signals: Mapping[str, jax.Array]):
        return state, jnp.asarray(True), jnp.asarray(KEEP, jnp.int32)


@dataclass(frozen=True, kw_only=True)
class TrustRegion(Damping):
    """Levenberg–Marquardt trust region on the gain ratio, safe on mini-batches (module docstring).

    Args:
      every_k: λ update cadence (steps ``0, k, 2k, …``).
      lower, upper: rho thresholds for raising / lowering λ.
      decrease, increase: λ factors (``λ·decrease`` on rho > upper, ``λ·increase`` otherwise).
      lam_min, lam_max: bounds on λ.
      rho_clip: rho is clipped above at this value.
      reject_below: reject a step whose rho is below this (``None``: never reject).
      max_rel_update: at every step, checked or not, ``‖u‖ ≤ c · max(‖w‖, 1)``; a check whose
        step hit the bound raises λ. ``None`` turns the bound off.
      lam0_floor: ``λ ≥ f · λ_0`` after each update (``λ_0``: the method's ``lam0``). ``None``
        leaves only ``lam_min``.
      curvature_floor: ``λ ≥ f · λ̂_max(H)`` after each update, with ``λ̂_max`` tracked by one
        power-iteration product ``H v`` per check (kept as ``max(vᵀHv, floor_decay · λ̂_prev)``).
        ``None`` turns it off (and saves the product and the parameter-sized ``v``).
      floor_decay: how fast the ``λ̂_max`` estimate may fall between checks.
    """

    every_k: int = 1
    lower: float = 0.25
    upper: float = 0.75
    decrease: float = 0.5
    increase: float = 1.5
    lam_min: float = 1e-12
    lam_max: float = 1e6
    rho_clip: float = 5.0
    reject_below: float | None = 0.0
    max_rel_update: float | None = 0.03
    lam0_floor: float | None = 1.0
    curvature_floor: float | None = 0.15
    floor_decay: float = 0.9

    needs_rho = True
    on_nonfinite = "keep"

    @property
    def can_reject(self) -> bool:  # type: ignore[override]
        return self.reject_below is not None

    def __post_init__(self) -> None:
        where = "DampingSpec('trust_region')"
        validate.cadence(f"{where}.every_k", self.every_k, allow_off=False)
        for name in ("lower", "upper", "rho_clip"):
            validate.number(f"{where}: {name}", getattr(self, name))
        validate.number(f"{where}: reject_below", self.reject_below, allow_none=True)
        positive = {"minimum": 0.0, "exclusive_minimum": True, "allow_none": True}
        validate.number(f"{where}: max_rel_update", self.max_rel_update, **positive)
        validate.number(f"{where}: lam0_floor", self.lam0_floor, **positive)
        validate.number(f"{where}: curvature_floor", self.curvature_floor, **positive)
        validate.number(f"{where}: floor_decay", self.floor_decay, minimum=0.0, maximum=1.0)
        if not self.lower < self.upper:
            raise ValueError(f"{where}: need lower < upper, got ({self.lower}, {self.upper})")
        _check_factors(where, self.decrease, self.increase, self.lam_min, self.lam_max)

    def init(self, params: Any, lam0: float) -> TrustRegionState:
        dtype = scalar_dtype(params)
        v: Any = ()
        if self.curvature_floor is not None:
            probe = rademacher_like(jax.random.PRNGKey(0), params)
            v = tree_scale(1.0 / max(tree_size(params), 1) ** 0.5, probe)
        floor = 0.0 if self.lam0_floor is None else self.lam0_floor * lam0
        return TrustRegionState(jnp.asarray(lam0, dtype), jnp.zeros((), dtype), v, jnp.asarray(floor, dtype))

    def update(self, state: TrustRegionState, signals: Mapping[str, jax.Array]):
        r = jnp.minimum(signals["rho"], self.rho_clip)
        failed = ~signals["finite"] | signals["capped"]  # a capped step means λ was too small for it
        new, action = _scale_lam(DampingState(state.lam), (r < self.lower) | failed, (r > self.upper) & ~failed,
                                 self.increase, self.decrease, self.lam_min, self.lam_max)  # fmt: skip
        lam = jnp.clip(jnp.maximum(new.lam, state.floor), self.lam_min, self.lam_max).astype(new.lam.dtype)
        top, v = state.top, state.v
        if self.curvature_floor is not None:
            hv = signals["lin"].matvec(v)
            rayleigh, hv_norm = tree_vdot(v, hv).astype(top.dtype), tree_norm(hv)
            ok = jnp.isfinite(rayleigh) & jnp.isfinite(hv_norm)  # a non-finite step keeps the estimate
            top = jnp.where(ok, jnp.maximum(rayleigh, self.floor_decay * top), top)
            v = tree_where(ok, tree_scale(1.0 / jnp.maximum(hv_norm, jnp.finfo(top.dtype).tiny), hv), v)
            lam = jnp.clip(jnp.maximum(lam, self.curvature_floor * top), self.lam_min, self.lam_max).astype(lam.dtype)
        accept = jnp.asarray(True) if self.reject_below is None else ~(r < self.reject_below)
        return TrustRegionState(lam, top, v, state.floor), accept, action


@dataclass(frozen=True, kw_only=True)
class StepNormDamping(Damping):
    """Keep ``‖u_t‖`` (or ``‖u_t‖/‖w_t‖``) inside ``[low, high]`` by scaling λ."""

    low: float = 1e-3
    high: float = 1e-1
    relative: bool = False
    every_k: int = 1
    decrease: float = 0.5
    increase: float = 2.0
    lam_min: float = 1e-12
    lam_max: float = 1e6
    max_rel_update: float | None = 0.03

    on_nonfinite = "keep"

    @property
    def needs_norms(self) -> bool:
        """``relative=True`` reads ``rel_update``, which needs ``‖w_t‖`` (the "norms" probe)."""
        return self.relative

    def __post_init__(self) -> None:
        where = "DampingSpec('step_norm')"
        validate.cadence(f"{where}.every_k", self.every_k, allow_off=False)
        validate.number(f"{where}: low", self.low)
        validate.number(f"{where}: high", self.high)
        validate.boolean(f"{where}: relative", self.relative)
        validate.number(f"{where}: max_rel_update", self.max_rel_update, minimum=0.0, exclusive_minimum=True,
                        allow_none=True)  # fmt: skip
        if not 0 <= self.low < self.high:
            raise ValueError(f"{where}: need 0 <= low < high, got ({self.low}, {self.high})")
        _check_factors(where, self.decrease, self.increase, self.lam_min, self.lam_max)

    def init(self, params: Any, lam0: float) -> DampingState:
        return DampingState(jnp.asarray(lam0, scalar_dtype(params)))

    def update(self, state: DampingState, signals: Mapping[str, jax.Array]):
        norm = signals["rel_update"] if self.relative else signals["update_norm"]
        failed = ~signals["finite"] | signals["capped"]
        new, action = _scale_lam(state, (norm > self.high) | failed, (norm < self.low) & ~failed, self.increase,
                                 self.decrease, self.lam_min, self.lam_max)  # fmt: skip
        return new, jnp.asarray(True), action


#: the registered factories (keyword options as the classes' fields)
constant = ConstantDamping
trust_region = TrustRegion
step_norm = StepNormDamping

DAMPINGS.register("constant", ConstantDamping)
DAMPINGS.register("trust_region", TrustRegion)
DAMPINGS.register("step_norm", StepNormDamping)
