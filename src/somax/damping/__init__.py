"""Damping policies: constant, trust region (Levenberg–Marquardt on rho), step-norm band."""

from somax.damping.policies import (
    DECREASED,
    INCREASED,
    KEEP,
    ConstantDamping,
    DampingState,
    StepNormDamping,
    TrustRegion,
    constant,
    step_norm,
    trust_region,
)

__all__ = [
    "ConstantDamping",
    "DampingState",
    "StepNormDamping",
    "TrustRegion",
    "constant",
    "step_norm",
    "trust_region",
    "KEEP",
    "INCREASED",
    "DECREASED",
]
