"""Hutchinson diagonal estimator on any curvature operator (Hessian or GGN).

For a probe ``z`` with independent Rademacher entries (``z_i = ±1``, ``E[z zᵀ] = I``),

    d̂ = z ⊙ (H z),    E[d̂_i] = Σ_j H_ij E[z_i z_j] = H_ii,

so ``d̂`` is an unbiased estimate of ``diag(H)`` [Hutchinson 1989; Bekas, Kokiopoulou
& Saad 2007], with variance ``Var[d̂_i] = Σ_{j≠i} H_ij²``. ``n_probes`` independent
probes are averaged (variance ``/ n_probes``). ``H v`` is the step's own matrix-free
product ``lin.matvec`` — an HVP for ``CurvatureSpec("hessian")`` (AdaHessian
[Yao et al. 2021], Sophia-H [Liu et al. 2023]) or ``Jᵀ H_z J v`` for a GGN kind
(Sophia-N, Somax paper §4.4) — so no second linearization is made. With the exact Hessian in its ``hvp="jvp"`` form,
the step computes the gradient and the probes' products in one forward-over-reverse pass
on a refresh (``Curvature.linearize_with_products``).

The estimate is *signed* for an indefinite Hessian; the preconditioner decides what
to do with negative entries (``diag_ema`` clamps them at 0, or squares ``|d̂|`` for
AdaHessian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax.contracts import DIAGONAL
from somax.curvature.base import Linearization, apply_to_probes
from somax.estimators.base import EstimatorState, RefreshCounted, check_count, rademacher_like, refresh_key
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
    draws_probes = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("EstimatorSpec('hutchinson'): n_probes", self.n_probes)

    def estimate(self, lin: Linearization, rng: jax.Array, state: EstimatorState) -> tuple[PyTree, EstimatorState]:
        """One refresh: the averaged probe estimate and the state with ``refreshes + 1``."""
        probes, n = self.probes(rng, state, lin.grad)
        return self.from_products(probes, apply_to_probes(lin.matvec, probes, n), state)

    def probes(self, rng: jax.Array, state: EstimatorState, like: PyTree) -> tuple[PyTree, int | None]:
        """This refresh's Rademacher probes, like ``like`` (``n_probes`` on a leading axis when > 1)."""
        n = None if self.n_probes == 1 else self.n_probes
        return rademacher_like(refresh_key(rng, state), like, n), n

    def from_products(self, probes: PyTree, products: PyTree, state: EstimatorState) -> tuple[PyTree, EstimatorState]:
        """``d̂ = 1/n Σ_k z_k ⊙ (H z_k)`` and the state with ``refreshes + 1``."""
        diag = jax.tree_util.tree_map(lambda z, hz: (z * hz).astype(z.dtype), probes, products)
        if self.n_probes > 1:
            diag = jax.tree_util.tree_map(lambda d: jnp.mean(d, axis=0).astype(d.dtype), diag)
        return diag, EstimatorState(state.refreshes + 1)


#: the registered factory of ``"hutchinson"`` (keyword options as the class fields)
hutchinson = HutchinsonDiagonal


ESTIMATORS.register("hutchinson", HutchinsonDiagonal)
