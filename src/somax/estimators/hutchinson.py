"""Hutchinson diagonal estimator on any curvature operator (Hessian or GGN).

For a probe ``z`` with independent Rademacher entries (``z_i = ±1``, ``E[z zᵀ] = I``),

    d̂ = z ⊙ (H z),    E[d̂_i] = Σ_j H_ij E[z_i z_j] = H_ii,

so ``d̂`` is an unbiased estimate of ``diag(H)`` [Hutchinson 1989; Bekas, Kokiopoulou
& Saad 2007], with variance ``Var[d̂_i] = Σ_{j≠i} H_ij²``. ``n_probes`` independent
probes are averaged (variance ``/ n_probes``). ``H v`` is the step's own matrix-free
product ``lin.matvec`` — an HVP for ``CurvatureSpec("hessian")`` (AdaHessian
[Yao et al. 2021], Sophia-H [Liu et al. 2023]) or ``Jᵀ H_z J v`` for a GGN kind
(Sophia-N, Somax paper §4.4) — so no second linearization is made.

The estimate is *signed* for an indefinite Hessian; the preconditioner decides what
to do with negative entries (``diag_ema`` clamps them at 0, or squares ``|d̂|`` for
AdaHessian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from somax.contracts import DIAGONAL
from somax.curvature.base import Linearization
from somax.estimators.base import (
    EstimatorState,
    RefreshCounted,
    check_count,
    mean_over_samples,
    rademacher_like,
    refresh_key,
)
from somax.registry import ESTIMATORS

PyTree = Any

__all__ = ["HutchinsonDiagonal", "hutchinson"]


@dataclass(frozen=True, kw_only=True)
class HutchinsonDiagonal(RefreshCounted):
    """``d̂ = 1/n Σ_k z_k ⊙ (H z_k)`` with Rademacher probes ``z_k`` (see module docstring).

    Attributes:
      n_probes: number of probes averaged per refresh.
      eval_every_k: refresh cadence (steps ``0, k, 2k, …``; ``-1`` never); between refreshes
        the preconditioner keeps the last estimate.
    """

    n_probes: int = 1

    produces = DIAGONAL
    kind = "hutchinson"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("EstimatorSpec('hutchinson'): n_probes", self.n_probes)

    def estimate(self, lin: Linearization, rng: jax.Array, state: EstimatorState) -> tuple[PyTree, EstimatorState]:
        """One refresh: the averaged probe estimate and the state with ``refreshes + 1``."""
        n = self.n_probes
        probes = rademacher_like(refresh_key(rng, state), lin.grad, None if n == 1 else n)

        def one(z: PyTree) -> PyTree:
            return jax.tree_util.tree_map(lambda a, b: (a * b).astype(a.dtype), z, lin.matvec(z))

        diag = mean_over_samples(one, probes, n)
        return diag, EstimatorState(state.refreshes + 1)


#: the registered factory of ``"hutchinson"`` (keyword options as the class fields)
hutchinson = HutchinsonDiagonal


ESTIMATORS.register("hutchinson", HutchinsonDiagonal)
