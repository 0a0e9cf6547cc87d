"""somax: composable, planned second-order optimization for JAX and Optax.

Describe a method with specs and :func:`assemble` it, or :func:`make` a preset::

    method = somax.make("sgn_mse", predict_fn=model, learning_rate=1.0)
    state = method.init(params)
    params, state, info = jax.jit(method.step)(params, batch, state, rng)
"""

from somax import adapters as adapters
from somax import checkpoint as checkpoint
from somax import curvature as curvature  # noqa: F401  (registers curvature kinds)
from somax import damping as damping  # noqa: F401
from somax import estimators as estimators  # noqa: F401
from somax import line_search as line_search  # noqa: F401
from somax import precond as precond  # noqa: F401
from somax import sharding as sharding
from somax import solvers as solvers  # noqa: F401
from somax import specs as specs
from somax.assemble import IncompatibleSpecsError, assemble
from somax.curvature.losses import ConvexLoss
from somax.curvature.model import Model
from somax.info_log import InfoWriter
from somax.interop import as_optax
from somax.method import MethodState, SecondOrderMethod
from somax.plan import Plan
from somax.presets import (
    adahessian,
    describe,
    egn_ce,
    egn_ce_cg,
    egn_mse,
    egn_mse_cg,
    ggn_direct_ce,
    ggn_direct_mse,
    gn,
    gn_layerwise,
    gn_prox_linear,
    kfac,
    kfac_cg,
    lbfgs,
    list_methods,
    make,
    muon,
    newton_cg,
    newton_direct,
    sgn_ce,
    sgn_mse,
    shampoo,
    soap,
    sophia_g,
    sophia_h,
    sophia_n,
)
from somax.registry import UnknownKindError, register
from somax.specs import (
    CurvatureSpec,
    DampingSpec,
    EstimatorSpec,
    LineSearchSpec,
    PrecondSpec,
    SolverSpec,
    TelemetrySpec,
)
from somax.step_info import StepInfo
from somax.telemetry import CORE_FIELDS, InfoField, info_rows, to_floats

__version__ = "0.1.0"


def __getattr__(name: str):
    # somax.flax_train (a Flax TrainState) is imported on first use, so Flax stays optional
    if name == "flax_train":
        import importlib

        return importlib.import_module("somax.flax_train")
    raise AttributeError(f"module 'somax' has no attribute {name!r}")


__all__ = [
    "Model",
    "ConvexLoss",
    "as_optax",
    "adapters",
    "checkpoint",
    "sharding",
    "assemble",
    "make",
    "list_methods",
    "describe",
    "register",
    "sgn_mse",
    "sgn_ce",
    "newton_cg",
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
    "lbfgs",
    "gn",
    "gn_prox_linear",
    "gn_layerwise",
    "muon",
    "SecondOrderMethod",
    "MethodState",
    "Plan",
    "CurvatureSpec",
    "EstimatorSpec",
    "SolverSpec",
    "PrecondSpec",
    "DampingSpec",
    "TelemetrySpec",
    "LineSearchSpec",
    "InfoField",
    "StepInfo",
    "CORE_FIELDS",
    "to_floats",
    "info_rows",
    "InfoWriter",
    "UnknownKindError",
    "IncompatibleSpecsError",
    "specs",
    "__version__",
]
