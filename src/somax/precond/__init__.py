"""Preconditioners for the diagonal lane and for PCG: unit, diagonal, Kronecker-factored (Shampoo, SOAP, K-FAC),
and the limited-memory quasi-Newton operator CG builds from its own curvature pairs."""

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
from somax.precond.limited_memory import CurvaturePairs, empty_pairs, lbfgs_inverse, pair_count, record_pair
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
    "CurvaturePairs",
    "empty_pairs",
    "record_pair",
    "pair_count",
    "lbfgs_inverse",
]
