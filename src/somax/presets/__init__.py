"""Named methods: each is a few lines of specs (see ``somax.describe(name)``)."""

from somax.presets import diag_lane, param_lane  # noqa: F401  (registers the presets)
from somax.presets.diag_lane import adahessian, sophia_g, sophia_h, sophia_n
from somax.presets.gauss_newton import gn, gn_layerwise, gn_prox_linear
from somax.presets.kronecker import kfac, kfac_cg, muon, shampoo, soap
from somax.presets.lbfgs import lbfgs
from somax.presets.param_lane import newton_cg, sgn_ce, sgn_mse
from somax.presets.registry import PRESETS, Option, define_preset, describe, list_methods, make
from somax.presets.row_lane import (  # registers the row-lane and direct presets
    egn_ce,
    egn_ce_cg,
    egn_mse,
    egn_mse_cg,
    ggn_direct_ce,
    ggn_direct_mse,
    newton_direct,
)

__all__ = [
    "PRESETS",
    "Option",
    "define_preset",
    "describe",
    "list_methods",
    "make",
    "newton_cg",
    "sgn_ce",
    "sgn_mse",
    "adahessian",
    "sophia_h",
    "sophia_g",
    "sophia_n",
    "egn_mse",
    "egn_ce",
    "egn_mse_cg",
    "egn_ce_cg",
    "ggn_direct_mse",
    "ggn_direct_ce",
    "newton_direct",
    "shampoo",
    "soap",
    "kfac",
    "kfac_cg",
    "muon",
    "lbfgs",
    "gn",
    "gn_prox_linear",
    "gn_layerwise",
]
