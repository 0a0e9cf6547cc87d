"""Curvature operators: exact Hessian and generalized Gauss-Newton (paper §2.3)."""

from somax.curvature.base import Linearization
from somax.curvature.fisher import EmpiricalFisherCurvature, FisherCurvature, empirical_fisher, fisher
from somax.curvature.ggn import GGNCurvature, ggn, ggn_ce, ggn_mse
from somax.curvature.hessian import HessianCurvature, hessian
from somax.curvature.layers import Layer, LayerMap, discover_layers, layer_inputs_and_output_grads, row_cotangents
from somax.curvature.losses import MSELoss, OutputCurvature, OutputLoss, SoftmaxCELoss

__all__ = [
    "Linearization",
    "GGNCurvature",
    "HessianCurvature",
    "ggn",
    "ggn_mse",
    "ggn_ce",
    "hessian",
    "FisherCurvature",
    "EmpiricalFisherCurvature",
    "fisher",
    "empirical_fisher",
    "OutputLoss",
    "OutputCurvature",
    "MSELoss",
    "SoftmaxCELoss",
    "Layer",
    "LayerMap",
    "discover_layers",
    "layer_inputs_and_output_grads",
    "row_cotangents",
]
