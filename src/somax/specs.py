"""Declarative, frozen specifications of a second-order method (paper Appendix B.2, Table 5).

A spec names a component *kind* (resolved through :mod:`somax.registry`) and carries
that component's keyword arguments. Specs hold no arrays and do no work; the
assembler turns them into components and a static :class:`~somax.plan.Plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from somax import validate

__all__ = [
    "CurvatureSpec",
    "EstimatorSpec",
    "SolverSpec",
    "PrecondSpec",
    "DampingSpec",
    "TelemetrySpec",
    "LineSearchSpec",
    "OFF",
]

#: Cadence value meaning "never" (paper §3.4: ``rho_every_k = -1`` disables the probe).
OFF = validate.OFF


def _check_kind(spec: str, kind: Any) -> None:
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{spec}: kind must be a non-empty string, got {kind!r}")


def _check_kwargs(spec: str, kwargs: Any) -> None:
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{spec}: kwargs must be a mapping, got {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{spec}: kwargs keys must be strings, got {bad!r}")


def check_cadence(where: str, every_k: Any) -> int:
    """Validate a cadence: ``-1`` (off) or a positive integer ``k`` (fires at steps 0, k, 2k, …)."""
    return validate.cadence(where, every_k)


@dataclass(frozen=True)
class CurvatureSpec:
    """Curvature operator ``H_t``: ``"hessian"``, ``"ggn_mse"``, ``"ggn_ce"`` or a registered kind.

    ``kwargs`` carry the model: ``predict_fn(params, x)`` for GGN kinds,
    ``loss_fn(params, batch)`` (or ``predict_fn`` plus ``loss``) for the Hessian,
    and ``x_key`` / ``y_key`` naming the batch entries.
    """

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind("CurvatureSpec", self.kind)
        _check_kwargs("CurvatureSpec", self.kwargs)


@dataclass(frozen=True)
class EstimatorSpec:
    """Randomised curvature estimator layered on the step's linearization (e.g. ``"hutchinson"``)."""

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind("EstimatorSpec", self.kind)
        _check_kwargs("EstimatorSpec", self.kwargs)


@dataclass(frozen=True)
class SolverSpec:
    """Solver of the damped system (2.4); its kind fixes the lane (``"cg"`` → parameter space)."""

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind("SolverSpec", self.kind)
        _check_kwargs("SolverSpec", self.kwargs)


@dataclass(frozen=True)
class PrecondSpec:
    """Diagonal scaling used by the diagonal lane or as the PCG preconditioner (``"diag_ema"`` …)."""

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind("PrecondSpec", self.kind)
        _check_kwargs("PrecondSpec", self.kwargs)


@dataclass(frozen=True)
class DampingSpec:
    """Damping policy for ``λ_t`` in (2.4): ``"constant"`` or ``"trust_region"``; ``lam0`` is ``λ_0``."""

    kind: str = "constant"
    lam0: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind("DampingSpec", self.kind)
        _check_kwargs("DampingSpec", self.kwargs)
        validate.number("DampingSpec: lam0", self.lam0, minimum=0.0)


@dataclass(frozen=True)
class TelemetrySpec:
    """Optional in-step probes and their cadences (paper §3.3–3.4, App. A "Curvature telemetry").

    Each ``*_every_k`` is ``-1`` (off) or ``k >= 1``: the probe fires at steps
    ``0, k, 2k, …`` of the method's step counter. Spectral probes use matrix-vector
    products of the step's own linearization (Hessian or GGN); none linearizes again.

    Attributes:
      rho_every_k: the rho bundle — loss after the applied update, predicted
        decrease ``-(gᵀu + ½ uᵀH u)`` and gain ratio ``rho`` → ``rho``,
        ``loss_after``, ``pred_decrease``, ``actual_decrease``.
      loss_after_every_k: loss at the new parameters only → ``loss_after``.
      trace_every_k: ``tr(H_t)`` → ``trace``; ``trace_estimator`` is
        ``"hutchinson"`` or ``"hutch++"`` with ``trace_probes`` matvecs.
      eig_every_k: top-``eig_k`` eigenvalues of ``H_t`` by ``eig_iters`` Lanczos
        steps → ``top_eigs`` (shape ``(eig_k,)``, descending).
      density_every_k: spectral density by stochastic Lanczos quadrature with
        ``density_probes`` probes × ``density_iters`` steps → ``density_nodes`` and
        ``density_weights`` (each ``(density_probes, density_iters)``).
      block_eig_every_k: top eigenvalue of each per-layer diagonal block of ``H_t``
        (``block_eig_iters`` Lanczos steps) → ``block_top_eig``, a dict keyed by layer path.
      norms_every_k: extra step norms → ``rel_update`` (``‖u_t‖/‖w_t‖``) and ``g_dot_s``
        (``g_tᵀs_t``). Off by default: each is one more pass over the parameters, which
        the always-on ``grad_norm``/``update_norm`` are not.
    """

    rho_every_k: int = OFF
    loss_after_every_k: int = OFF
    trace_every_k: int = OFF
    trace_estimator: str = "hutchinson"
    trace_probes: int = 10
    eig_every_k: int = OFF
    eig_k: int = 1
    eig_iters: int = 20
    density_every_k: int = OFF
    density_probes: int = 4
    density_iters: int = 16
    block_eig_every_k: int = OFF
    block_eig_iters: int = 20
    norms_every_k: int = OFF

    def __post_init__(self) -> None:
        for name in ("rho", "loss_after", "trace", "eig", "density", "block_eig", "norms"):
            check_cadence(f"TelemetrySpec.{name}_every_k", getattr(self, f"{name}_every_k"))
        for name in ("trace_probes", "eig_k", "eig_iters", "density_probes", "density_iters", "block_eig_iters"):
            validate.integer(f"TelemetrySpec.{name}", getattr(self, name), minimum=1)
        validate.choice("TelemetrySpec.trace_estimator", self.trace_estimator, ("hutchinson", "hutch++"))
        if self.eig_iters < self.eig_k:
            raise ValueError(f"TelemetrySpec.eig_iters ({self.eig_iters}) must be >= eig_k ({self.eig_k})")


@dataclass(frozen=True)
class LineSearchSpec:
    """Post-direction step-size policy on the applied update: ``"grid"`` or ``"armijo"``."""

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind("LineSearchSpec", self.kind)
        _check_kwargs("LineSearchSpec", self.kwargs)
