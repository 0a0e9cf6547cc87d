"""Damping policies: constant and trust region (Levenberg–Marquardt on rho)."""

from somax.damping.policies import ConstantDamping, DampingState, TrustRegion, constant, trust_region

__all__ = ["ConstantDamping", "DampingState", "TrustRegion", "constant", "trust_region"]
