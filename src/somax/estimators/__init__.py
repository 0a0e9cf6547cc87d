"""Randomised curvature estimators layered on the step's linearization.

* ``"hutchinson"``: ``z ⊙ (H z)`` with Rademacher probes, on any curvature (Hessian or GGN).
* ``"gnb"`` (alias ``"gauss_newton_bartlett"``): ``N · ĝ ⊙ ĝ`` with labels sampled from
  the model's predictive distribution; GGN curvatures only.

Both refresh on their ``eval_every_k`` cadence and feed a diagonal preconditioner.
"""

from somax.estimators.base import EstimatorState, rademacher_like
from somax.estimators.gnb import GaussNewtonBartlett, gnb, sampled_output_gradient
from somax.estimators.hutchinson import HutchinsonDiagonal, hutchinson

__all__ = [
    "EstimatorState",
    "GaussNewtonBartlett",
    "HutchinsonDiagonal",
    "gnb",
    "hutchinson",
    "rademacher_like",
    "sampled_output_gradient",
]
