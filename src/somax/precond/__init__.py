"""Diagonal preconditioners for the diagonal lane and for PCG."""

from somax.precond.diag import (
    DiagDirect,
    DiagEMA,
    DiagEMAState,
    IdentityPrecond,
    diag_direct,
    diag_ema,
    identity,
    spatial_average_tree,
)

__all__ = [
    "DiagDirect",
    "DiagEMA",
    "DiagEMAState",
    "IdentityPrecond",
    "diag_direct",
    "diag_ema",
    "identity",
    "spatial_average_tree",
]
