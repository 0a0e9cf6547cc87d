"""Preconditioners for the diagonal lane and for PCG: unit, diagonal, and Kronecker-factored (Shampoo, SOAP, K-FAC)."""

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
from somax.precond.kfac import KFAC, KFACState, kfac
from somax.precond.shampoo import Shampoo, ShampooState, shampoo
from somax.precond.soap import SOAP, SOAPState, soap
from somax.precond.unit import UnitPrecond, unit

__all__ = [
    "DiagDirect",
    "DiagEMA",
    "DiagEMAState",
    "IdentityPrecond",
    "diag_direct",
    "diag_ema",
    "identity",
    "spatial_average_tree",
    "Shampoo",
    "ShampooState",
    "shampoo",
    "SOAP",
    "SOAPState",
    "soap",
    "KFAC",
    "KFACState",
    "kfac",
    "UnitPrecond",
    "unit",
]
