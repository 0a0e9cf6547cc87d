"""Randomised curvature estimators layered on the step's linearization.

* ``"hutchinson"``: ``z ⊙ (H z)`` with Rademacher probes, on any curvature (Hessian or GGN).
* ``"gnb"`` (alias ``"gauss_newton_bartlett"``): ``n · ĝ ⊙ ĝ`` with labels sampled from
  the model's predictive distribution; GGN curvatures with a CE or MSE loss.

* ``"squared_gradient"``: ``g ⊙ g`` (the default statistic of the diagonal preconditioners).
* ``"gradient"``: ``g`` itself (Shampoo, SOAP); ``"kfac_factors"``: K-FAC's per-layer ``(A, S)``.

Each refreshes on its ``eval_every_k`` cadence and feeds the preconditioner the statistic
it ``produces`` (``"diagonal"`` or ``"squared_gradient"``).
"""

from somax.estimators.base import EstimatorState, mean_over_samples, rademacher_like
from somax.estimators.gnb import GaussNewtonBartlett, gnb, predictive_noise, sample_predictive
from somax.estimators.hutchinson import HutchinsonDiagonal, hutchinson
from somax.estimators.kronecker import GradientStatistic, KFACFactors
from somax.estimators.squared_gradient import SquaredGradient

__all__ = [
    "EstimatorState",
    "GaussNewtonBartlett",
    "HutchinsonDiagonal",
    "gnb",
    "hutchinson",
    "mean_over_samples",
    "predictive_noise",
    "rademacher_like",
    "sample_predictive",
    "SquaredGradient",
    "GradientStatistic",
    "KFACFactors",
]
